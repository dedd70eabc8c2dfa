"""Learner tests on the embedded model: gradients against an independent reference, micro-batch
invariance, adapter isolation, exact resume, export, and a learning test (reward rises)."""
from __future__ import annotations

import random

import pytest
import torch

from selfplay.learner.checkpoint import atomic_dir, prune_checkpoints, resolve_checkpoint, write_latest
from selfplay.config import LearnerConfig, LoraConfig, ModelConfig
from selfplay.learner.learner import Learner
from selfplay.learner.losses import PolicyLossInputs, policy_loss
from selfplay.learner.scoring import ChunkedTokenLogprob, pack_micro_batches
from selfplay.types import Trajectory

ROLE = "executor"


def make_batch(seed: int = 0, groups: int = 2, per_group: int = 3, role: str = ROLE) -> list[Trajectory]:
    """Random-token trajectories: prompts of different lengths, tool spans masked out, temperature 0.7."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(200, 20000) for _ in range(rng.randrange(6, 14))]
        for k in range(per_group):
            n = rng.randrange(4, 16)
            comp = [rng.randrange(200, 20000) for _ in range(n)]
            mask = [1] * n
            if k == 1 and n > 6:  # a spliced-in tool output: not trained
                mask[2:5] = [0, 0, 0]
            out.append(Trajectory(role=role, task_id=f"t{g}", group_id=f"g{g}", prompt_ids=prompt,
                                  completion_ids=comp, loss_mask=mask, behaviour_logprobs=[0.0] * n,
                                  reward=float(rng.random()), meta={"temperature": 0.7}))
    return out


def lora_cfg(**kw) -> LearnerConfig:
    base = dict(lr=1e-3, max_grad_norm=1e6, kl_coef=0.05, lora=LoraConfig(r=4, alpha=8), adpo=False)
    base.update(kw)
    return LearnerConfig(**base)


def adapter_grads(learner: Learner, role: str) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in learner.model.named_parameters()
            if p.grad is not None and f".{role}." in n}


def adapter_params(learner: Learner, role: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if f".{role}." in n}


def nonzero_lora_b(learner: Learner, seed: int = 1) -> None:
    """peft initialises lora_B = 0, which zeroes every lora_A gradient; perturb so both get gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


# --------------------------------------------------------------------------------------------- pure parts
def test_pack_micro_batches_budget_and_cover():
    lengths = [5, 40, 17, 17, 3, 90, 22, 8]
    for groups in (None, [[0, 1, 2], [3, 4], [5, 6, 7]]):
        packed = pack_micro_batches(lengths, 64, groups)
        assert sorted(i for g in packed for i in g) == list(range(len(lengths)))
        for g in packed:
            assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64
            assert lengths[g[0]] == max(lengths[i] for i in g)
        assert [5] in packed  # the 90-token row exceeds the budget alone and goes by itself
    # a prompt group that fits stays together
    packed = pack_micro_batches([10] * 6, 40, [[0, 2, 4], [1, 3, 5]])
    assert sorted(sorted(g) for g in packed) == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("softcap,chunk", [(None, 3), (3.0, 3), (None, 16)])
def test_chunked_lm_head_matches_autograd(softcap, chunk, train_head):
    """The chunked LM-head log-prob against plain autograd, and gradcheck. Head trained (full fine-tuning):
    several chunks recompute the logits in backward, one chunk keeps its softmax. Head frozen (LoRA): the
    forward folds d logp/dh = (c W[label] - E_p[c W]) / t in, and backward keeps nothing of vocabulary size."""
    g = torch.Generator().manual_seed(0)
    n, H, V = 7, 5, 11
    h = torch.randn(n, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=train_head)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=train_head)
    labels = torch.randint(0, V, (n,), generator=g)
    temps = torch.rand(n, dtype=torch.float64, generator=g) + 0.5
    inputs = (h, w, b) if train_head else (h,)

    def plain(h, w, b):
        z = h @ w.t() + b
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        z = z / temps[:, None]
        return z.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1), z

    lp, ent, _ = ChunkedTokenLogprob.apply(h, w, b, labels, temps, chunk, softcap, None, True)
    want, z = plain(h, w, b)
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-6)
    want_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-6)
    weights = torch.randn(n, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((lp * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # float64 end to end for gradcheck (the function accumulates in float32 otherwise)
    assert torch.autograd.gradcheck(
        lambda *x: ChunkedTokenLogprob.apply(*(x if train_head else (x[0], w, b)), labels, temps, chunk, softcap,
                                             torch.float64, False)[0],
        inputs, eps=1e-6, atol=1e-3, rtol=1e-3)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "ck"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "state.json").write_text("{}")
    with atomic_dir(target) as tmp:  # replacing keeps only the new content
        (tmp / "state.json").write_text('{"v": 2}')
    assert (target / "state.json").read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_latest_pointer_and_prune(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "state.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path)
    write_latest(tmp_path, "step-00000002")
    assert resolve_checkpoint(tmp_path).name == "step-00000002"
    prune_checkpoints(tmp_path, keep=1)  # keeps the newest and the one `latest` names
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000002", "step-00000003"]


def test_a_save_keeps_the_checkpoint_the_last_commit_names(tmp_path):
    """keep_checkpoints=1: a save removes older checkpoints, but not the one `latest` named before it, which
    the run's last commit still names until the driver commits the new one (a kill in between resumes from
    it); the save after that removes it."""
    learner = Learner(ModelConfig(), lora_cfg(keep_checkpoints=1), roles=(ROLE,), seed=0)
    first = learner.save_checkpoint(tmp_path)
    learner.step += 1
    second = learner.save_checkpoint(tmp_path)
    assert first.is_dir() and second.is_dir() and resolve_checkpoint(tmp_path) == second
    learner.step += 1
    third = learner.save_checkpoint(tmp_path)
    assert not first.exists() and second.is_dir() and third.is_dir()


# ------------------------------------------------------------------------------------------ gradients
@pytest.fixture(scope="module")
def batch():
    return make_batch()


def reference_loss(learner: Learner, trajs: list[Trajectory], old=None):
    """The loss written the plain way: one unpadded forward per trajectory over ALL logits, full-batch
    policy_loss. Independent of the learner's padding, packing, LM-head slicing and normalisation."""
    model, cfg = learner.model, learner.cfg
    T = max(len(t.completion_ids) for t in trajs)
    rows, refs = [], []
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        P, C = len(t.prompt_ids), len(t.completion_ids)
        for store, ctx in ((rows, None), (refs, model.disable_adapter())):
            with torch.no_grad() if ctx else torch.enable_grad(), ctx or torch.enable_grad():
                logits = model(input_ids=ids).logits[0, P - 1:P - 1 + C].float() / t.meta["temperature"]
                lp = logits.log_softmax(-1).gather(-1, torch.tensor(t.completion_ids)[:, None]).squeeze(-1)
            store.append(torch.nn.functional.pad(lp, (0, T - C)))
    logp, ref = torch.stack(rows), torch.stack(refs)
    mask = torch.tensor([t.loss_mask + [0] * (T - len(t.loss_mask)) for t in trajs], dtype=torch.float32)
    from selfplay.learner.losses import compute_advantages

    adv = torch.tensor(compute_advantages(trajs, cfg), dtype=torch.float32)
    inp = PolicyLossInputs(logp=logp, old_logp=logp.detach() if old is None else old, advantages=adv, mask=mask,
                           ref_logp=ref)
    loss, _ = policy_loss(inp, cfg, total_tokens=float(mask.sum()), total_seqs=float(len(trajs)), max_len=T)
    return loss, logp.detach()


def test_gradient_matches_reference_and_is_microbatch_invariant(batch):
    """train_step's gradient == the plain reference's gradient: one micro-batch or many, prompts shared
    through the KV cache or run per row; the reference itself passes a finite-difference check."""
    variants = {"one": lora_cfg(micro_batch_tokens=100_000), "many": lora_cfg(micro_batch_tokens=64),
                "unshared": lora_cfg(micro_batch_tokens=64, prompt_sharing=False)}
    learners = {k: Learner(ModelConfig(), c, roles=(ROLE,), seed=3) for k, c in variants.items()}
    ref = Learner(ModelConfig(), lora_cfg(), roles=(ROLE,), seed=3)
    for lr in (*learners.values(), ref):
        nonzero_lora_b(lr)
    metrics = {k: lr.train_step(ROLE, batch) for k, lr in learners.items()}
    assert metrics["one"]["micro_batches"] == 1 and metrics["many"]["micro_batches"] >= 3
    assert metrics["one"]["forward_tokens"] < metrics["unshared"]["forward_tokens"]  # each prompt ran once

    ref.model.train()
    ref.model.set_adapter(ROLE)
    loss, old = reference_loss(ref, batch)
    loss.backward()
    loss = float(loss.detach())
    g_ref = adapter_grads(ref, ROLE)
    assert len(g_ref) > 0
    flat_ref = torch.cat([g_ref[n].flatten() for n in sorted(g_ref)])
    assert flat_ref.norm() > 1e-3
    for k, lr in learners.items():
        g = adapter_grads(lr, ROLE)
        assert set(g) == set(g_ref)
        rel = (torch.cat([g[n].flatten() for n in sorted(g)]) - flat_ref).norm() / flat_ref.norm()
        assert rel < 2e-3, f"{k}: relative gradient error {rel:.2e}"
        assert metrics[k]["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-6)
        assert metrics[k]["grad_norm"] == pytest.approx(float(flat_ref.norm()), rel=2e-3)

    # Finite differences with old/ref fixed: (L(w + h u) - L(w - h u)) / 2h ~= |g| for u = g / |g|.
    params = {n: p for n, p in ref.model.named_parameters() if n in g_ref}
    gnorm = flat_ref.norm()
    h = 1e-2
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for n, p in params.items():
                p.add_(sign * h * g_ref[n] / gnorm)
            values.append(float(reference_loss(ref, batch, old=old)[0]))
            for n, p in params.items():
                p.sub_(sign * h * g_ref[n] / gnorm)
    fd = (values[0] - values[1]) / (2 * h)
    assert fd == pytest.approx(float(gnorm), rel=0.03)


def test_logprobs_match_plain_forward(batch):
    learner = Learner(ModelConfig(), lora_cfg(micro_batch_tokens=128), roles=(ROLE,), seed=0)
    nonzero_lora_b(learner)
    got = learner.logprobs(ROLE, batch)
    base = learner.logprobs(ROLE, batch, reference=True)
    learner.model.set_adapter(ROLE)
    _, want = reference_loss(learner, batch)
    for i, t in enumerate(batch):
        w = [v if m else 0.0 for v, m in zip(want[i, :len(t.completion_ids)].tolist(), t.loss_mask)]
        # fp32, a log-sum-exp over 49k logits taken in chunks: a token at log p = -30 came out 1.1e-4 off
        # (3.8e-6 relative) in one full-suite run, so the bound is relative as well as absolute
        assert got[i] == pytest.approx(w, abs=1e-4, rel=1e-5)
    assert any(abs(a - b) > 1e-3 for g, r in zip(got, base) for a, b in zip(g, r))  # adapter matters


def _saved_for_backward(learner: Learner, mb) -> tuple[float, set[tuple[int, ...]]]:
    """MB of activations one forward keeps for backward (storages saved by autograd, parameters excluded),
    and the shapes saved."""
    params = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    seen: dict[int, int] = {}
    shapes: set[tuple[int, ...]] = set()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
            shapes.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner._token_logps(mb, entropy=True)
    return sum(seen.values()) / 2**20, shapes


def test_checkpointed_layers_keep_only_their_inputs_and_the_prompt_cache():
    """Issue #11's memory: without checkpointing a LoRA step keeps ~1.35 MB of activations per forward token
    (30 layers of the embedded model); checkpointed layers keep their inputs only, and prompt sharing (the KV
    cache) still works under checkpointing. No [tokens, vocab] buffer is kept for backward (frozen LM head)."""
    from selfplay.learner.scoring import build_micro_batches

    learner = Learner(ModelConfig(), lora_cfg(kl_coef=0.0, gradient_checkpointing="on", micro_batch_tokens=10_000),
                      roles=(ROLE,), seed=0, device="cpu")
    assert learner.share_prompts
    learner.model.set_adapter(ROLE)
    learner.model.train()
    trajs = make_batch(seed=7, groups=1, per_group=4)
    (mb,) = build_micro_batches(trajs, [0.7] * len(trajs), 10_000, learner.device, True)
    assert mb.prompt_ids is not None  # the shared path: the prompt ran once, its cache fanned out
    layers = [m for m in learner.model.modules() if getattr(m, "_can_checkpoint_with_cache", False)]
    assert len(layers) == learner.model.config.num_hidden_layers
    on, shapes_on = _saved_for_backward(learner, mb)
    for m in layers:
        m.gradient_checkpointing = False
    off, shapes_off = _saved_for_backward(learner, mb)
    per_token_off = off / mb.forward_tokens
    assert per_token_off > 1.0, per_token_off  # every layer's activations (measured: ~1.35 MB per token)
    assert on < 0.1 * off, (on, off)  # layer inputs (30 x 2.3 KB per token) and the prompt's K/V
    vocab = learner.model.config.vocab_size
    assert not any(vocab in s for s in shapes_on | shapes_off)  # no logits or softmax kept


# ------------------------------------------------------------------------- roles, resume, export, errors
def test_roles_train_only_their_own_adapter(tmp_path):
    learner = Learner(ModelConfig(), lora_cfg(), seed=0)
    base_before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" not in n}
    prop_before = adapter_params(learner, "proposer")
    exe_before = adapter_params(learner, "executor")
    m = learner.train_step("executor", make_batch())
    assert set(m) >= {"loss", "entropy", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max",
                      "grad_norm", "adv_mean", "adv_std", "adv_min", "adv_max", "tokens", "time_s",
                      "tokens_per_s"}
    assert learner.policy_version == {"proposer": 0, "executor": 1}
    assert all(torch.equal(p, prop_before[n]) for n, p in adapter_params(learner, "proposer").items())
    assert any(not torch.equal(p, exe_before[n]) for n, p in adapter_params(learner, "executor").items())
    assert all(torch.equal(p, base_before[n]) for n, p in learner.model.named_parameters() if n in base_before)
    learner.train_step("proposer", make_batch(role="proposer"))
    assert learner.policy_version == {"proposer": 1, "executor": 1}

    up = learner.export("executor", tmp_path / "exe")
    assert up.name == "executor" and up.version == 1
    assert (tmp_path / "exe" / "adapter_config.json").exists()
    assert (tmp_path / "exe" / "adapter_model.safetensors").exists()
    # the exported adapter, loaded by peft on a fresh base, reproduces the learner's log-probs
    from peft import PeftModel

    from selfplay.models import load_causal_lm, resolve_model_path

    fresh = PeftModel.from_pretrained(load_causal_lm(resolve_model_path(), device="cpu"), up.path)
    trajs = make_batch(seed=5)
    t = trajs[0]
    ids = torch.tensor([t.prompt_ids + t.completion_ids])
    with torch.no_grad():
        logits = fresh(input_ids=ids).logits[0, len(t.prompt_ids) - 1:-1] / 0.7
    lp = logits.log_softmax(-1).gather(-1, torch.tensor(t.completion_ids)[:, None]).squeeze(-1)
    assert learner.logprobs("executor", [t])[0] == pytest.approx(lp.tolist(), abs=1e-4)


def test_bad_input_is_rejected_and_empty_batches_skip():
    learner = Learner(ModelConfig(), lora_cfg(), roles=(ROLE,), seed=0)
    with pytest.raises(ValueError, match="keep_advantage has"):
        learner.train_step(ROLE, make_batch(), keep_advantage=[True])
    with pytest.raises(ValueError, match="unknown role"):
        learner.train_step("proposer", make_batch(role="proposer"))
    with pytest.raises(ValueError, match="at least one"):
        learner.train_step(ROLE, [])
    with pytest.raises(ValueError, match="weights has"):
        learner.train_step(ROLE, make_batch(), weights=[1.0])
    with pytest.raises(ValueError, match="for role"):
        learner.train_step(ROLE, make_batch(role="proposer"))
    masked = make_batch()
    for t in masked:
        t.loss_mask = [0] * len(t.loss_mask)
    m = learner.train_step(ROLE, masked)
    assert m["skipped"] == 1.0 and learner.policy_version[ROLE] == 0


def test_replayed_advantages_are_kept_and_fresh_ones_computed():
    from selfplay.learner.losses import compute_advantages

    learner = Learner(ModelConfig(), lora_cfg(), roles=(ROLE,), seed=0)
    batch = make_batch(groups=3)
    batch[0].advantage = 5.0  # a self-imitation replay: its stored advantage is used as is
    learner.train_step(ROLE, batch)
    used = learner.last_advantages
    assert used[batch[0].traj_id] == 5.0
    want = compute_advantages(batch[1:], learner.cfg)
    assert [used[t.traj_id] for t in batch[1:]] == pytest.approx(want)
    assert any(abs(a) > 0.1 for a in want)


def test_resume_is_exact(tmp_path):
    cfg = lora_cfg(ppo_epochs=2, warmup_steps=2)
    b1, b2 = make_batch(seed=1), make_batch(seed=2)
    a = Learner(ModelConfig(), cfg, seed=7)
    a.train_step(ROLE, b1)
    path = a.save_checkpoint(tmp_path / "ck")
    assert (tmp_path / "ck" / "latest").read_text().strip() == path.name
    noise_a = torch.rand(3)  # RNG state after the checkpoint
    m_a = a.train_step(ROLE, b2)
    params_a = adapter_params(a, ROLE)

    b = Learner.from_checkpoint(tmp_path / "ck")
    assert b.policy_version == {"proposer": 0, ROLE: 2} and b.step == 2  # ppo_epochs=2: two optimizer steps
    noise_b = torch.rand(3)
    m_b = b.train_step(ROLE, b2)
    assert torch.equal(noise_a, noise_b)
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=1e-6, abs=1e-9)
    assert m_b["lr"] == m_a["lr"]
    for n, p in adapter_params(b, ROLE).items():
        torch.testing.assert_close(p, params_a[n], rtol=1e-6, atol=1e-7)
    # a fresh learner (different init) that loads the checkpoint ends up identical too
    c = Learner(ModelConfig(), cfg, seed=99)
    c.load_checkpoint(tmp_path / "ck")
    c.train_step(ROLE, b2)
    for n, p in adapter_params(c, ROLE).items():
        torch.testing.assert_close(p, params_a[n], rtol=1e-6, atol=1e-7)


def test_full_finetune_trains_weights_and_keeps_frozen_reference(tmp_path):
    cfg = LearnerConfig(finetune="full", lr=1e-4, kl_coef=0.05, adpo=False)
    learner = Learner(ModelConfig(), cfg, seed=0)
    w = learner.model.get_input_embeddings().weight
    before = w.detach().clone()
    ref_before = learner._ref_model.get_input_embeddings().weight.detach().clone()
    m = learner.train_step(ROLE, make_batch())
    assert m["grad_norm"] > 0 and not torch.equal(w.detach(), before)
    assert torch.equal(learner._ref_model.get_input_embeddings().weight, ref_before)
    assert learner.policy_version == {"proposer": 1, "executor": 1}  # one shared set of weights
    up = learner.export("proposer")
    assert up.version == 1 and torch.equal(up.state_dict["model.embed_tokens.weight"], w.detach())
    learner.save_checkpoint(tmp_path)
    again = Learner.from_checkpoint(tmp_path)
    assert torch.equal(again.model.get_input_embeddings().weight, w.detach())


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_reward_rises_with_lora_through_the_hf_engine(tmp_path):
    """The product loop in miniature: the hf engine samples with the learner's exported adapter, GRPO with
    LoRA trains on it, the rate of completions naming "blue" climbs well above its start; the engine's
    per-token log-probs equal the learner's for the same adapter (what was trained is what is served)."""
    from selfplay.config import EngineConfig
    from selfplay.engines import make_engine
    from selfplay.types import SamplingParams

    cfg = LearnerConfig(lr=1e-3, kl_coef=0.0, adpo=False, lora=LoraConfig(r=8, alpha=16))
    learner = Learner(ModelConfig(), cfg, roles=(ROLE,), seed=0)
    engine = make_engine(ModelConfig(), EngineConfig(backend="hf"), seed=0)
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in ("Name a color.", "What color is the sky?")]
    params = SamplingParams(n=8, temperature=1.0, max_tokens=8)
    rates, mismatch = [], []
    for step in range(14):
        engine.update_weights(learner.export(ROLE, tmp_path / f"v{step}"))
        trajs = []
        for g, out in enumerate(engine.generate(prompts, params, adapter=ROLE)):
            for c in out.outputs:
                trajs.append(Trajectory(role=ROLE, task_id=str(g), group_id=f"{step}-{g}",
                                        prompt_ids=out.prompt_token_ids, completion_ids=c.token_ids,
                                        loss_mask=[1] * len(c.token_ids), behaviour_logprobs=c.logprobs,
                                        reward=float("blue" in c.text.lower()), policy_version=step,
                                        meta={"temperature": params.temperature}))
        if step in (0, 6):
            ours = learner.logprobs(ROLE, trajs)
            mismatch.append(max(abs(a - b) for t, lp in zip(trajs, ours)
                                for a, b in zip(t.behaviour_logprobs, lp)))
        rates.append(sum(t.reward for t in trajs) / len(trajs))
        m = learner.train_step(ROLE, trajs)
        assert m["staleness_mean"] == 0.0
    assert max(mismatch) < 2e-3, f"engine and learner disagree on log-probs by {mismatch}"
    start, end = sum(rates[:3]) / 3, sum(rates[-3:]) / 3
    assert end > start + 0.3, f"reward did not rise: {rates}"
