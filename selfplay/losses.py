"""RL math for the learner: advantages, clipped policy loss, KL, importance correction, entropy control.

Pure torch functions, no model: every formula is unit-tested on tiny tensors. Sources are cited next to each
formula (see docs/losses.md and shared/reference/algorithms.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfplay.config import LearnerConfig
from selfplay.types import Trajectory


@dataclass
class PolicyLossInputs:
    logp: Tensor  # [B, T] current policy logprob of each completion token (requires grad)
    old_logp: Tensor  # [B, T] proximal ("old") policy logprob, detached
    advantages: Tensor  # [B] per sequence (broadcast over tokens) or [B, T]
    mask: Tensor  # [B, T] 1 = trained token (model-generated), 0 = pad / tool output
    ref_logp: Tensor | None = None  # [B, T] reference policy (base, adapters disabled) for the KL term
    behaviour_logp: Tensor | None = None  # [B, T] rollout engine's logprobs, for truncated IS of stale samples
    eps_high: Tensor | None = None  # [B] per-sequence upper clip (ADPO); None -> cfg.eps_high
    weights: Tensor | None = None  # [B] per-sequence sample weights (staleness down-weighting)


def policy_loss(inp: PolicyLossInputs, cfg: LearnerConfig, *, total_tokens: float | None = None,
                total_seqs: float | None = None, max_len: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss for one micro-batch plus metrics; with whole-batch totals, micro-batch losses sum to the
    full-batch loss (gradient accumulation)."""
    raise NotImplementedError


def group_advantages(rewards: Tensor, group_index: Tensor, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    raise NotImplementedError


def compute_advantages(trajs: list[Trajectory], cfg: LearnerConfig) -> list[float]:
    raise NotImplementedError


def adpo_scale(p_hat: Tensor, s_min: float) -> Tensor:
    raise NotImplementedError


def adpo_eps_high(p_hat: Tensor) -> Tensor:
    raise NotImplementedError


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    raise NotImplementedError


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str, *, total_tokens: float | None = None,
                   total_seqs: float | None = None, max_len: int | None = None) -> Tensor:
    raise NotImplementedError
