"""RL math for the learner: advantages, clipped policy loss, KL, importance correction, entropy control.

Pure torch functions, no model, so every formula is unit-tested on tiny tensors. Sources are cited next to
each formula; docs/losses.md lists them all with their config fields.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfplay.config import LearnerConfig
from selfplay.learner.entropy import LOG_RATIO_CLAMP, StepTokens, select
from selfplay.types import Trajectory

# verl core_algos.compute_policy_loss_vanilla clamps the log-ratio to +-20 before exp() (LOG_RATIO_CLAMP), and
# kl_penalty_forward("low_var_kl") clamps the log-ratio to +-20 and the k3 value to +-10.
K3_CLAMP = 10.0
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class PolicyLossInputs:
    logp: Tensor  # [B, T] current policy logprob of each completion token (requires grad)
    old_logp: Tensor  # [B, T] proximal ("old") policy logprob, detached
    advantages: Tensor  # [B] per sequence (broadcast over tokens) or [B, T]
    mask: Tensor  # [B, T] 1 = trained token (model-generated), 0 = pad / tool output
    ref_logp: Tensor | None = None  # [B, T] reference policy (base, adapters disabled) for the KL term
    behaviour_logp: Tensor | None = None  # [B, T] rollout engine's logprobs, for truncated IS of stale samples
    # [B, T] proximal log-probs under the sampler's top-k/top-p (what behaviour_logp measures); None = old_logp
    old_logp_sampler: Tensor | None = None
    behaviour_rows: Tensor | None = None  # [B] 1 where behaviour_logp is real; other rows get no IS weight
    eps_high: Tensor | None = None  # [B] per-sequence upper clip (ADPO); None -> cfg.eps_high
    weights: Tensor | None = None  # [B] per-sequence sample weights (staleness down-weighting)
    # [B, T] 1 = a token the entropy control picked over the whole optimizer step (learner/entropy.py);
    # None = this micro-batch is the whole step (picked here, the draw from `generator`)
    cov_pick: Tensor | None = None


# ----------------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: Tensor, group_index: Tensor, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps); Dr.GRPO (scale_by_std=False): A_i = r_i - mean_g.

    std is the unbiased (Bessel) one, as in verl's compute_grpo_outcome_advantage (torch.std) and TRL's
    nanstd. A group whose rewards are all equal, or that has a single member, gets exactly 0: it carries no
    learning signal (TRL gives 0 there too; verl gives a singleton A = r, which we deliberately do not).
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must be "
                         "1-D and the same shape")
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group_index, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r) / count
    centred = r - mean[inv]
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, centred**2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    pos = torch.arange(r.numel())
    first = torch.full((n_groups,), r.numel(), dtype=torch.long).scatter_reduce_(0, inv, pos, "amin")
    differs = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, (r != r[first][inv]).double())
    flat = (differs == 0)[inv]  # exact test: the float mean of equal values can be off by 1 ulp
    adv = centred / (std[inv] + eps) if scale_by_std else centred
    return torch.where(flat, torch.zeros_like(adv), adv).to(rewards.dtype)


def adpo_scale(p_hat: Tensor, s_min: float) -> Tensor:
    """Agent0 ADPO advantage scale s(p_hat) = m + (1-m)*clip((p_hat-0.3)/0.5, 0, 1), m = s_min.

    Source: Agent0 paper Eq. 8; verl_tool/trainer/ppo/core_algos.py (m = 0.6 in their executor script).
    Low agreement (ambiguous pseudo-label) -> smaller step.
    """
    return s_min + (1.0 - s_min) * ((p_hat - 0.3) / 0.5).clamp(0.0, 1.0)


def adpo_eps_high(p_hat: Tensor) -> Tensor:
    """Agent0 ADPO upper clip eps_high(p_hat) = 0.2 + 0.1*clip((0.8-p_hat)/0.5, 0, 1), in [0.2, 0.3].

    Source: verl_tool/trainer/ppo/core_algos.py. Harder tasks (low p_hat) may move further up.
    """
    return 0.2 + 0.1 * ((0.8 - p_hat) / 0.5).clamp(0.0, 1.0)


def compute_advantages(trajs: list[Trajectory], cfg: LearnerConfig) -> list[float]:
    """Advantages for a batch of trajectories according to `cfg.advantage` (and ADPO).

    grpo / drgrpo: groups are `traj.group_id` (samples of one prompt). hrpo (Dr. Zero): groups are the
    structural class `traj.meta["structure"]` (e.g. hop count), standardised like GRPO, so one sample per
    prompt suffices. ADPO (cfg.adpo, executor trajectories with p_hat): A *= s(p_hat) after normalisation;
    the proposer's p_hat is its reward input, not label ambiguity, so it is never scaled.
    """
    if not trajs:
        return []
    keys: list[str] = []
    for t in trajs:
        if cfg.advantage == "hrpo":
            if "structure" not in t.meta:
                raise ValueError(f"advantage=hrpo needs traj.meta['structure'] (trajectory {t.traj_id} has none)")
            keys.append(f"{t.role}\x00{t.meta['structure']!r}")
        else:
            keys.append(f"{t.role}\x00{t.group_id}")
    ids: dict[str, int] = {}
    index = torch.tensor([ids.setdefault(k, len(ids)) for k in keys])
    rewards = torch.tensor([float(t.reward) for t in trajs], dtype=torch.float64)
    adv = group_advantages(rewards, index, scale_by_std=cfg.advantage != "drgrpo", eps=cfg.adv_eps)
    if cfg.adpo:
        p = torch.tensor([t.p_hat if t.p_hat is not None and t.role == "executor" else float("nan") for t in trajs],
                         dtype=torch.float64)
        scale = torch.where(p.isnan(), torch.ones_like(p), adpo_scale(p, cfg.adpo_s_min))
        adv = adv * scale
    return adv.tolist()


# ------------------------------------------------------------------------------------------ loss pieces
def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): e^(ref-logp) - (ref-logp) - 1 (Schulman's k3).

    verl's "low_var_kl" (kl_penalty_forward): log-ratio clamped to +-20, result clamped to +-10; TRL's
    GRPO beta term is the same expression unclamped. Always >= 0, exact 0 where logp == ref.
    """
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-K3_CLAMP, K3_CLAMP)


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str, *, total_tokens: float | None = None,
                   total_seqs: float | None = None, max_len: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar (verl agg_loss; TRL loss_type in brackets).

    token-mean (TRL bnpo / dapo):    sum(L*m) / N_tokens
    seq-mean-token-mean (TRL grpo):  sum_i(sum_t L*m / max(1, sum_t m)) / N_seqs
    seq-mean-token-sum-norm (Dr.GRPO, TRL dr_grpo): sum(L*m) / (N_seqs * max_len)
    N_tokens / N_seqs default to this tensor's counts; pass whole-batch counts (total_tokens/total_seqs) when
    the batch is split into micro-batches, so the micro-batch losses sum to the full-batch loss. verl's
    seq-mean-token-sum-norm divides by max_len only (B times larger): a constant factor, absorbed by the lr.
    """
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = m.sum().clamp(min=1.0) if total_tokens is None else total_tokens
        return (per_token * m).sum() / denom
    n_seqs = per_token.shape[0] if total_seqs is None else total_seqs
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        length = per_token.shape[1] if max_len is None else max_len
        return (per_token * m).sum() / (n_seqs * length)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGG_MODES}")


def truncated_is_weight(old_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Decoupled-PPO behaviour correction w = min(pi_prox / pi_behav, cap), detached (no gradient).

    AReaL (areal/utils/functional: loss * pi_prox/pi_behav), verl rollout_correction (token TIS,
    threshold 2.0), slime --use-tis (tis-clip 2.0). Corrects stale or engine-mismatched rollouts while the
    PPO ratio itself stays relative to the proximal policy.
    """
    d = (old_logp - behaviour_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d).clamp(max=cap)


# --------------------------------------------------------------------------------------------- the loss
def policy_loss(inp: PolicyLossInputs, cfg: LearnerConfig, *, total_tokens: float | None = None,
                total_seqs: float | None = None, max_len: int | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss for one micro-batch plus metrics.

    per-token loss L_t = w_seq * [ w_is,t * pg_t + kl_coef * k3(logp_t, ref_t) (* r_t if kl_ratio_correction) ],
    aggregated by cfg.loss_agg.
    pg_t (verl compute_policy_loss_vanilla; DAPO clip-higher; dual clip, Ye et al. 2019):
        r = exp(clamp(logp - old_logp, +-20)); pg = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))
        if A < 0: pg = min(pg, -A c)
    entropy_control="clip_cov": pg_t = 0 for a random max(1, ratio*N) of the unclipped tokens whose cov is
    in (lb, ub); "kl_cov": pg = -A r (no clip), plus kl_cov_coef*|logp - old_logp| on the top max(1, ratio*N)
    tokens by cov (both verl core_algos; learner/entropy.py): the tokens `inp.cov_pick` marks, else picked
    in this micro-batch alone, `generator` seeding the Clip-Cov draw.
    With whole-batch totals, micro-batch losses sum to the full-batch loss (gradient accumulation).
    """
    logp, old, mask = inp.logp, inp.old_logp.detach(), inp.mask
    if logp.dim() != 2 or old.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old.shape)} and mask {tuple(mask.shape)} "
                         "must all be [B, T]")
    B = logp.shape[0]
    valid = mask > 0
    mf = valid.to(logp.dtype)
    # Tool-output and pad positions may hold anything (0.0, -inf, nan): zero them so no inf*0 = nan leaks
    # into the loss or the gradient.
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp, old = torch.where(valid, logp, zero), torch.where(valid, old, zero)
    ref_logp = None if inp.ref_logp is None else torch.where(valid, inp.ref_logp.detach(), zero)
    beh_logp = None if inp.behaviour_logp is None else torch.where(valid, inp.behaviour_logp.detach(), zero)
    n_tok = mf.sum().clamp(min=1.0)

    def mmean(x: Tensor) -> Tensor:
        return (x.detach().to(logp.dtype) * mf).sum() / n_tok

    def mmax(x: Tensor) -> Tensor:  # 1.0 when nothing is valid
        return torch.where(valid.any(), x.detach().masked_fill(~valid, -torch.inf).max(), 1.0)

    adv = inp.advantages.to(logp.dtype).detach()
    adv = adv.unsqueeze(1).expand_as(logp) if adv.dim() == 1 else adv
    if adv.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(inp.advantages.shape)}")
    eps_high = cfg.eps_high if inp.eps_high is None else inp.eps_high.to(logp.dtype).detach().view(B, 1)

    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    clipped_ratio = torch.minimum(torch.maximum(ratio, torch.full_like(ratio, 1.0 - cfg.eps_low)),
                                  1.0 + eps_high + torch.zeros_like(ratio))
    pg_clip = -adv * clipped_ratio
    metrics: dict[str, Tensor | float] = {  # tensors until the end: one device sync, not one per metric
        "clip_frac": mmean(pg_clip > pg_unclipped),  # verl pg_clipfrac: the clip bounds this token's term
        "clip_frac_low": mmean((ratio < 1.0 - cfg.eps_low) & (adv < 0)),
        "clip_frac_high": mmean((ratio > 1.0 + eps_high) & (adv > 0)),
        "ratio_mean": mmean(ratio),
        "ratio_max": mmax(ratio),
        "approx_kl_old": mmean(-log_ratio),  # verl ppo_kl
        "tokens": mf.sum(),
    }
    pick = inp.cov_pick
    if pick is None and cfg.entropy_control != "none":  # this micro-batch is the whole step
        ratio_k = cfg.kl_cov_ratio if cfg.entropy_control == "kl_cov" else cfg.clip_cov_ratio
        prio = torch.rand(logp.shape, generator=generator, dtype=torch.float64)
        pick = select([StepTokens(adv, logp, old, mf, prio, eps_high)], cfg.entropy_control, ratio_k,
                      eps_low=cfg.eps_low, lb=cfg.clip_cov_lb, ub=cfg.clip_cov_ub)[0]
    if cfg.entropy_control == "kl_cov":  # verl compute_policy_loss_kl_cov: unclipped surrogate + |log r| on top-k
        sel = pick.to(logp.dtype) * mf
        pg = pg_unclipped + cfg.kl_cov_coef * log_ratio.abs() * sel
        metrics["kl_cov_frac"] = sel.sum() / n_tok
    else:
        pg = torch.maximum(pg_unclipped, pg_clip)
        if cfg.dual_clip_c is not None:
            pg_dual = -adv * cfg.dual_clip_c
            metrics["dual_clip_frac"] = mmean((pg > pg_dual) & (adv < 0))
            pg = torch.where(adv < 0, torch.minimum(pg, pg_dual), pg)
        if cfg.entropy_control == "clip_cov":  # verl compute_policy_loss_clip_cov
            sel = pick.to(logp.dtype) * mf
            pg = pg * (1.0 - sel)
            metrics["clip_cov_frac"] = sel.sum() / n_tok

    if beh_logp is not None and cfg.tis_cap is not None:
        # like with like: the engine's log-probs are those of its truncated (top-k/top-p) distribution, so the
        # proximal side is scored under the same truncation (docs/losses.md)
        prox = old if inp.old_logp_sampler is None else torch.where(valid, inp.old_logp_sampler.detach(), zero)
        is_tok = valid if inp.behaviour_rows is None else valid & (inp.behaviour_rows.view(B, 1) > 0)
        w_is = torch.where(is_tok, truncated_is_weight(prox, beh_logp, cfg.tis_cap), torch.ones_like(prox))
        n_is = is_tok.to(logp.dtype).sum()
        if bool(is_tok.any()):
            metrics["is_weight_mean"] = (w_is * is_tok).sum() / n_is
            metrics["is_weight_max"] = w_is.masked_fill(~is_tok, -torch.inf).max()
            metrics["is_truncated_frac"] = ((w_is >= cfg.tis_cap) & is_tok).to(logp.dtype).sum() / n_is
        metrics["is_tokens_frac"] = n_is / n_tok  # tokens that had behaviour log-probs to correct against
        pg = pg * w_is

    per_token = pg
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp (reference policy logprobs); set learner.kl_coef=0 to "
                             "train without a KL term")
        kl = k3_kl(logp, ref_logp)
        metrics["kl"] = mmean(kl)
        if cfg.kl_ratio_correction:  # DeepSeek-V3.2 / TRL use_bias_correction_kl: k3 * r, r differentiable
            kl = kl * ratio
        per_token = per_token + cfg.kl_coef * kl
    if inp.weights is not None:
        per_token = per_token * inp.weights.to(logp.dtype).detach().view(B, 1)

    loss = aggregate_loss(per_token, mask, cfg.loss_agg, total_tokens=total_tokens, total_seqs=total_seqs,
                          max_len=max_len if max_len is not None else cfg.loss_norm_len)
    metrics["pg_loss"] = mmean(pg)
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=logp.device) for v in metrics.values()])
    return loss, dict(zip(metrics.keys(), values.tolist()))
