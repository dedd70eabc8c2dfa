"""Turning trajectories into per-token log-probs cheaply: micro-batch packing and the two forward paths.

- Only trained tokens reach the LM head: the hidden states of positions whose next token has loss_mask 1
  are gathered first, so prompt and tool-output positions never enter the [tokens, vocab] matmul.
- Prompt sharing: GRPO samples G completions per prompt, and a plain batch runs that prompt G times. With
  sharing, each distinct prompt in a micro-batch runs once, and its KV cache (still in the autograd graph,
  so gradients through the prompt are exact) is fanned out to its samples, whose completions then run
  against it: the prompt costs 1/G of the plain path. The rollout engines prefill the same way. It needs
  the KV cache inside the layers, which transformers' gradient checkpointing switches off, so the learner
  uses it only without checkpointing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from selfplay.types import Trajectory


@dataclass
class MicroBatch:
    """The tensors of one forward. b rows; T = longest completion; n = trained tokens.

    Plain path: `input_ids` [b, L] prompt+completion right-padded (real tokens never attend to the pads, so no
    attention mask is needed) and `score_pos` [b, L-1], the positions whose next token is trained.
    Shared path: `prompt_ids` [U, P] distinct prompts right-padded, `prompt_len` [U], `row_prompt` [b] (which
    prompt each row continues), `completion_ids` [b, T] right-padded.
    """

    rows: list[int]  # indices into the step's trajectory list
    labels: Tensor  # [n] the trained tokens, row-major
    temperature: Tensor  # [n] sampling temperature of each trained token's sequence
    mask: Tensor  # [b, T] 1.0 where a completion token is trained
    top_p: Tensor | None = None  # [n] the sampler's top-p per trained token (None: no truncation anywhere)
    top_k: Tensor | None = None  # [n] the sampler's top-k (0 = off)
    input_ids: Tensor | None = None
    score_pos: Tensor | None = None
    prompt_ids: Tensor | None = None
    prompt_len: Tensor | None = None
    row_prompt: Tensor | None = None
    completion_ids: Tensor | None = None
    # filled by the learner: per-row loss inputs and cached log-probs
    advantages: Tensor | None = None  # [b]
    weights: Tensor | None = None  # [b]
    eps_high: Tensor | None = None  # [b]
    behaviour_logp: Tensor | None = None  # [b, T]
    behaviour_rows: Tensor | None = None  # [b] 1.0 where the engine returned behaviour log-probs
    ref_logp: Tensor | None = None
    old_logp: Tensor | None = None
    old_logp_sampler: Tensor | None = None  # [b, T] proximal log-probs under the sampler's truncation

    @property
    def forward_tokens(self) -> int:
        """Positions one forward runs through the backbone, padding included."""
        if self.input_ids is not None:
            return self.input_ids.numel()
        return self.prompt_ids.numel() + self.completion_ids.numel()

    def per_row(self, values: Sequence[float] | None) -> Tensor | None:
        if values is None:
            return None
        return torch.tensor([values[i] for i in self.rows], dtype=torch.float32, device=self.mask.device)


def pack_micro_batches(lengths: Sequence[int], max_tokens: int,
                       groups: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """Row indices packed longest-first so that rows x longest row <= max_tokens (a longer row goes alone).

    With `groups` (rows sharing a prompt), a group stays in one micro-batch unless it alone exceeds the budget,
    in which case it is split into chunks that do fit. Each returned list starts with its longest row.
    """
    units = [[i] for i in range(len(lengths))] if groups is None else [list(g) for g in groups if g]
    chunks: list[list[int]] = []
    for unit in units:
        chunk: list[int] = []
        for i in sorted(unit, key=lambda i: -lengths[i]):
            if chunk and lengths[chunk[0]] * (len(chunk) + 1) > max_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(i)
        chunks.append(chunk)
    chunks.sort(key=lambda c: -lengths[c[0]])
    out: list[list[int]] = []
    for chunk in chunks:
        if out and lengths[out[-1][0]] * (len(out[-1]) + len(chunk)) <= max_tokens:
            out[-1].extend(chunk)
        else:
            out.append(list(chunk))
    return out


def build_micro_batches(trajs: Sequence[Trajectory], temps: Sequence[float], max_tokens: int,
                        device: torch.device, share_prompts: bool,
                        truncation: Sequence[tuple[float, int]] | None = None) -> list[MicroBatch]:
    """Micro-batches of `trajs`; `truncation[i]` = (top_p, top_k) the sampler used for trajectory i."""
    lengths = [len(t.prompt_ids) + len(t.completion_ids) for t in trajs]
    groups = None
    if share_prompts:
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(trajs):
            by_prompt.setdefault(tuple(t.prompt_ids), []).append(i)
        groups = list(by_prompt.values())
    out = []
    for rows in pack_micro_batches(lengths, max_tokens, groups):
        T = max(1, max(len(trajs[i].completion_ids) for i in rows))
        mask = np.zeros((len(rows), T), dtype=np.float32)
        for j, i in enumerate(rows):
            mask[j, :len(trajs[i].loss_mask)] = np.asarray(trajs[i].loss_mask, dtype=bool)
        counts = mask.sum(1).astype(np.int64)
        temp = np.repeat(np.asarray([temps[i] for i in rows], dtype=np.float32), counts)
        distinct = list(dict.fromkeys(tuple(trajs[i].prompt_ids) for i in rows))
        fields = (_shared_inputs if share_prompts and len(distinct) < len(rows) else _plain_inputs)(
            [trajs[i] for i in rows], mask.astype(bool), distinct)
        if truncation is not None:
            fields["top_p"] = np.repeat(np.asarray([truncation[i][0] for i in rows], dtype=np.float32), counts)
            fields["top_k"] = np.repeat(np.asarray([truncation[i][1] for i in rows], dtype=np.int64), counts)
        mb = MicroBatch(rows=rows, temperature=torch.from_numpy(temp).to(device),
                        mask=torch.from_numpy(mask).to(device),
                        **{k: torch.from_numpy(v).to(device) for k, v in fields.items()})
        out.append(mb)
    return out


def _plain_inputs(trajs: list[Trajectory], mask: np.ndarray, distinct) -> dict[str, np.ndarray]:
    L = max(len(t.prompt_ids) + len(t.completion_ids) for t in trajs)
    ids = np.zeros((len(trajs), L), dtype=np.int64)
    pos = np.zeros((len(trajs), L - 1), dtype=bool)
    for j, t in enumerate(trajs):
        P, C = len(t.prompt_ids), len(t.completion_ids)
        ids[j, :P], ids[j, P:P + C] = t.prompt_ids, t.completion_ids
        pos[j, P - 1:P - 1 + C] = mask[j, :C]
    return {"input_ids": ids, "score_pos": pos, "labels": ids[:, 1:][pos]}


def _shared_inputs(trajs: list[Trajectory], mask: np.ndarray, distinct) -> dict[str, np.ndarray]:
    index = {p: u for u, p in enumerate(distinct)}
    P = max(len(p) for p in distinct)
    prompt_ids = np.zeros((len(distinct), P), dtype=np.int64)
    for u, p in enumerate(distinct):
        prompt_ids[u, :len(p)] = p
    comp = np.zeros(mask.shape, dtype=np.int64)
    for j, t in enumerate(trajs):
        comp[j, :len(t.completion_ids)] = t.completion_ids
    return {"prompt_ids": prompt_ids, "prompt_len": np.asarray([len(p) for p in distinct], dtype=np.int64),
            "row_prompt": np.asarray([index[tuple(t.prompt_ids)] for t in trajs], dtype=np.int64),
            "completion_ids": comp, "labels": comp[mask]}


def trained_hidden_states(hf_model, mb: MicroBatch) -> Tensor:
    """[n, H] final hidden states at the positions that predict the trained tokens (row-major)."""
    backbone = hf_model.base_model
    if mb.input_ids is not None:
        hidden = backbone(input_ids=mb.input_ids, use_cache=False).last_hidden_state
        return hidden[:, :-1][mb.score_pos]
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    prompt = backbone(input_ids=mb.prompt_ids, past_key_values=cache, use_cache=True).last_hidden_state
    last = prompt[torch.arange(len(mb.prompt_len), device=prompt.device), mb.prompt_len - 1]  # predicts token 0
    cache.batch_select_indices(mb.row_prompt)  # fan each prompt's KV out to its rows (differentiable)
    P, T = mb.prompt_ids.shape[1], mb.completion_ids.shape[1]
    prompt_valid = torch.arange(P, device=prompt.device)[None, :] < mb.prompt_len[:, None]
    attention = torch.cat([prompt_valid[mb.row_prompt], prompt_valid.new_ones(len(mb.rows), T)], dim=1)
    positions = mb.prompt_len[mb.row_prompt][:, None] + torch.arange(T, device=prompt.device)[None, :]
    hidden = backbone(input_ids=mb.completion_ids, attention_mask=attention.long(), position_ids=positions,
                      past_key_values=cache, use_cache=True).last_hidden_state
    if cache.get_seq_length() != P + T:  # a model whose layers skip the cache would score without the prompt
        raise RuntimeError(f"{type(hf_model).__name__}'s layers did not extend the prompt's KV cache "
                           f"({cache.get_seq_length()} positions, expected {P + T}): set learner.prompt_sharing=false")
    hidden = torch.cat([last[mb.row_prompt][:, None], hidden[:, :-1]], dim=1)  # [b, T]: predictor of token t
    return hidden[mb.mask.bool()]


class ChunkedTokenLogprob(torch.autograd.Function):
    """log p(label) and entropy of temperature-scaled logits (h @ W.T + b, optional Gemma softcap), computed
    `chunk` tokens at a time, so no [tokens, vocab] buffer ever exists: peak logit memory is a few
    [chunk, vocab] buffers whatever the micro-batch (TRL's fused LM head and Liger's fused linear cross-entropy
    bound it the same way). Entropy is a metric: it carries no gradient. With `top_p`/`top_k` (per token), a
    third output holds log p(label) under the sampler's truncation (`nucleus_logprob`), no gradient; without
    them it is `logp` again.

    Backward. d logp / dz = onehot(label) - softmax(z), so with the head frozen (LoRA: only the hidden states
    need a gradient) d logp / dh = (c_label W[label] - sum_v p_v c_v W_v) / t, where c = 1 - tanh^2 under a
    softcap and 1 otherwise. The forward computes the expectation E_p[c W] ([tokens, hidden]) while each
    chunk's softmax is at hand, and backward is a gather: nothing of size vocab is kept or recomputed, and the
    FLOPs are those of the usual backward matmul. When the head's weight or bias trains (full fine-tuning,
    tied embeddings), backward needs every token's softmax: it recomputes each chunk's logits (one chunk:
    keeps its softmax instead)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temps, chunk: int, softcap: float | None, dtype, entropy: bool,
                top_p=None, top_k=None):
        n, acc = hidden.shape[0], _acc_dtype(weight, dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        expect = want_h and not (want_w or want_b)  # frozen head: the backward is folded into this pass
        logp = hidden.new_empty(n, dtype=acc)
        ent = hidden.new_zeros(n, dtype=acc)
        trunc = None if top_p is None else hidden.new_empty(n, dtype=acc)
        e_w = hidden.new_empty(n, weight.shape[1], dtype=acc) if expect else None  # E_p[c W] per token
        c_label = hidden.new_ones(n, dtype=acc) if expect and softcap else None
        kept = (None, None)
        for s in range(0, n, chunk):
            z, tanh = _chunk_logits(hidden[s:s + chunk], weight, bias, temps[s:s + chunk], softcap, dtype)
            probs = z.softmax(-1)
            logz = z.logsumexp(-1)
            lab = labels[s:s + chunk, None]
            logp[s:s + chunk] = z.gather(-1, lab).squeeze(-1) - logz
            if entropy:
                ent[s:s + chunk] = logz - (probs * z).sum(-1)
            if trunc is not None:
                trunc[s:s + chunk] = nucleus_logprob(z, labels[s:s + chunk], top_p[s:s + chunk], top_k[s:s + chunk])
            if expect:
                if tanh is not None:
                    t_lab = tanh.gather(-1, lab).squeeze(-1)
                    c_label[s:s + chunk] = 1 - t_lab * t_lab
                    probs = probs.mul_(1 - tanh * tanh)
                w = weight.to(dtype or weight.dtype)
                e_w[s:s + chunk] = (probs.to(w.dtype) @ w).to(acc)
            elif n <= chunk and (want_w or want_b):
                kept = (probs, tanh)
            del z, probs, tanh
        if expect:
            ctx.save_for_backward(weight, labels, temps, e_w, c_label)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, temps, *kept)
        ctx.chunk, ctx.softcap, ctx.dtype, ctx.expect, ctx.h_dtype = chunk, softcap, dtype, expect, hidden.dtype
        trunc = logp.detach().clone() if trunc is None else trunc
        ctx.mark_non_differentiable(ent, trunc)
        return logp, ent, trunc

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_trunc):
        none = (None,) * 8
        if ctx.expect:  # d logp / dh = (c_label W[label] - E_p[c W]) / t
            weight, labels, temps, e_w, c_label = ctx.saved_tensors
            w_label = weight[labels].to(e_w.dtype)
            if c_label is not None:
                w_label = w_label * c_label[:, None]
            gh = (g_logp.to(e_w.dtype) / temps.to(e_w.dtype))[:, None] * (w_label - e_w)
            return (gh.to(ctx.h_dtype), None, None, *none)
        hidden, weight, bias, labels, temps, kept_probs, kept_tanh = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtype = ctx.dtype or weight.dtype
        gh = torch.zeros_like(hidden) if want_h else None
        acc = _acc_dtype(weight, ctx.dtype)
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g, t = hidden[s:s + ctx.chunk], g_logp[s:s + ctx.chunk, None].to(acc), temps[s:s + ctx.chunk, None]
            if kept_probs is not None:
                probs, tanh = kept_probs, kept_tanh
            else:
                z, tanh = _chunk_logits(h, weight, bias, temps[s:s + ctx.chunk], ctx.softcap, ctx.dtype)
                probs = z.softmax(-1)
            dz = -probs * g  # d logp / d z = onehot(label) - softmax(z)
            dz.scatter_add_(-1, labels[s:s + ctx.chunk, None], g)
            dz = dz / t
            if tanh is not None:
                dz = dz * (1 - tanh * tanh)
            if want_h:
                gh[s:s + ctx.chunk] = (dz.to(dtype) @ weight.to(dtype)).to(gh.dtype)
            if want_w:
                gw += (dz.t().to(dtype) @ h.to(dtype)).to(acc)
            if want_b:
                gb += dz.sum(0)
        return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), *none)


# Logits per LM-head chunk: 2**23 fp32 = 32 MB per [chunk, vocab] buffer (170 tokens at a 49k vocabulary), a few
# of them alive at once (logits, softmax, their product for the entropy).
HEAD_CHUNK_ELEMENTS = 2**23
NUCLEUS_FAST_K = 256  # candidates read with topk before falling back to a full sort of the row


@torch.no_grad()
def nucleus_logprob(z: Tensor, labels: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """log p(label) under the sampler's truncation: temperature-scaled logits `z` [c, V], then top-k, then
    top-p, renormalised over the kept tokens; -inf for a label outside them. The rule is vLLM's sampler
    (v1/sample/ops/topk_topp_sampler; selfplay/engines/sampling.py reproduces it for the hf engine): a token
    is kept when the probability mass strictly above it is < top_p (the top token always). The kept set is
    found among the `NUCLEUS_FAST_K` most likely tokens (a topk, ~30x cheaper than sorting the vocabulary);
    rows whose nucleus is larger are sorted in full."""
    c, V = z.shape
    out = z.gather(-1, labels[:, None]).squeeze(-1) - z.logsumexp(-1)  # rows without truncation
    trunc = (top_p < 1.0) | ((top_k > 0) & (top_k < V))
    if not bool(trunc.any()):
        return out
    rows = trunc.nonzero().squeeze(1)
    K = min(V, NUCLEUS_FAST_K)
    vals = z[rows].topk(K, dim=-1).values  # descending
    fits = _nucleus_fits(z[rows], vals, top_p[rows], top_k[rows])
    slow = rows[~fits]
    if slow.numel():
        full = z[slow].sort(dim=-1, descending=True).values
        res = _nucleus_from_sorted(z[slow], full, labels[slow], top_p[slow], top_k[slow], z[slow].logsumexp(-1))
        out[slow] = res
    fast = rows[fits]
    if fast.numel():
        out[fast] = _nucleus_from_sorted(z[fast], vals[fits], labels[fast], top_p[fast], top_k[fast],
                                         z[fast].logsumexp(-1))
    return out


def _nucleus_fits(z: Tensor, top_vals: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """Rows whose kept set lies inside the `top_vals` candidates."""
    K = top_vals.shape[1]
    k_on = (top_k > 0) & (top_k < z.shape[1])
    if K == z.shape[1]:
        return torch.ones_like(top_p, dtype=torch.bool)
    mass = (top_vals - z.logsumexp(-1, keepdim=True)).exp()  # full-softmax mass of each candidate
    within_k = k_on & (top_k <= K)
    # with top-k inside the candidates, top-p acts on the top-k renormalised mass: always resolvable
    return within_k | (~k_on & (mass.sum(-1) >= top_p))


def _nucleus_from_sorted(z: Tensor, vals: Tensor, labels: Tensor, top_p: Tensor, top_k: Tensor,
                         logz_full: Tensor) -> Tensor:
    """`vals` [r, K] holds each row's K largest logits, descending, and contains the whole kept set."""
    K = vals.shape[1]
    pos = torch.arange(K, device=vals.device)[None, :]
    k_on = (top_k > 0) & (top_k < z.shape[1])
    in_k = ~k_on[:, None] | (pos < top_k[:, None])
    # top-k first: renormalise over the top-k (vLLM applies top-k, then top-p on what is left)
    logz_k = torch.where(k_on, vals.masked_fill(~in_k, -torch.inf).logsumexp(-1), logz_full)
    p = (vals - logz_k[:, None]).exp().masked_fill(~in_k, 0.0)
    above = p.cumsum(-1) - p  # mass strictly above each candidate
    keep = in_k & (above < top_p[:, None])
    keep[:, 0] = True
    logz = vals.masked_fill(~keep, -torch.inf).logsumexp(-1)
    threshold = vals.masked_fill(~keep, torch.inf).min(-1).values
    z_label = z.gather(-1, labels[:, None]).squeeze(-1)
    return torch.where(z_label >= threshold, z_label - logz, torch.full_like(z_label, -torch.inf))


def _acc_dtype(weight: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Softmax and accumulation precision: float32 at least (bf16 logits are cast up)."""
    return torch.promote_types(dtype or weight.dtype, torch.float32)


def _chunk_logits(h, weight, bias, temps, softcap, dtype):
    acc = _acc_dtype(weight, dtype)
    dtype = dtype or weight.dtype
    raw = (h.to(dtype) @ weight.to(dtype).t()).to(acc)
    if bias is not None:
        raw = raw + bias.to(acc)
    tanh = None
    if softcap:
        tanh = torch.tanh(raw / softcap)
        raw = tanh * softcap
    return raw / temps[:, None], tanh


def token_logprobs(hf_model, mb: MicroBatch, *, autocast, head_dtype: torch.dtype | None = None,
                   softcap: float | None = None, entropy: bool = False, sampler: bool = False,
                   chunk_elements: int = HEAD_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor, Tensor]:
    """[b, T] log-probs of the trained tokens (0 elsewhere) under temperature-scaled logits, entropies
    (zeros unless asked) and, with `sampler`, log-probs under the sampler's top-k/top-p truncation
    (`mb.top_p`/`mb.top_k`; else a copy of the first). The LM head runs in `head_dtype` (None: the
    weight's) in chunks of `chunk_elements // vocab` tokens."""
    with autocast():
        hidden = trained_hidden_states(hf_model, mb)  # [n, H]
    head = hf_model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():  # a scoring pass: no gradient, whatever the head's requires_grad says
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    chunk = max(16, chunk_elements // weight.shape[0])
    top_p, top_k = (mb.top_p, mb.top_k) if sampler and mb.top_p is not None else (None, None)
    flat, flat_ent, flat_trunc = ChunkedTokenLogprob.apply(hidden, weight, bias, mb.labels, mb.temperature,
                                                           chunk, softcap, head_dtype, entropy, top_p, top_k)
    sel = mb.mask.bool()
    logp = flat.new_zeros(mb.mask.shape).masked_scatter(sel, flat)
    ent = flat_ent.new_zeros(mb.mask.shape).masked_scatter(sel, flat_ent)
    trunc = flat_trunc.new_zeros(mb.mask.shape).masked_scatter(sel, flat_trunc)
    return logp, ent, trunc
