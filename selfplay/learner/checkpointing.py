"""Activation checkpointing per decoder layer that keeps the KV cache, so prompt sharing works with it.

Without checkpointing, a LoRA step keeps every layer's intermediate activations for backward: on the
embedded 135M model (30 layers, fp32) 1.35 MB per forward token, 1.8 GB for one 1400-token micro-batch
(measured by walking the autograd graph; docs/learner.md "Memory"). Checkpointing keeps only each layer's
input (2.3 KB per token per layer here) and recomputes the layer in backward (Chen et al. 2016, "Training
Deep Nets with Sublinear Memory Cost"; torch's non-reentrant `torch.utils.checkpoint`).

transformers' own switch (`gradient_checkpointing_enable`) drops the KV cache inside checkpointed layers,
because a layer appends its keys and values to the cache, and the recompute in backward would append them a
second time. The learner's prompt sharing runs completions against a cache (selfplay/learner/scoring.py), so
that switch turned sharing off. Here each checkpointed call remembers what the cache held when the call
began, and its recompute restores that before running the layer again: the layer sees exactly the prefix it
saw in the forward, appends the same keys and values, and gets the same tensors back (torch's determinism
check compares their shapes). The cache is not read after the forward, so the restores do no harm.

transformers logs once "Caching is incompatible with gradient checkpointing ... Setting `use_cache=False`":
it does set that flag, but Llama/Qwen-style layers update a cache they are given whatever the flag says, so
the prompt's cache is still used (tests/test_learner.py checks the shared path and its saved activations,
tests/test_learner_precision.py the gradient against the plain step).
"""
from __future__ import annotations

from functools import partial

from torch.utils.checkpoint import checkpoint


def enable_layer_checkpointing(hf_model) -> bool:
    """Checkpoint every transformers decoder layer of `hf_model`, keeping its KV cache. False when the model's
    layers are not transformers' `GradientCheckpointingLayer` (the caller falls back to transformers' switch,
    which drops the cache)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return False
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._can_checkpoint_with_cache = True  # safe: the recompute replays against the same prefix
        layer._gradient_checkpointing_func = checkpoint_keeping_cache
    return True


def checkpoint_keeping_cache(fn, *args):
    """`fn(*args)` under non-reentrant checkpointing; `fn` is transformers' partial of the layer's call, whose
    `past_key_values` (when set) is restored to its state at this call before every run of `fn`."""
    cache = getattr(fn, "keywords", {}).get("past_key_values")
    if cache is None or not hasattr(cache, "layers"):
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(partial(_replay, fn, cache, _snapshot(cache)), *args, use_reentrant=False)


def _snapshot(cache) -> list[tuple]:
    return [(layer.is_initialized, getattr(layer, "keys", None), getattr(layer, "values", None))
            for layer in cache.layers]


def _replay(fn, cache, snapshot, *args):
    for layer, (initialized, keys, values) in zip(cache.layers, snapshot):
        layer.is_initialized, layer.keys, layer.values = initialized, keys, values
    return fn(*args)
