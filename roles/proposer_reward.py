"""The proposer's (curriculum agent's) reward, Agent0-style, as pure functions of what the executor did.

Agent0 (arXiv 2511.16043, Eqs. 2-5):
    R_unc  = 1 - 2 |p_hat - 0.5|                  (highest when the executor agrees with itself half the time)
    R_tool = gamma * min(N_tool, C)               (tasks that make the executor use its tool)
    R_rep  = lambda_rep * |C_k| / B               (roles/repetition.py)
    R      = max(0, lambda_unc R_unc + lambda_tool R_tool - R_rep),  format failure -> format_penalty
Defaults (ProposerConfig): gamma 0.05, C 4, tau_BLEU 0.5, lambda_rep 1, format penalty -1 (Agent0's code).
The paper leaves open whether N_tool is per trajectory; we average gamma*min(N_j, C) over the executor's k
trajectories for the task. Agent0's released code instead counts "```output" in the proposer's own text
and uses min(p, 1-p) (= R_unc / 2) without the clamp: set lambda_unc 0.5, clamp_nonnegative false for that.

Agreement gate (Agent0's released reward code; `proposer.require_agreement`, default on): the reward is 0
unless the executor's majority answer equals the proposer's own answer and p_hat > `agreement_min_p_hat`
(0.1). Without it an ill-posed question whose answers split (a 2/2 tie with k = 4) earns the top R_unc.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from roles.repetition import repetition_penalties
from selfplay.config import ProposerConfig


@dataclass
class ProposerReward:
    """One task's reward and its parts (the dashboard plots them separately)."""

    uncertainty: float  # R_unc (before lambda_unc)
    tool: float  # R_tool (before lambda_tool)
    repetition: float  # R_rep (lambda_rep included)
    format_ok: bool
    total: float
    p_hat: float | None = None
    cluster: int | None = None  # repetition cluster within the batch
    gated: bool = False  # the agreement gate zeroed `total` (the parts keep their values)

    def as_dict(self) -> dict:
        return asdict(self)


def uncertainty_reward(p_hat: float) -> float:
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"p_hat must be in [0, 1], got {p_hat}")
    return 1.0 - 2.0 * abs(p_hat - 0.5)


def tool_reward(tool_calls: Sequence[int], gamma: float = 0.05, cap: int = 4) -> float:
    """Mean over the executor's trajectories of gamma * min(N_tool, C); 0 when there are none."""
    if not tool_calls:
        return 0.0
    return sum(gamma * min(n, cap) for n in tool_calls) / len(tool_calls)


def combine(uncertainty: float, tool: float, repetition: float, cfg: ProposerConfig) -> float:
    raw = cfg.lambda_unc * uncertainty + cfg.lambda_tool * tool - repetition
    return max(0.0, raw) if cfg.clamp_nonnegative else raw


def format_failure(cfg: ProposerConfig) -> ProposerReward:
    return ProposerReward(0.0, 0.0, 0.0, False, cfg.format_penalty)


def score_batch(
    questions: Sequence[str | None],
    p_hats: Sequence[float | None],
    tool_calls: Sequence[Sequence[int]],
    cfg: ProposerConfig | None = None,
    agrees: Sequence[bool | None] | None = None,
) -> list[ProposerReward]:
    """Rewards for one proposer batch. `questions[i]` is None for a rejected (format-failed) proposal; the
    repetition clusters are formed over the accepted ones (B = their number). `p_hats[i]` None (no executor
    vote) counts as p_hat 0, i.e. R_unc 0. `tool_calls[i]` are the k executor trajectories' tool-call counts.
    `agrees[i]`: the executor's majority answer equals the proposer's own answer (None: no majority answer or
    no proposer answer, i.e. no agreement); needed when `cfg.require_agreement`."""
    cfg = cfg or ProposerConfig()
    if not len(questions) == len(p_hats) == len(tool_calls):
        raise ValueError(
            f"questions ({len(questions)}), p_hats ({len(p_hats)}) and tool_calls ({len(tool_calls)}) must align"
        )
    if cfg.require_agreement and (agrees is None or len(agrees) != len(questions)):
        raise ValueError("proposer.require_agreement needs `agrees` (one entry per question): whether the "
                         "executor's majority answer equals the proposer's answer")
    valid = [i for i, q in enumerate(questions) if q is not None]
    penalties, labels = repetition_penalties([questions[i] for i in valid], cfg.lambda_rep, cfg.bleu_tau)
    rep = dict(zip(valid, zip(penalties, labels)))
    out = []
    for i, q in enumerate(questions):
        if q is None:
            out.append(format_failure(cfg))
            continue
        p_hat = p_hats[i]
        unc = uncertainty_reward(p_hat) if p_hat is not None else 0.0
        tool = tool_reward(tool_calls[i], cfg.tool_gamma, cfg.tool_cap)
        penalty, label = rep[i]
        total = combine(unc, tool, penalty, cfg)
        gated = cfg.require_agreement and not (bool(agrees[i]) and p_hat is not None
                                               and p_hat > cfg.agreement_min_p_hat)
        out.append(ProposerReward(unc, tool, penalty, True, 0.0 if gated else total, p_hat, label, gated))
    return out
