"""Generation engines: one contract (`Engine`), two backends (transformers `hf`, in-process `vllm`)."""
from __future__ import annotations

from selfplay.config import EngineConfig, ModelConfig
from selfplay.engines.base import Engine

__all__ = ["Engine", "make_engine"]


def make_engine(model_cfg: ModelConfig, engine_cfg: EngineConfig, seed: int = 0) -> Engine:
    """Build the backend `engine_cfg.backend` names; vLLM is imported only when chosen."""
    if engine_cfg.backend == "hf":
        from selfplay.engines.hf import HFEngine

        return HFEngine(model_cfg, engine_cfg, seed=seed)
    if engine_cfg.backend == "vllm":
        from selfplay.engines.vllm import VLLMEngine

        return VLLMEngine(model_cfg, engine_cfg, seed=seed)
    raise ValueError(f"unknown engine.backend {engine_cfg.backend!r} (expected 'hf' or 'vllm')")
