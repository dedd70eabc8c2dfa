"""Typed seams between components: what engines return, what the replay buffer stores.

Plain dataclasses (no torch), so every component and every unit test can use them without a model.
The shapes follow vLLM's `SamplingParams` / `RequestOutput` so the vllm backend maps one to one.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["proposer", "executor"]
FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How to sample; a subset of vLLM's SamplingParams with the same names and meanings."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True  # return the logprob of each sampled token
    include_stop_str_in_output: bool = True


@dataclass
class CompletionOutput:
    """One sample. `logprobs[i]` is the log-probability of `token_ids[i]` under the sampling policy."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    stop_reason: str | None = None  # the stop string that ended it; None for EOS or length


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class AdapterUpdate:
    """New LoRA weights for one role's adapter, in peft's on-disk format (what vLLM's LoRARequest reads)."""

    name: str  # adapter name == role
    path: str  # directory with adapter_config.json + adapter_model.safetensors
    version: int
    # the directory's files, when the update must reach engines on nodes that cannot read `path`
    files: dict[str, bytes] | None = None


@dataclass
class FullWeightsUpdate:
    """New full weights (full fine-tuning); tensors by parameter name, as the HF model names them."""

    state_dict: dict[str, Any]
    version: int


WeightUpdate = AdapterUpdate | FullWeightsUpdate


@dataclass
class Trajectory:
    """One sampled completion ready for the learner; the unit the replay buffer stores.

    `completion_ids`, `loss_mask` and `behaviour_logprobs` are aligned token by token: mask 1 for tokens the
    policy produced, 0 for tool output spliced in by the executor (logprob 0.0 there).
    """

    role: Role
    task_id: str
    group_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    reward: float
    advantage: float = 0.0
    policy_version: int = 0
    p_hat: float | None = None  # the task's majority agreement, used by ADPO
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    traj_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"trajectory {self.traj_id}: completion_ids ({n}), loss_mask ({len(self.loss_mask)}) and "
                f"behaviour_logprobs ({len(self.behaviour_logprobs)}) must have the same length"
            )
