"""Next-token sampling math for the hf backend, written to match vLLM's sampler step for step.

vLLM (v1/sample/sampler.py) samples by: temperature < 1e-5 -> greedy on the raw logits; else divide by
temperature, mask with top-k then top-p (top-p keeps the smallest set whose probability reaches p, at
least one token), renormalise, draw. With `logprobs_mode="processed_logprobs"` the returned logprob is
log_softmax of exactly those processed logits; greedy rows get log_softmax of the raw logits. These
functions reproduce that, so both backends report the same numbers for the same model.
"""
from __future__ import annotations

import torch

GREEDY_EPS = 1e-5  # vLLM _SAMPLING_EPS


def processed_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature-scaled, top-k then top-p masked logits (masked entries -inf); float32, [B, V]."""
    logits = logits.float()
    if temperature < GREEDY_EPS:
        return logits
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row (row r uses generators[r]); return (tokens [B], their logprobs [B])."""
    processed = processed_logits(logits, temperature, top_k, top_p)
    logprobs = processed.log_softmax(dim=-1)
    if temperature < GREEDY_EPS:
        tokens = processed.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        tokens = torch.cat(
            [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
        )
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
