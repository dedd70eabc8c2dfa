"""Our loss and advantages equal TRL's GRPOTrainer on the same inputs (TRL's real code, not a re-implementation).

TRL's `_compute_loss` is called on a real GRPOTrainer built on the embedded model; only the per-token logprob
forward is replaced by our prepared tensor, so everything after it (ratio, clipping, KL, masks, aggregation,
gradient-accumulation normalisation) is TRL's own code. The slow test also runs TRL's real generation and
scoring and compares its advantages and its loss on real model logprobs.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

pytest.importorskip("trl")

from selfplay.config import LearnerConfig  # noqa: E402
from selfplay.learner.losses import PolicyLossInputs, group_advantages, policy_loss  # noqa: E402

MAX_COMPLETION = 8
# TRL loss_type -> our aggregation (docs/losses.md)
MODES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
         "dapo": "token-mean"}


@pytest.fixture(scope="module")
def trl_parts():
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from selfplay.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path("embedded")
    return GRPOConfig, GRPOTrainer, Dataset, path, load_causal_lm, load_tokenizer


_TRAINERS: dict = {}


def make_trainer(trl_parts, tmp_path, *, loss_type, beta, eps=0.2, eps_high=0.28, gas=1, reward_func=None,
                 kl_correction=True):
    """A real GRPOTrainer; cached per setting (building one is cheap, but the ref model doubles the load)."""
    key = (loss_type, beta, eps, eps_high, gas, kl_correction)
    if reward_func is None and key in _TRAINERS:
        return _TRAINERS[key]
    GRPOConfig, GRPOTrainer, Dataset, path, load_causal_lm, load_tokenizer = trl_parts
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, gradient_accumulation_steps=gas,
                      max_completion_length=MAX_COMPLETION, beta=beta, epsilon=eps, epsilon_high=eps_high,
                      loss_type=loss_type, scale_rewards="group", save_strategy="no", seed=0,
                      use_bias_correction_kl=kl_correction)
    ds = Dataset.from_list([{"prompt": "Say hi."}, {"prompt": "Name a colour."}])
    trainer = GRPOTrainer(model=load_causal_lm(path), reward_funcs=[reward_func or (lambda completions, **kw: [0.0] *
                          len(completions))], args=args, train_dataset=ds, processing_class=load_tokenizer(path))
    if reward_func is None:
        _TRAINERS[key] = trainer
    return trainer


def case_seed(*parts) -> int:
    """A seed per test case that is the same in every process (hash() of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 1000


def prepared(B=8, T=MAX_COMPLETION, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05)
    old = logp + (torch.rand(B, T, generator=g) - 0.5) * 0.8
    ref = logp + (torch.rand(B, T, generator=g) - 0.5) * 0.8
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # right padding after EOS
    tool_mask = (torch.rand(B, T, generator=g) > 0.25).long()  # executor tool output spliced in
    tool_mask[:, 0] = 1
    return logp, old, ref, adv, completion_mask, tool_mask


def trl_loss(trainer, logp, old, ref, adv, completion_mask, tool_mask, num_items=None):
    """TRL's _compute_loss on prepared tensors; returns (loss, d loss / d logp)."""
    x = logp.clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (x, torch.zeros_like(x), None)
    B, T = x.shape
    inputs = {"prompt_ids": torch.ones(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": completion_mask,
              "tool_mask": tool_mask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(float(num_items if num_items is not None else
                                                       (completion_mask * tool_mask).sum()))}
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = trainer._compute_loss(trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def our_loss(cfg, logp, old, ref, adv, mask, **totals):
    x = logp.clone().requires_grad_()
    loss, _ = policy_loss(PolicyLossInputs(x, old, adv, mask, ref_logp=ref), cfg, **totals)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def learner_cfg(loss_type, beta, eps=0.2, eps_high=0.28, kl_correction=True):
    return LearnerConfig(loss_agg=MODES[loss_type], eps_low=eps, eps_high=eps_high, kl_coef=beta, dual_clip_c=None,
                         tis_cap=None, entropy_control="none", adpo=False, loss_norm_len=MAX_COMPLETION,
                         kl_ratio_correction=kl_correction)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high,kl_correction", [(0.0, 0.2, False), (0.04, 0.28, True), (0.04, 0.28, False)])
def test_loss_equals_trl(trl_parts, tmp_path, loss_type, beta, eps_high, kl_correction):
    trainer = make_trainer(trl_parts, tmp_path, loss_type=loss_type, beta=beta, eps_high=eps_high,
                           kl_correction=kl_correction)
    trainer.model.eval()  # eval: TRL applies no gradient-accumulation divisor
    logp, old, ref, adv, cmask, tmask = prepared(seed=case_seed(loss_type, beta, eps_high, kl_correction))
    want, want_grad = trl_loss(trainer, logp, old, ref, adv, cmask, tmask)
    got, got_grad = our_loss(learner_cfg(loss_type, beta, eps_high=eps_high, kl_correction=kl_correction), logp, old,
                             ref, adv,
                             (cmask * tmask).float())
    assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))
    assert torch.allclose(got_grad, want_grad, atol=1e-6), (got_grad - want_grad).abs().max()
    assert torch.all(got_grad[(cmask * tmask) == 0] == 0)


def test_case_inputs_are_the_same_in_every_process():
    """The parity inputs do not depend on the process's str-hash salt (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, 'tests'); from test_trl_equivalence import case_seed, prepared; "
            "print(case_seed('grpo', 0.04, 0.28, True), float(prepared(seed=case_seed('grpo', 0.04))[0].sum()))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1],
                           env=dict(os.environ, PYTHONHASHSEED=str(salt))).stdout for salt in (1, 2)}
    assert len(outs) == 1, outs


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_equal_trl_gradient_accumulation(trl_parts, tmp_path, loss_type):
    """Two micro-batches in TRL's training mode (its GA normalisation) vs our whole-batch totals."""
    trainer = make_trainer(trl_parts, tmp_path, loss_type=loss_type, beta=0.04, gas=2)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # what transformers' training loop sets
    logp, old, ref, adv, cmask, tmask = prepared(seed=5)
    mask = (cmask * tmask).float()
    cfg = learner_cfg(loss_type, 0.04)
    total_tokens, total_seqs = float(mask.sum()), float(mask.shape[0])
    want = got = 0.0
    for sl in (slice(0, 4), slice(4, 8)):
        w, wg = trl_loss(trainer, logp[sl], old[sl], ref[sl], adv[sl], cmask[sl], tmask[sl], num_items=total_tokens)
        g, gg = our_loss(cfg, logp[sl], old[sl], ref[sl], adv[sl], mask[sl], total_tokens=total_tokens,
                         total_seqs=total_seqs)
        want, got = want + float(w), got + float(g)
        assert torch.allclose(gg, wg, atol=1e-6)
    assert abs(got - want) < 1e-5


def test_group_advantages_equal_trl_formula_on_its_inputs():
    """TRL: (r - mean_g) / (nanstd_g + 1e-4) (grpo_trainer.py, scale_rewards="group")."""
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 0.0])
    grouped = r.view(-1, 4)
    trl_adv = (r - grouped.mean(1).repeat_interleave(4)) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    ours = group_advantages(r, torch.arange(3).repeat_interleave(4), eps=1e-4)
    assert torch.allclose(ours, trl_adv, atol=1e-6)


@pytest.mark.slow
def test_trl_real_generation_advantages_and_loss(trl_parts, tmp_path):
    """TRL generates with the embedded model and scores; its advantages and its loss on the real forward pass
    equal ours computed from the same rewards and logprobs."""
    seen: list[float] = []

    def reward(completions, prompts, **kw):
        # prompt 2's group is constant (zero variance -> advantage 0); prompt 1's varies with the text
        out = [float(len(set(str(c)))) if "hi" in str(p) else 1.0 for p, c in zip(prompts, completions)]
        seen.extend(out)
        return out

    trainer = make_trainer(trl_parts, tmp_path, loss_type="grpo", beta=0.04, reward_func=reward)
    random.seed(0)
    torch.manual_seed(0)
    batch = [{"prompt": "Say hi."}] * 4 + [{"prompt": "Name a colour."}] * 4
    out = trainer._generate_and_score_completions(batch)
    rewards = torch.tensor(seen)
    ours = group_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), eps=1e-4)
    assert torch.allclose(out["advantages"].float(), ours.float(), atol=1e-5)
    assert torch.all(ours[4:] == 0) and ours[:4].abs().sum() > 0  # one flat group, one informative group

    trainer.model.eval()
    recorded = {}
    real_forward = trainer._get_per_token_logps_and_entropies

    def spy(*a, **k):
        logps, ent, aux = real_forward(*a, **k)
        recorded.setdefault("logp", logps)
        return logps, ent, aux

    trainer._get_per_token_logps_and_entropies = spy
    want = trainer._compute_loss(trainer.model, out)
    logp = recorded["logp"]
    old = out.get("old_per_token_logps", logp.detach())
    mask = out["completion_mask"].float()
    got, _ = policy_loss(PolicyLossInputs(logp, old, out["advantages"], mask, ref_logp=out["ref_per_token_logps"]),
                         learner_cfg("grpo", 0.04))
    assert abs(float(got) - float(want)) < 1e-5
    g_want = torch.autograd.grad(want, logp, retain_graph=True)[0]
    g_got = torch.autograd.grad(got, logp)[0]
    assert torch.allclose(g_got, g_want, atol=1e-6)
