"""Clip-Cov and KL-Cov: which tokens of an optimizer step the covariance rule picks (docs/losses.md).

Cui et al. 2025 ("The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"); verl
core_algos `compute_policy_loss_clip_cov` / `compute_policy_loss_kl_cov` give the rule:
    cov_t = (A_t - mean A)(logp_t - mean logp), means over the valid tokens, logp the current policy's;
    k = max(1, int(ratio * N)), N the valid tokens;
    clip_cov: k tokens drawn at random among the valid, unclipped ones with lb < cov < ub (their pg term -> 0);
    kl_cov: the k tokens of largest cov (they get kl_cov_coef * |logp - old_logp|).
verl applies it to each micro-batch, so its update changes with the micro-batch size and the data-parallel
world size. Here the rule sees the whole optimizer step (every micro-batch of every rank): the means and N
are all-reduced, the draw is keyed by (trajectory, token position), not by which rank or micro-batch holds
the token, and the k picks are chosen over the gathered candidates. So `learner.micro_batch_tokens` and
`learner.world_size` leave the update unchanged (up to float rounding at a near-tie of the k-th pick). Its
cost: the learner's no-grad forward of each micro-batch before the step's first backward (the current
log-probs the means need).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # verl compute_policy_loss_*: the log-ratio is clamped to +-20 before exp()


@dataclass
class StepTokens:
    """One micro-batch's tokens as the rule sees them; every tensor [B, T]."""

    adv: Tensor
    logp: Tensor  # the current policy's, detached
    old: Tensor  # the proximal policy's
    mask: Tensor
    prio: Tensor  # float64 uniform draws in [0, 1): the random order of the Clip-Cov draw (and KL-Cov ties)
    eps_high: Tensor | float = 0.28  # [B, 1] or a float (ADPO's per-task bound)


def priorities(key: str, traj_ids: Sequence[str], width: int) -> Tensor:
    """[B, width] float64 uniform draws, one per (trajectory, position), from `key` (the seed, role, step and
    epoch): the same token gets the same draw whichever rank or micro-batch holds it."""
    rows = []
    for tid in traj_ids:
        h = hashlib.blake2b(f"{key}/{tid}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h, "little") % 2**63)
        rows.append(torch.rand(width, generator=g, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.float64)


def select(items: Sequence[StepTokens], kind: str, ratio: float, *, eps_low: float = 0.2, lb: float = 1.0,
           ub: float = 5.0, reduce_sum: Callable[[Tensor], Tensor] | None = None,
           gather: Callable[[Any], list[Any]] | None = None) -> list[Tensor]:
    """Per item, a [B, T] 0/1 mask of the picked tokens. `reduce_sum` (a tensor summed over ranks) and `gather`
    (every rank's object, as a list) make the choice span data-parallel ranks; without them, these items are
    the whole step."""
    cpu = [_on_cpu(it) for it in items]
    valid = [it.mask > 0 for it in cpu]
    sums = torch.zeros(3, dtype=torch.float64)
    for it, v in zip(cpu, valid):
        sums += torch.stack([v.sum().double(), (it.adv * v).sum(), (it.logp * v).sum()])
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    n = float(sums[0])
    mean_a, mean_l = float(sums[1]) / max(n, 1.0), float(sums[2]) / max(n, 1.0)
    k = max(int(ratio * n), 1)
    covs = [(it.adv - mean_a) * (it.logp - mean_l) for it in cpu]
    if kind == "kl_cov":
        cand = valid
    elif kind == "clip_cov":
        cand = []
        for it, v, cov in zip(cpu, valid, covs):
            r = torch.exp((it.logp - it.old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            upper = 1.0 + it.eps_high
            low = torch.clamp(r, min=1.0 - eps_low)
            clipped_r = torch.minimum(low, upper) if isinstance(upper, Tensor) else low.clamp(max=upper)
            cand.append(v & (-it.adv * clipped_r <= -it.adv * r) & (cov > lb) & (cov < ub))
    else:
        raise ValueError(f"entropy control {kind!r} picks no tokens")
    # sort keys of the candidates: KL-Cov by cov (largest first), then (and for Clip-Cov's draw only) priority
    keys = [torch.stack([-cov[c] if kind == "kl_cov" else torch.zeros_like(cov[c]), it.prio[c]], 1)
            for it, c, cov in zip(cpu, cand, covs)]
    local = _first(torch.cat(keys) if keys else torch.zeros(0, 2, dtype=torch.float64), k)
    every = _first(torch.cat(gather(local)), k) if gather is not None else local  # only a rank's first k can win
    out = []
    for it, c, key in zip(items, cand, keys):
        m = torch.zeros(c.shape, dtype=it.mask.dtype)
        if every.shape[0]:
            last = every[-1]  # the k-th pick (or the last candidate): everything up to it is picked
            m[c] = ((key[:, 0] < last[0]) | ((key[:, 0] == last[0]) & (key[:, 1] <= last[1]))).to(m.dtype)
        out.append(m.to(it.mask.device))
    return out


def _first(keys: Tensor, k: int) -> Tensor:
    """The first `k` rows of `keys` in (column 0, column 1) order."""
    order = torch.argsort(keys[:, 1], stable=True)
    order = order[torch.argsort(keys[order, 0], stable=True)]
    return keys[order[:k]]


def _on_cpu(it: StepTokens) -> StepTokens:
    f = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    eps = f(it.eps_high) if isinstance(it.eps_high, Tensor) else it.eps_high
    return StepTokens(f(it.adv), f(it.logp), f(it.old), f(it.mask), it.prio.to("cpu", torch.float64), eps)
