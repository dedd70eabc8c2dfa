"""The learner: GRPO-family RL updates for every role on ONE base model (a LoRA adapter per role).

Why it looks like this (docs/learner.md has the long form):
- Memory: one copy of the base weights; peft adds one adapter per role and `set_adapter(role)` picks the
  one a step trains; each role has its own AdamW over its own adapter only. The KL reference is the base
  with adapters disabled (verl does the same: `disable_adapter()`), so there is no second model copy.
- Compute (selfplay/learner/scoring.py): the LM head runs only on the hidden states of trained completion tokens,
  and each distinct prompt runs once per micro-batch with its KV cache fanned out to its G samples (prompt
  sharing; exact gradients). Logits are divided by the sampling temperature (TRL).
- Batch semantics (verl; selfplay/learner/batches.py): a rollout batch is split into `updates` mini-batches
  of whole groups, one optimizer step each, for `ppo_epochs` passes. The proximal ("old") log-probs are the
  policy's before step 1: free for the first mini-batch (`logp.detach()` before its step is exact), one
  no-grad forward for each later one. Later steps therefore see ratio != 1 and the clip acts. The same pass
  scores the proximal policy under the sampler's top-k/top-p for truncated IS (docs/losses.md).
- Micro-batches are length-sorted (prompt groups kept together) and packed up to `micro_batch_tokens`
  padded tokens; `policy_loss` gets whole-batch totals, so the micro-batch losses sum to the full-batch loss.
"""
from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from selfplay.learner.checkpoint import atomic_dir, load_learner, resolve_checkpoint, save_learner
from selfplay.config import LearnerConfig, ModelConfig
from selfplay.learner.batches import (MetricMean, batch_stats, has_behaviour, split_groups, summarise_steps,
                                      temperature_of, truncation, validate)
from selfplay.learner.checkpointing import enable_layer_checkpointing
from selfplay.learner.memory import _large_tensors_via_mmap  # noqa: F401 (tests import it from here)
from selfplay.learner.entropy import StepTokens, priorities, select
from selfplay.learner.losses import PolicyLossInputs, adpo_eps_high, compute_advantages, policy_loss
from selfplay.models import default_device, load_causal_lm, resolve_model_path
from selfplay.learner.scoring import MicroBatch, build_micro_batches, token_logprobs
from selfplay.types import AdapterUpdate, FullWeightsUpdate, Trajectory

log = logging.getLogger(__name__)

ROLES = ("proposer", "executor")
SHARED = "shared"  # optimizer key under full fine-tuning: all roles train one set of weights


class Learner:
    """RL updates for the roles of a self-play run; plain class (the Ray actor shell wraps it)."""

    def __init__(self, model_cfg: ModelConfig | None = None, learner_cfg: LearnerConfig | None = None,
                 roles: Sequence[str] = ROLES, seed: int = 0, device: str | None = None):
        self.model_cfg = model_cfg or ModelConfig()
        self.cfg = cfg = learner_cfg or LearnerConfig()
        self.roles = tuple(roles)
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles must be non-empty and unique, got {self.roles}")
        self.seed = seed
        self.device = torch.device(device or default_device())
        self.lora = cfg.finetune == "lora"
        cuda = self.device.type == "cuda"
        self.bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and cuda)
        _seed_everything(seed)
        self._trim = _large_tensors_via_mmap() if self.device.type == "cpu" else None

        path = resolve_model_path(self.model_cfg.name_or_path, self.model_cfg.cache_dir)
        dtype = self.model_cfg.dtype
        if not self.lora and dtype == "auto":
            dtype = "float32"  # full fine-tuning keeps fp32 master weights; bf16 comes from autocast
        base = load_causal_lm(path, dtype, str(self.device), self.model_cfg.trust_remote_code)
        base.config.use_cache = False
        checkpointing = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and cuda)
        keeps_cache = checkpointing and enable_layer_checkpointing(base)  # learner/checkpointing.py
        if checkpointing and not keeps_cache:  # not transformers' decoder layers: its switch, which drops the cache
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # prompt sharing runs completions against the prompt's KV cache
        self.share_prompts = cfg.prompt_sharing and (keeps_cache or not checkpointing)
        self._softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        self._ref_model = None
        if self.lora:
            from peft import LoraConfig as PeftLoraConfig, get_peft_model

            lc = cfg.lora
            peft_cfg = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                      target_modules=lc.target_modules, task_type="CAUSAL_LM")
            self.model = get_peft_model(base, peft_cfg, adapter_name=self.roles[0])
            for role in self.roles[1:]:
                self.model.add_adapter(role, peft_cfg)
        else:
            self.model = base
            if cfg.kl_coef > 0:  # the only case that needs a second copy: a frozen reference
                import copy

                self._ref_model = copy.deepcopy(base).requires_grad_(False).eval()
                if cuda:
                    self._ref_model.to(torch.bfloat16)
        self._build_optimizers()
        self.step = 0
        self.policy_version: dict[str, int] = {role: 0 for role in self.roles}
        self.last_advantages: dict[str, float] = {}  # traj_id -> advantage used by the last train_step
        self.dist = None  # a distributed.GradSync when this learner is one of several data-parallel ranks
        self.fsdp = None  # a fsdp.Sharded under `strategy: fsdp2` with world_size > 1 (`shard`)

    def shard(self) -> None:
        """FSDP2 over the process group this rank joined (learner/fsdp.py); optimizers are rebuilt over the
        sharded parameters, so call it before loading a checkpoint."""
        from selfplay.learner.fsdp import Sharded

        self.fsdp = Sharded(self.model, self.device)
        self.share_prompts = False  # a shared prompt runs every layer twice per forward: collectives would differ
        self._build_optimizers()

    # ------------------------------------------------------------------------------------------ setup
    def _build_optimizers(self) -> None:
        if self.lora:
            groups = {role: [p for n, p in self.model.named_parameters() if _is_adapter_param(n, role)]
                      for role in self.roles}
        else:
            groups = {SHARED: [p for p in self.model.parameters() if p.requires_grad]}
        self._params = groups
        self._optim = {key: self._make_optimizer(params) for key, params in groups.items()}

    def _make_optimizer(self, params: list[Tensor]):
        from transformers import get_constant_schedule_with_warmup

        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        return opt, get_constant_schedule_with_warmup(opt, self.cfg.warmup_steps)

    def _key(self, role: str) -> str:
        return role if self.lora else SHARED

    def _check_role(self, role: str) -> None:
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; this learner trains {self.roles}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # ------------------------------------------------------------------------------------ log-probs
    def _token_logps(self, mb: MicroBatch, model=None, entropy: bool = False, sampler: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
        kwargs = dict(self._head_kwargs(), entropy=entropy, sampler=sampler)
        if model is None and self.fsdp is not None:  # a forward of the FSDP2 root: the LM head is unsharded
            return self.fsdp.score(mb, **kwargs)
        model = model if model is not None else self.model
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        return token_logprobs(hf, mb, **kwargs)

    def _head_kwargs(self) -> dict:
        return dict(autocast=self._autocast, head_dtype=torch.bfloat16 if self.bf16 else None, softcap=self._softcap)

    def _rounds(self, local: int) -> int:
        """FSDP2: how many forwards every rank runs at the next point (fsdp.Sharded.rounds); else `local`."""
        return self.fsdp.rounds(local) if self.fsdp is not None else local

    def _fill(self, rounds: int, done: int, backward: bool = False) -> None:
        """FSDP2: the forwards this rank lacks for its collectives to match the other ranks' (fsdp.Sharded.fill)."""
        if self.fsdp is not None:
            self.fsdp.fill(rounds, done, backward, **self._head_kwargs())

    @torch.no_grad()
    def _ref_logps(self, mb: MicroBatch) -> Tensor:
        if self._ref_model is not None:
            return self._token_logps(mb, model=self._ref_model)[0]
        if not self.lora:
            raise ValueError("full fine-tuning keeps a frozen reference copy only when kl_coef > 0")
        with self.model.disable_adapter():
            return self._token_logps(mb)[0]

    @torch.no_grad()
    def logprobs(self, role: str, trajectories: Sequence[Trajectory], temperature: float | None = None,
                 reference: bool = False, sampler: bool = False) -> list[list[float]]:
        """Per-token log-probs of each completion under `role`'s current policy (or the reference), aligned
        with `behaviour_logprobs` (0.0 where loss_mask is 0): checks that engines serve what was trained.
        `sampler`: under the sampler's top-k/top-p (`traj.meta`), as the engines report them."""
        self._check_role(role)
        trajs = list(trajectories)
        temps = [temperature_of(t, temperature) for t in trajs]
        if self.lora:
            self.model.set_adapter(role)
        out: list[list[float]] = [[] for _ in trajs]
        cuts = [truncation(t) for t in trajs] if sampler else None
        for mb in build_micro_batches(trajs, temps, self.cfg.micro_batch_tokens, self.device, self.share_prompts,
                                      cuts):
            logp = self._ref_logps(mb) if reference else self._token_logps(mb, sampler=sampler)[2 if sampler else 0]
            for j, i in enumerate(mb.rows):
                out[i] = logp[j, :len(trajs[i].completion_ids)].float().cpu().tolist()
        return out

    # ------------------------------------------------------------------------------------- training
    def _advantages(self, trajs: list[Trajectory], keep: Sequence[bool] | None) -> list[float]:
        keep = [t.advantage != 0.0 for t in trajs] if keep is None else list(keep)
        if len(keep) != len(trajs):
            raise ValueError(f"keep_advantage has {len(keep)} entries for {len(trajs)} trajectories")
        adv = [t.advantage for t in trajs]
        fresh = [i for i, k in enumerate(keep) if not k]
        for i, a in zip(fresh, compute_advantages([trajs[i] for i in fresh], self.cfg)):
            adv[i] = a
        return adv

    def _eps_high(self, role: str, trajs: list[Trajectory]) -> list[float] | None:
        """ADPO's per-task upper clip for executor samples with a known p_hat (Agent0); else cfg.eps_high."""
        if not (self.cfg.adpo and role == "executor") or all(t.p_hat is None for t in trajs):
            return None
        p = torch.tensor([t.p_hat if t.p_hat is not None else 0.0 for t in trajs], dtype=torch.float64)
        eps = adpo_eps_high(p).tolist()
        return [e if t.p_hat is not None else self.cfg.eps_high for e, t in zip(eps, trajs)]

    def train_step(self, role: str, trajectories: Sequence[Trajectory], weights: Sequence[float] | None = None,
                   temperature: float | None = None, keep_advantage: Sequence[bool] | None = None
                   ) -> dict[str, float]:
        """The whole batch as ONE mini-batch (`learner.ppo_epochs` optimizer steps); the steps' metrics
        summarised (`batches.summarise_steps`: "loss", "kl", "steps", ...). See `train_batch`."""
        return summarise_steps(self.train_batch(role, trajectories, weights, temperature, keep_advantage),
                               self.cfg.ppo_epochs)

    def train_batch(self, role: str, trajectories: Sequence[Trajectory], weights: Sequence[float] | None = None,
                    temperature: float | None = None, keep_advantage: Sequence[bool] | None = None,
                    updates: int = 1, parts: Sequence[Sequence[int]] | None = None) -> list[dict[str, float]]:
        """RL updates of `role` on one rollout batch; returns one metrics dict per optimizer step.

        verl's batch semantics: the batch is split into `updates` mini-batches of whole groups (fewer when it
        holds fewer groups: logged), one optimizer step each, in order, for `learner.ppo_epochs` passes. The
        proximal ("old") log-probs of every mini-batch are the policy's before step 1, so each later step
        trains on data its policy did not sample (ratio != 1, the clip acts). The role's policy version
        advances by one per optimizer step.

        Advantages: rows with `keep_advantage[i]` use `traj.advantage` as given (a self-imitation replay, whose
        group is not in the batch); the others get `compute_advantages` over their groups. Without
        `keep_advantage`, a non-zero `traj.advantage` counts as given. `last_advantages` keeps what was used.
        Temperature (logits are divided by it): `traj.meta["temperature"]`, else `temperature`, else 1.0.
        `weights`: optional per-trajectory sample weights (the replay buffer's staleness down-weighting).
        `parts`: the mini-batches as row indices, instead of `updates` (data-parallel ranks: each rank's share
        of every mini-batch, possibly empty, so all ranks step together).
        Truncated IS compares the engine's log-probs with the proximal policy under the sampler's own
        top-k/top-p (`traj.meta["top_p"]`, `["top_k"]`); rows without behaviour log-probs get no IS weight.
        """
        self._check_role(role)
        trajs = list(trajectories)
        if trajs or self.dist is None:  # a data-parallel rank may have no share of the batch
            validate(role, trajs, weights)
        adv = self._advantages(trajs, keep_advantage)
        self.last_advantages = {t.traj_id: a for t, a in zip(trajs, adv)}
        temps = [temperature_of(t, temperature) for t in trajs]
        if parts is not None:
            parts = [list(p) for p in parts]
        elif len(parts := split_groups(trajs, updates)) < updates:
            log.warning("%s: %d updates requested but the batch holds %d groups: %d optimizer steps per epoch",
                        role, updates, len(parts), len(parts))
        if self.lora:
            self.model.set_adapter(role)
        self.model.train()
        version = self.policy_version[role]
        plans = [self._plan(role, [trajs[i] for i in rows], [adv[i] for i in rows],
                            None if weights is None else [weights[i] for i in rows], [temps[i] for i in rows],
                            version) for rows in parts]
        with torch.no_grad():  # the policy before step 1: proximal log-probs of the later mini-batches
            for plan in plans[1:]:
                rounds = self._rounds(len(plan.mbs))
                for mb in plan.mbs:
                    mb.old_logp, _, sampler = self._token_logps(mb, sampler=plan.use_is)
                    mb.old_logp_sampler = sampler if plan.use_is else None
                self._fill(rounds, len(plan.mbs))
        return [self._optimizer_step(role, plan, epoch, k)
                for epoch in range(self.cfg.ppo_epochs) for k, plan in enumerate(plans)]

    def _plan(self, role: str, trajs: list[Trajectory], adv: list[float], weights: list[float] | None,
              temps: list[float], version: int) -> "_Plan":
        """One mini-batch's micro-batches with their loss inputs (reference log-probs included)."""
        cfg = self.cfg
        n_tokens = sum(int(bool(m)) for t in trajs for m in t.loss_mask)
        plan = _Plan(trajs=trajs, n_tokens=n_tokens, stats=batch_stats(trajs, adv, version))
        shared_ref = cfg.kl_coef > 0 and self._ref_model is None  # the reference runs on the (sharded) model
        if n_tokens == 0:
            if shared_ref:  # fsdp2: the other ranks' reference forwards
                self._fill(self._rounds(0), 0)
            return plan
        behaviour = [has_behaviour(t) for t in trajs]
        plan.use_is = cfg.tis_cap is not None and any(behaviour)
        plan.mbs = build_micro_batches(trajs, temps, cfg.micro_batch_tokens, self.device, self.share_prompts,
                                       [truncation(t) for t in trajs] if plan.use_is else None)
        eps_high = self._eps_high(role, trajs)
        rounds = self._rounds(len(plan.mbs)) if shared_ref else 0
        for mb in plan.mbs:
            mb.advantages, mb.weights, mb.eps_high = mb.per_row(adv), mb.per_row(weights), mb.per_row(eps_high)
            if plan.use_is:
                mb.behaviour_rows = mb.per_row([float(h) for h in behaviour])
                mb.behaviour_logp = torch.zeros_like(mb.mask)
                for j, i in enumerate(mb.rows):
                    lp = trajs[i].behaviour_logprobs
                    mb.behaviour_logp[j, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
            if cfg.kl_coef > 0:
                mb.ref_logp = self._ref_logps(mb)
        if shared_ref:
            self._fill(rounds, len(plan.mbs))
        return plan

    def _optimizer_step(self, role: str, plan: "_Plan", epoch: int, index: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if plan.n_tokens == 0:  # nothing the policy produced: count it, change nothing
            if self.dist is not None:  # other ranks may have tokens: take part in their step's collectives
                self.dist.idle_steps(self, role, 1)
                return {}
            return {**plan.stats, "skipped": 1.0, "time_s": 0.0}
        cfg, trajs, mbs = self.cfg, plan.trajs, plan.mbs
        key = self._key(role)
        opt, sched = self._optim[key]
        totals = dict(total_tokens=float(plan.n_tokens), total_seqs=float(len(trajs)),
                      max_len=cfg.loss_norm_len or max(len(t.completion_ids) for t in trajs))
        if self.dist is not None:  # data-parallel ranks: normalise by the whole batch (learner/distributed.py)
            totals = self.dist.totals(totals)
        picks = self.cov_picks(role, plan) if cfg.entropy_control != "none" else None
        acc = MetricMean()
        lr = sched.get_last_lr()[0]
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        rounds = self._rounds(len(mbs))
        for k, mb in enumerate(mbs):
            want_sampler = plan.use_is and mb.old_logp_sampler is None
            logp, ent, sampler = self._token_logps(mb, entropy=epoch == 0, sampler=want_sampler)
            if mb.old_logp is None:
                mb.old_logp = logp.detach()  # the first mini-batch: weights are unchanged until its step, exact
            if want_sampler:
                mb.old_logp_sampler = sampler
            inp = PolicyLossInputs(logp=logp, old_logp=mb.old_logp, advantages=mb.advantages, mask=mb.mask,
                                   ref_logp=mb.ref_logp, behaviour_logp=mb.behaviour_logp,
                                   old_logp_sampler=mb.old_logp_sampler, behaviour_rows=mb.behaviour_rows,
                                   eps_high=mb.eps_high, weights=mb.weights, cov_pick=picks[k] if picks else None)
            loss, m = policy_loss(inp, cfg, **totals)
            if self.fsdp is not None and not loss.requires_grad:  # every rank's backward reduce-scatters
                loss = loss + logp.sum() * 0.0
            if loss.requires_grad:
                loss.backward()
            loss_sum += float(loss.detach())
            acc.add(m, float(mb.mask.sum()))
            if epoch == 0:
                acc.add({"entropy": float((ent * mb.mask).sum() / mb.mask.sum().clamp(min=1))}, float(mb.mask.sum()))
            del logp, ent, sampler, loss, inp
        self._fill(rounds, len(mbs), backward=True)
        if self.dist is not None:  # the full batch's gradient on every rank, before the clip
            self.dist.all_reduce_grads(self._params[key])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params[key], cfg.max_grad_norm))
        opt.step()
        sched.step()
        if self._trim is not None:
            self._trim(0)
        self.step += 1
        for r in (self.roles if not self.lora else (role,)):  # full FT: every role's policy just changed
            self.policy_version[r] += 1
        elapsed = time.perf_counter() - t0
        metrics = {**plan.stats, **acc.result()}
        metrics.update(loss=loss_sum, grad_norm=grad_norm, lr=lr, tokens=float(plan.n_tokens),
                       micro_batches=float(len(mbs)), time_s=elapsed, tokens_per_s=plan.n_tokens / elapsed,
                       seq_tokens=float(sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajs)),
                       forward_tokens=float(sum(mb.forward_tokens for mb in mbs)),
                       policy_version=float(self.policy_version[role]), epoch=float(epoch),
                       mini_batch=float(index))
        return metrics

    def cov_picks(self, role: str, plan: "_Plan | None") -> list[Tensor]:
        """Clip-Cov/KL-Cov's tokens for this optimizer step, chosen over all its micro-batches and ranks
        (learner/entropy.py) from a no-grad forward; `plan` None: a rank with no share takes part."""
        cfg, mbs, items = self.cfg, plan.mbs if plan else [], []
        rounds = self._rounds(len(mbs))
        with torch.no_grad():
            for mb in mbs:
                logp = self._token_logps(mb)[0]
                # the first mini-batch's proximal log-probs come from its training forward (ratio exactly 1,
                # also under LoRA dropout): here, as there, the ratio is 1
                old = logp if mb.old_logp is None else mb.old_logp
                ids = [plan.trajs[i].traj_id for i in mb.rows]
                eps = cfg.eps_high if mb.eps_high is None else mb.eps_high.view(-1, 1)
                items.append(StepTokens(mb.advantages.view(-1, 1).expand_as(logp), logp, old, mb.mask,
                                        priorities(f"{self.seed}/{role}/{self.step}", ids, logp.shape[1]), eps))
        self._fill(rounds, len(mbs))
        ratio = cfg.kl_cov_ratio if cfg.entropy_control == "kl_cov" else cfg.clip_cov_ratio
        d = self.dist
        return select(items, cfg.entropy_control, ratio, eps_low=cfg.eps_low, lb=cfg.clip_cov_lb,
                      ub=cfg.clip_cov_ub, reduce_sum=d.reduce_sum if d else None, gather=d.gather if d else None)

    # ------------------------------------------------------------------------------------ weights out
    def export(self, role: str, out_dir: str | Path | None = None) -> AdapterUpdate | FullWeightsUpdate:
        """The role's current weights for the rollout engines.

        LoRA: `out_dir` becomes a peft adapter directory (adapter_config.json + adapter_model.safetensors),
        written atomically, which vLLM's LoRARequest and the hf engine load. Full: a CPU state dict copy.
        """
        self._check_role(role)
        version = self.policy_version[role]
        full = self.fsdp.full_state() if self.fsdp is not None else None  # fsdp2: every rank gathers
        if not self.lora:
            sd = full or {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            return FullWeightsUpdate(state_dict=sd, version=version)
        if out_dir is None:
            raise ValueError("export of a LoRA adapter needs out_dir")
        if self.fsdp is not None and self.dist.rank != 0:  # rank 0 writes
            return AdapterUpdate(name=role, path=str(Path(out_dir).resolve()), version=version)
        with atomic_dir(out_dir) as tmp:
            self.model.save_pretrained(str(tmp), selected_adapters=[role], state_dict=full)
            sub = tmp / role  # peft writes a non-"default" adapter into a subdirectory named after it
            if sub.is_dir():
                for f in sub.iterdir():
                    f.rename(tmp / f.name)
                sub.rmdir()
        return AdapterUpdate(name=role, path=str(Path(out_dir).resolve()), version=version)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, root: str | Path) -> Path:
        """Write `root/step-XXXXXXXX/` atomically, then point `root/latest` at it; prune old ones."""
        return save_learner(self, root)

    def load_checkpoint(self, path: str | Path) -> Path:
        """Restore weights, optimizers, schedulers, RNG states, step and versions from a checkpoint (or root)."""
        return load_learner(self, path)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> "Learner":
        """A learner rebuilt from the configs stored in the checkpoint, with its state restored."""
        ck = resolve_checkpoint(path)
        state = json.loads((ck / "state.json").read_text())
        learner = cls(ModelConfig.model_validate(state["model"]), LearnerConfig.model_validate(state["learner"]),
                      roles=state["roles"], seed=state["seed"], device=device)
        learner.load_checkpoint(ck)
        return learner


# ------------------------------------------------------------------------------------------- helpers
def _is_adapter_param(name: str, role: str) -> bool:
    parts = name.split(".")
    return role in parts and any(p.startswith("lora_") for p in parts)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Plan:
    """One mini-batch of a rollout batch: its trajectories, micro-batches and batch statistics."""

    trajs: list[Trajectory]
    n_tokens: int
    stats: dict[str, float]
    mbs: list[MicroBatch] = field(default_factory=list)
    use_is: bool = False
