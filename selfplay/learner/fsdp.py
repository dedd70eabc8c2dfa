"""`learner.strategy: fsdp2`: the learner's model sharded over the ranks with torch's FSDP2 (`fully_shard`).

Layout (as verl's and prime-rl's FSDP2 trainers, TorchTitan's recipe): one `fully_shard` per decoder layer
(the classes the model names in `_no_split_modules`), then one on a root module, `Scorer`, that owns the
whole (peft) model. Parameters live as 1/N shards (DTensors) between forwards; each layer all-gathers its
weights for its forward and backward and reduce-scatters its gradients.

Why a `Scorer` root: the learner never calls the model's own forward (scoring.token_logprobs runs the
backbone, then the LM head only on the trained positions, in a custom autograd function). The head, the
embeddings and the final norm belong to the root group, whose all-gather happens in the root's pre-forward
hook; reading `lm_head.weight` outside a forward would read a shard. So every scoring call is a forward of
`Scorer`, and the head is unsharded for exactly as long as it is used (and for its weight gradient).

Collectives must match across ranks: every forward all-gathers, every backward reduce-scatters. Ranks hold
different shares of a batch (different micro-batch counts, or none), so before each point where a rank runs
its forwards, `rounds` all-reduces the count (max), and after them `fill` runs the missing forwards on a
one-token dummy with a zero loss. Gradients are summed, not averaged (divide factor 1): the loss is already
normalised by the whole batch's totals (distributed.GradSync.totals), exactly as under ddp. Prompt sharing is
off (a shared prompt runs each layer twice in one forward, a plain row once: the all-gathers would differ).

State out and in: `full_state`/`full_optimizer_state` gather the full tensors to CPU on every rank
(a collective; rank 0 writes them); `load_full_state`/`load_full_optimizer_state` shard a full state dict
that every rank read from the checkpoint. FSDP2 needs a process group, so world_size 1 is the plain learner.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from selfplay.learner.scoring import MicroBatch, build_micro_batches, token_logprobs
from selfplay.types import Trajectory

PREFIX = "model."  # the Scorer's name for the learner's model in FQNs


class Scorer(nn.Module):
    """The FSDP2 root: its forward is one scoring call (`scoring.token_logprobs`) on the wrapped model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mb: MicroBatch, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return token_logprobs(hf, mb, **kwargs)


class Sharded:
    """The learner's model under FSDP2, and the helpers the learner calls at its collective points."""

    def __init__(self, model: nn.Module, device: torch.device):
        from torch.distributed.fsdp import fully_shard

        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        blocks = set(getattr(hf, "_no_split_modules", None) or [])
        layers = [m for m in hf.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ValueError(f"fsdp2: {type(hf).__name__} names no decoder layer class (_no_split_modules)")
        for layer in layers:
            fully_shard(layer)
        self.scorer = Scorer(model)
        fully_shard(self.scorer)
        for module in [*layers, self.scorer]:  # per FSDP group: a sum, as the loss is normalised by global totals
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        self.device = device
        dummy = Trajectory(role="executor", task_id="fsdp-pad", group_id="fsdp-pad", prompt_ids=[0],
                           completion_ids=[0], loss_mask=[1], behaviour_logprobs=[0.0], reward=0.0)
        self._dummy = build_micro_batches([dummy], [1.0], 16, device, False)[0]

    def score(self, mb: MicroBatch, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        return self.scorer(mb, kwargs)

    @staticmethod
    def rounds(local: int) -> int:
        """The most forwards any rank runs at this point (agreed BEFORE anyone runs one: a rank still in a
        forward's all-gather must not meet another rank's count exchange)."""
        n = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n)

    def fill(self, rounds: int, done: int, backward: bool, **kwargs: Any) -> None:
        """Run the forwards (and backwards) this rank lacks for the step's collectives to match."""
        for _ in range(rounds - done):
            if backward:
                logp = self.score(self._dummy, **kwargs)[0]
                (logp.sum() * 0.0).backward()
            else:
                with torch.no_grad():
                    self.score(self._dummy, **kwargs)
        if not backward:  # the root stays gathered after a forward without backward; an optimizer step
            self.scorer.reshard()  # must not leave a stale gathered copy behind (every rank calls this)

    # ------------------------------------------------------------------------------------ state
    def full_state(self) -> dict[str, Tensor]:
        """The model's full state dict on CPU (keys as the unsharded model names them); every rank calls."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k[len(PREFIX):]: v for k, v in sd.items()}

    def load_full_state(self, state: dict[str, Tensor]) -> None:
        """Load (part of) a full state dict, keyed as `full_state` gives it; every rank calls."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        res = set_model_state_dict(self.scorer, {PREFIX + k: v for k, v in state.items()},
                                   options=StateDictOptions(full_state_dict=True, strict=False))
        if res.unexpected_keys:
            raise ValueError(f"fsdp2: state has keys this model lacks: {res.unexpected_keys[:3]}")

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.scorer, opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not state.get("state"):  # this role never stepped: a fresh optimizer is the same
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        frozen = [p for p in params if not p.requires_grad]  # peft freezes the inactive role's adapter; torch
        for p in frozen:  # initialises (and then fills) only the state of parameters that take gradients
            p.requires_grad_(True)
        try:
            set_optimizer_state_dict(self.scorer, opt, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        finally:
            for p in frozen:
                p.requires_grad_(False)


def adapter_keys(state: dict[str, Tensor], role: str) -> dict[str, Tensor]:
    """A peft adapter file's keys (adapter name dropped: `...lora_A.weight`) as the model names them
    (`...lora_A.<role>.weight`)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        for i, p in enumerate(parts):
            if p.startswith("lora_") and (i + 1 >= len(parts) or parts[i + 1] != role):
                parts.insert(i + 1, role)
                break
        out[".".join(parts)] = v
    return out


def save_full(state: dict[str, Tensor], path) -> None:
    """A gathered full state dict as safetensors; a tensor shared by two names (tied embeddings) once."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.contiguous()
    save_file(out, str(path))


def load_weights(learner, ck) -> None:
    """A checkpoint's adapters (peft files) or full weights into the sharded model; every rank calls."""
    from safetensors.torch import load_file

    if learner.lora:
        from peft.utils import load_peft_weights

        state: dict[str, Tensor] = {}
        for role in learner.roles:
            weights = load_peft_weights(str(ck / "adapters" / role), device="cpu")
            state.update(adapter_keys(weights, role))
    else:
        state = load_file(str(ck / "model.safetensors"))
    learner.fsdp.load_full_state(state)
