"""The engine contract every backend keeps, plus the request checks both backends share.

Callers (roles, evaluation, the loop) depend only on `Engine`; the backend is a config choice
(`engine.backend`), so a run can move between transformers and vLLM without touching role code.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from selfplay.types import RequestOutput, SamplingParams, WeightUpdate

Prompts = Sequence[str] | Sequence[Sequence[int]]


@runtime_checkable
class Engine(Protocol):
    """Generates completions from one base model plus any number of named LoRA adapters.

    `generate` takes raw text (already chat-templated; tokenized without adding special tokens) or
    token-id lists (used verbatim) and returns one `RequestOutput` per prompt with `params.n` samples.
    Each sample's `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution it was
    sampled from (see docs/engines.md, "Logprob semantics"); identical across backends.
    """

    tokenizer: Any
    max_model_len: int  # prompt + completion tokens; callers trim multi-turn histories against it

    @property
    def adapter_versions(self) -> dict[str, int]: ...

    def generate(
        self, prompts: Prompts, params: SamplingParams, adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[RequestOutput]: ...

    def update_weights(self, update: WeightUpdate) -> None: ...

    def reseed(self, seed: int) -> None:
        """Restart the source that requests without `params.seed` draw their seeds from: what is sampled
        afterwards depends on `seed` and the requests alone, not on what the engine generated before (a
        resumed run's fresh engine then samples what the uninterrupted run's engine did)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """An engine that also takes requests one at a time (vLLM): `submit` queues a request and returns its id
    without waiting; `step` advances every queued request by one engine step and returns the ones that
    finished. Requests submitted between steps join the running batch (continuous batching), so a caller
    can keep many independent conversations going: per-conversation multi-turn rollouts (roles/executor.py).
    `generate` must not be called while submitted requests are in flight."""

    @property
    def in_flight(self) -> int: ...

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None) -> str: ...

    def step(self) -> list[tuple[str, RequestOutput]]: ...


def check_seeds(seeds: Sequence[int] | None, n_prompts: int) -> None:
    if seeds is not None and len(seeds) != n_prompts:
        raise ValueError(f"seeds has {len(seeds)} entries for {n_prompts} prompts (one per prompt)")


def check_params(params: SamplingParams) -> None:
    """Reject sampling parameters that neither backend can honour, naming the field."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be selfplay.types.SamplingParams, got {type(params).__name__}")
    problems = []
    if params.n < 1:
        problems.append(f"n={params.n} must be >= 1")
    if params.max_tokens < 1:
        problems.append(f"max_tokens={params.max_tokens} must be >= 1")
    if params.temperature < 0:
        problems.append(f"temperature={params.temperature} must be >= 0")
    if not 0 < params.top_p <= 1:
        problems.append(f"top_p={params.top_p} must be in (0, 1]")
    if params.top_k < 0:
        problems.append(f"top_k={params.top_k} must be >= 0 (0 disables it)")
    if isinstance(params.stop, str) or any(not isinstance(s, str) or not s for s in params.stop):
        problems.append(f"stop={params.stop!r} must be a list of non-empty strings")
    if problems:
        raise ValueError("invalid SamplingParams: " + "; ".join(problems))


def tokenize_prompts(prompts: Prompts, tokenizer: Any, max_model_len: int) -> list[list[int]]:
    """Token ids for each prompt; text is tokenized without special tokens (the chat template has them)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings or a list of token-id lists, not one string")
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
            ids = list(p)
        else:
            raise TypeError(f"prompt {i} must be a str or a list of int token ids, got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; model.max_model_len={max_model_len} leaves no room to generate"
            )
        out.append(ids)
    return out


def check_adapter(adapter: str | None, versions: dict[str, int]) -> None:
    if adapter is not None and adapter not in versions:
        known = ", ".join(sorted(versions)) or "none loaded yet"
        raise KeyError(f"unknown adapter {adapter!r} (known: {known}); send an AdapterUpdate first")
