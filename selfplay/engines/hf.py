"""transformers backend: batched, left-padded, KV-cached sampling with peft adapters swapped in place.

Why a hand-written decode loop instead of `model.generate`: we need per-row seeded generators (same
seed -> same sample, independent of batch composition, like vLLM), the logprob of each sampled token
under the *processed* distribution (generate's `output_logits` would keep [steps, batch, vocab] floats),
stop strings cut exactly like vLLM, and finished rows dropped from the batch as they end. The loop
prefills each distinct prompt once and fans its KV cache out to its n samples.
"""
from __future__ import annotations

import itertools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from selfplay.config import EngineConfig, ModelConfig
from selfplay.engines.base import Prompts, check_adapter, check_params, check_seeds, tokenize_prompts
from selfplay.engines.sampling import sample_next
from selfplay.types import AdapterUpdate, CompletionOutput, FullWeightsUpdate, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One sample being decoded."""

    prompt: int
    sample: int
    budget: int  # max new tokens (max_tokens, capped by max_model_len)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    stop: str | None = None
    text: str | None = None


def find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in `text`: (index, stop string), or None."""
    hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(hits, key=lambda h: (h[0], -len(h[1]))) if hits else None


class HFEngine:
    """The `Engine` contract on a transformers causal LM (CPU or CUDA, picked automatically)."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, seed: int = 0, device: str | None = None):
        from selfplay.models import default_device, load_causal_lm, load_tokenizer, resolve_model_path

        self.path = resolve_model_path(model_cfg.name_or_path, model_cfg.cache_dir)
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_causal_lm(self.path, model_cfg.dtype, self.device, model_cfg.trust_remote_code).eval()
        self.max_model_len = model_cfg.max_model_len
        self.max_batch_size = engine_cfg.max_batch_size
        self.weights_version = 0
        self._seed_source = torch.Generator().manual_seed(seed)  # per-row seeds for unseeded requests
        self._peft = None  # the PeftModel wrapper, once the first adapter arrives
        self._adapters: dict[str, tuple[str, int]] = {}  # name -> (peft adapter slot, version)
        self._request_ids = itertools.count()
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos = set(eos) | ({self.tokenizer.eos_token_id} - {None})

    # ---------------------------------------------------------------- contract
    @property
    def adapter_versions(self) -> dict[str, int]:
        return {name: version for name, (_, version) in self._adapters.items()}

    def reseed(self, seed: int) -> None:
        self._seed_source.manual_seed(seed)

    def generate(self, prompts: Prompts, params: SamplingParams, adapter: str | None = None,
                 seeds: Sequence[int] | None = None) -> list[RequestOutput]:
        """`seeds`: one per prompt, overriding `params.seed` (sample j of prompt i gets `seeds[i] + j`)."""
        self._check_open()
        check_params(params)
        check_adapter(adapter, self.adapter_versions)
        prompt_ids = tokenize_prompts(prompts, self.tokenizer, self.max_model_len)
        check_seeds(seeds, len(prompt_ids))
        rows = []
        for i in sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i])):  # less padding per chunk
            budget = min(params.max_tokens, self.max_model_len - len(prompt_ids[i]))
            rows += [_Row(i, j, budget) for j in range(params.n)]
        row_seeds = [  # vLLM gives the j-th of n samples seed + j; unseeded rows draw from the engine's seed
            seeds[r.prompt] + r.sample if seeds is not None
            else params.seed + r.sample if params.seed is not None
            else int(torch.randint(2**62, (1,), generator=self._seed_source))
            for r in rows
        ]
        with torch.inference_mode(), self._adapter_context(adapter) as model:
            for start in range(0, len(rows), self.max_batch_size):
                chunk = slice(start, start + self.max_batch_size)
                self._decode(model, prompt_ids, rows[chunk], row_seeds[chunk], params)
        by_prompt: dict[int, list[_Row]] = {}
        for r in rows:
            by_prompt.setdefault(r.prompt, []).append(r)
        return [
            RequestOutput(
                request_id=str(next(self._request_ids)),
                prompt=prompts[i] if isinstance(prompts[i], str) else None,
                prompt_token_ids=prompt_ids[i],
                outputs=[self._completion(r, params) for r in sorted(by_prompt[i], key=lambda r: r.sample)],
            )
            for i in range(len(prompt_ids))
        ]

    def update_weights(self, update: AdapterUpdate | FullWeightsUpdate) -> None:
        self._check_open()
        if isinstance(update, AdapterUpdate):
            self._load_adapter(update)
        elif isinstance(update, FullWeightsUpdate):
            self._load_full(update)
        else:
            raise TypeError(f"update must be AdapterUpdate or FullWeightsUpdate, got {type(update).__name__}")

    def close(self) -> None:
        if self.model is None:
            return
        self.model = self._peft = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def __enter__(self) -> "HFEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- decoding
    def _decode(self, model, prompt_ids: list[list[int]], rows: list[_Row], seeds: list[int], params: SamplingParams):
        """Sample `rows` to completion: one prefill per distinct prompt, then one token per step."""
        dev = self.device
        distinct = list(dict.fromkeys(r.prompt for r in rows))
        width = max(len(prompt_ids[i]) for i in distinct)
        ids = torch.full((len(distinct), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(distinct), width), dtype=torch.long)
        for k, i in enumerate(distinct):  # left padding: every row's next token lands in the last column
            ids[k, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            attn[k, width - len(prompt_ids[i]):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        padded = not bool(attn.all())  # no padding (one prompt, GRPO groups): no mask, SDPA's fast path
        out = model(input_ids=ids, attention_mask=attn if padded else None, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        fan_out = torch.tensor([distinct.index(r.prompt) for r in rows], device=dev)
        cache = out.past_key_values
        cache.batch_select_indices(fan_out)
        logits, attn, last_pos = out.logits[fan_out, -1], attn[fan_out], positions[fan_out, -1]
        generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        active = list(range(len(rows)))
        stops = list(params.stop)
        window = 2 * max((len(s) for s in stops), default=0) + 4  # tokens of tail text to scan for stops
        while True:
            tokens, lps = sample_next(
                logits, params.temperature, params.top_k, params.top_p, [generators[a] for a in active]
            )
            keep = []
            for b, (tok, lp) in enumerate(zip(tokens.tolist(), lps.tolist())):
                row = rows[active[b]]
                row.ids.append(tok)
                row.logprobs.append(lp)
                if tok in self._eos:
                    row.finish = "stop"
                elif stops and self._stopped(row, stops, window, params.include_stop_str_in_output):
                    row.finish = "stop"
                elif len(row.ids) >= row.budget:
                    row.finish = "length"
                else:
                    keep.append(b)
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                tokens, attn, last_pos = tokens[idx], attn[idx], last_pos[idx]
                active = [active[b] for b in keep]
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
            last_pos = last_pos + 1
            out = model(
                input_ids=tokens[:, None], attention_mask=attn if padded else None, position_ids=last_pos[:, None],
                past_key_values=cache, use_cache=True,
            )
            logits = out.logits[:, -1]

    def _stopped(self, row: _Row, stops: list[str], window: int, include: bool) -> bool:
        """Check the newest text for a stop string; on a hit fix the row's text cut like vLLM does."""
        tail = self.tokenizer.decode(row.ids[-window:], skip_special_tokens=True)
        if find_stop(tail, stops) is None:
            return False
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        hit = find_stop(text, stops)
        if hit is None:  # the tail decoded differently from the whole (partial characters): no stop yet
            return False
        at, stop = hit
        row.stop, row.text = stop, text[: at + len(stop)] if include else text[:at]
        return True

    def _completion(self, row: _Row, params: SamplingParams) -> CompletionOutput:
        text = row.text if row.text is not None else self.tokenizer.decode(row.ids, skip_special_tokens=True)
        return CompletionOutput(
            index=row.sample, text=text, token_ids=row.ids,
            logprobs=row.logprobs if params.logprobs else None,
            finish_reason=row.finish, stop_reason=row.stop,
        )

    # ---------------------------------------------------------------- weights
    @contextmanager
    def _adapter_context(self, adapter: str | None):
        """The module to run: base weights (adapters disabled) for None, else the named adapter active."""
        if self._peft is None:
            yield self.model
        elif adapter is None:
            with self._peft.disable_adapter():
                yield self._peft
        else:
            self._peft.set_adapter(self._adapters[adapter][0])
            yield self._peft

    def _load_adapter(self, update: AdapterUpdate) -> None:
        """Load the new version beside the old one, then drop the old: the base model is never reloaded."""
        from peft import PeftModel

        if not os.path.isfile(os.path.join(update.path, "adapter_config.json")):
            raise FileNotFoundError(f"adapter {update.name!r}: no adapter_config.json in {update.path}")
        old = self._adapters.get(update.name)
        if old is not None and update.version < old[1]:
            log.warning("ignoring stale adapter %s v%d (have v%d)", update.name, update.version, old[1])
            return
        slot = f"{update.name}__v{update.version}"
        if old is not None and old[0] == slot:
            slot += "_reload"
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, update.path, adapter_name=slot, is_trainable=False)
            self._peft.eval()
        else:
            self._peft.load_adapter(update.path, adapter_name=slot, is_trainable=False)
        self._adapters[update.name] = (slot, update.version)
        if old is not None:
            self._peft.delete_adapter(old[0])

    def _load_full(self, update: FullWeightsUpdate) -> None:
        """Copy tensors into the live parameters (names as the plain HF model has them)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        targets, unknown = [], []
        for name, tensor in update.state_dict.items():
            stem, _, leaf = name.rpartition(".")
            target = params.get(name, params.get(f"{stem}.base_layer.{leaf}"))  # peft wraps targeted layers
            if target is None:
                unknown.append(name)
            elif tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != model's {tuple(target.shape)}")
            else:
                targets.append((target, tensor))
        if unknown:
            raise KeyError(f"FullWeightsUpdate has {len(unknown)} names the model lacks, e.g. {unknown[:3]}")
        with torch.no_grad():
            for target, tensor in targets:
                target.copy_(torch.as_tensor(tensor).to(device=target.device, dtype=target.dtype))
        self.weights_version = update.version

    def _check_open(self) -> None:
        if self.model is None:
            raise RuntimeError("engine is closed")
