"""Batch semantics of an RL update, as pure functions: a rollout batch split into mini-batches of whole groups
(one optimizer step each), and the metrics of those steps summarised for the loop.

verl (ppo_mini_batch_size; docs/losses.md): an iteration's rollout batch is split into mini-batches, each one
optimizer step, for `ppo_epochs` passes; the proximal ("old") log-probs are computed once, before the first
step, so every later step sees a policy that has moved (ratio != 1) and the clip can act.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from selfplay.types import Trajectory


def split_groups(trajs: Sequence[Trajectory], parts: int) -> list[list[int]]:
    """Row indices of `trajs` in `min(parts, groups)` contiguous chunks of whole groups (`(role, group_id)`,
    in order of first appearance), as even in group count as possible; the first chunks take the remainder."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    order: dict[tuple[str, str], list[int]] = {}
    for i, t in enumerate(trajs):
        order.setdefault((t.role, t.group_id), []).append(i)
    groups = list(order.values())
    n = min(parts, len(groups))
    if n == 0:
        return []
    size, extra = divmod(len(groups), n)
    out, start = [], 0
    for j in range(n):
        stop = start + size + (j < extra)
        out.append([i for g in groups[start:stop] for i in g])
        start = stop
    return out


_SUMMED = ("time_s", "tokens", "seqs", "micro_batches", "seq_tokens", "forward_tokens", "skipped")
_LAST = ("policy_version", "lr")


def summarise_steps(steps: Sequence[dict[str, float]], requested: int) -> dict[str, float]:
    """One dict for a role's update in an iteration: `steps` (optimizer steps that ran), `steps_requested`,
    `*_max` the maximum over steps, counts and times summed, `policy_version`/`lr` the last, everything else
    the mean over the steps that ran (a skipped step, with no trained token, only counts as skipped)."""
    ran = [s for s in steps if not s.get("skipped")]
    out: dict[str, float] = {"steps": float(len(ran)), "steps_requested": float(requested),
                             "skipped": float(len(steps) - len(ran))}
    keys = dict.fromkeys(k for s in ran for k in s)
    for k in keys:
        vals = [float(s[k]) for s in ran if k in s]
        if k.endswith("_max"):
            out[k] = max(vals)
        elif k in _SUMMED:
            out[k] = float(sum(vals))
        elif k in _LAST:
            out[k] = vals[-1]
        else:
            out[k] = float(np.mean(vals))
    if "tokens" in out and out.get("time_s"):
        out["tokens_per_s"] = out["tokens"] / out["time_s"]
    return out


class MetricMean:
    """Token-weighted means of per-micro-batch metrics; `*_max` keys keep the maximum; `tokens` is dropped."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for k, v in metrics.items():
            if k == "tokens":
                continue
            if k.endswith("_max"):
                self.maxes[k] = max(self.maxes.get(k, -np.inf), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * weight
                self.weights[k] = self.weights.get(k, 0.0) + weight

    def result(self) -> dict[str, float]:
        out = {k: s / max(self.weights[k], 1e-12) for k, s in self.sums.items()}
        return {**out, **self.maxes}


# ------------------------------------------------------------------ per-trajectory inputs of a step
def has_behaviour(t: Trajectory) -> bool:
    """The engine returned log-probs for this trajectory (an engine without them leaves 0.0 placeholders)."""
    return not t.meta.get("logprobs_missing") and any(lp != 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask)
                                                      if m)


def truncation(t: Trajectory) -> tuple[float, int]:
    """(top_p, top_k) the sampler used; greedy samples (temperature 0) are scored on raw logits, untruncated."""
    if float(t.meta.get("temperature", 1.0) or 0.0) <= 0:
        return 1.0, 0
    return float(t.meta.get("top_p", 1.0)), int(t.meta.get("top_k", 0) or 0)


def temperature_of(t: Trajectory, default: float | None) -> float:
    temp = t.meta.get("temperature", default)
    return float(temp) if temp is not None and float(temp) > 0 else 1.0  # greedy samples: raw logits


def validate(role: str, trajs: list[Trajectory], weights: Sequence[float] | None) -> None:
    if not trajs:
        raise ValueError("train_step needs at least one trajectory")
    for t in trajs:
        if t.role != role:
            raise ValueError(f"trajectory {t.traj_id} is for role {t.role!r}, not {role!r}")
        if not t.prompt_ids:
            raise ValueError(f"trajectory {t.traj_id} has an empty prompt (the first token needs a context)")
    if weights is not None:
        if len(weights) != len(trajs):
            raise ValueError(f"weights has {len(weights)} entries for {len(trajs)} trajectories")
        if not all(np.isfinite(w) and w >= 0 for w in weights):
            raise ValueError("weights must be finite and >= 0")


def batch_stats(trajs: list[Trajectory], adv: list[float], version: int) -> dict[str, float]:
    if not trajs:  # a data-parallel rank's empty share of a mini-batch
        return {}
    a = np.asarray(adv, dtype=np.float64)
    r = np.asarray([t.reward for t in trajs], dtype=np.float64)
    return {"adv_mean": float(a.mean()), "adv_std": float(a.std()), "adv_min": float(a.min()),
            "adv_max": float(a.max()), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
            "seqs": float(len(trajs)),
            "staleness_mean": float(np.mean([version - t.policy_version for t in trajs]))}
