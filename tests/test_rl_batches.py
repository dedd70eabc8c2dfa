"""RL correctness (issue #11): every requested step runs, the clip acts on later steps, the mechanisms that
cannot act are refused, and truncated IS compares the engine's log-probs with the learner's like with like.

Real parts: the embedded SmolLM2 learner, the hf engine's own samples and log-probs."""
from __future__ import annotations

import logging

import pytest
import torch

from selfplay.config import ConfigError, LearnerConfig, ModelConfig, config_from_dict
from selfplay.learner.batches import split_groups, summarise_steps
from selfplay.learner.learner import Learner
from selfplay.learner.losses import PolicyLossInputs, policy_loss
from selfplay.learner.scoring import nucleus_logprob
from selfplay.types import Trajectory
from test_learner import ROLE, lora_cfg, make_batch, nonzero_lora_b


# ------------------------------------------------------------------------------------------- pure parts
def test_split_groups_keeps_groups_whole_and_in_order():
    batch = make_batch(groups=5, per_group=2)
    parts = split_groups(batch, 3)
    assert [len(p) for p in parts] == [4, 4, 2]  # 5 groups -> 2, 2, 1
    assert [i for p in parts for i in p] == list(range(10))
    for p in parts:
        groups = {batch[i].group_id for i in p}
        assert all(sum(t.group_id == g for t in batch) == sum(batch[i].group_id == g for i in p) for g in groups)
    assert len(split_groups(batch, 9)) == 5  # never more parts than groups
    with pytest.raises(ValueError):
        split_groups(batch, 0)


def test_summarise_steps():
    steps = [{"loss": 1.0, "ratio_max": 1.0, "time_s": 2.0, "tokens": 10.0, "policy_version": 1.0},
             {"loss": 3.0, "ratio_max": 1.5, "time_s": 2.0, "tokens": 30.0, "policy_version": 2.0},
             {"skipped": 1.0, "time_s": 0.0}]
    s = summarise_steps(steps, requested=3)
    assert s["steps"] == 2 and s["steps_requested"] == 3 and s["skipped"] == 1
    assert s["loss"] == 2.0 and s["ratio_max"] == 1.5 and s["policy_version"] == 2.0
    assert s["tokens"] == 40 and s["tokens_per_s"] == 10.0


def _grad(cfg: LearnerConfig, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(4, 64, generator=g) * 0.9 + 0.05).requires_grad_(True)
    old = logp.detach() + shift * (torch.rand(4, 64, generator=g) - 0.5)
    adv = torch.randn(4, generator=g)
    loss, _ = policy_loss(PolicyLossInputs(logp=logp, old_logp=old, advantages=adv, mask=torch.ones(4, 64)), cfg,
                          generator=torch.Generator().manual_seed(1))
    loss.backward()
    return logp.grad


def test_kl_cov_acts_only_when_the_ratio_departs_from_one():
    base = dict(kl_coef=0.0, tis_cap=None, dual_clip_c=None, eps_low=10.0, eps_high=10.0)  # no clip: same surrogate
    plain, kl_cov = LearnerConfig(**base), LearnerConfig(**base, entropy_control="kl_cov", kl_cov_ratio=0.2)
    # ratio 1 (a batch's first step): |log r| has zero gradient, KL-Cov is bit-identical to plain PG
    assert torch.equal(_grad(plain, 0.0), _grad(kl_cov, 0.0))
    # a later step (ratio != 1): the top-covariance tokens are pulled back
    assert (_grad(plain, 0.5) - _grad(kl_cov, 0.5)).abs().max() > 1e-3


def test_clip_cov_acts_even_on_the_first_step():
    """Clip-Cov detaches random high-covariance tokens, which does not need r != 1 (verl's clip_cov): it is
    not refused with one step per batch."""
    base = dict(kl_coef=0.0, tis_cap=None, dual_clip_c=None)
    plain = LearnerConfig(**base)
    clip_cov = LearnerConfig(**base, entropy_control="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0,
                             clip_cov_ub=10.0)
    assert (_grad(plain, 0.0) - _grad(clip_cov, 0.0)).abs().max() > 1e-6


def _run_cfg(**sections) -> None:
    config_from_dict(sections)


def test_config_refuses_what_cannot_run_as_written():
    with pytest.raises(ConfigError, match=r"loop.proposer_updates \(6\) > proposer.candidates_per_iteration \(3\)"):
        _run_cfg(loop={"proposer_updates": 6}, proposer={"candidates_per_iteration": 3})
    with pytest.raises(ConfigError, match=r"loop.executor_updates \(3\) > executor.tasks_per_iteration \(2\)"):
        _run_cfg(loop={"executor_updates": 3}, executor={"tasks_per_iteration": 2})
    with pytest.raises(ConfigError, match="kl_cov needs more than one optimizer step.*ratio is exactly 1"):
        _run_cfg(learner={"entropy_control": "kl_cov"})
    with pytest.raises(ConfigError, match="hrpo"):
        _run_cfg(learner={"advantage": "hrpo"})
    _run_cfg(learner={"entropy_control": "kl_cov"}, loop={"proposer_updates": 2})  # acts from step 2 on
    _run_cfg(learner={"entropy_control": "kl_cov", "ppo_epochs": 2})
    _run_cfg(learner={"entropy_control": "clip_cov"})


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (5, 1.0), (40, 0.9), (0, 1.0)])
def test_nucleus_logprob_matches_the_samplers_rule(top_k, top_p, monkeypatch):
    from selfplay.engines.sampling import processed_logits

    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    peaked = torch.randn(6, 500, generator=g) * 4
    flat = torch.randn(6, 500, generator=g) * 0.3  # nucleus wider than the topk fast path
    z = torch.cat([peaked, flat])
    labels = torch.topk(z, 3, dim=-1).indices[:, 2]  # likely tokens, and random ones (often outside: -inf)
    labels[3:6], labels[9:] = torch.randint(0, 500, (3,), generator=g), torch.randint(0, 500, (3,), generator=g)
    want = processed_logits(z, 1.0, top_k, top_p).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    for fast_k in (16, 500):
        monkeypatch.setattr("selfplay.learner.scoring.NUCLEUS_FAST_K", fast_k)
        got = nucleus_logprob(z, labels, torch.full((12,), top_p), torch.full((12,), top_k))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        assert torch.allclose(got[fin], want[fin], atol=1e-5)


def test_rows_without_behaviour_logprobs_get_no_is_weight():
    cfg = LearnerConfig(kl_coef=0.0, tis_cap=2.0, dual_clip_c=None)
    g = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(2, 8, generator=g) * 0.9 + 0.05)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 8)
    behaviour = torch.stack([logp[0] - 0.3, torch.zeros(8)])  # row 1: the engine returned none (zeros)
    kw = dict(logp=logp.clone().requires_grad_(True), old_logp=logp, advantages=adv, mask=mask)
    _, m = policy_loss(PolicyLossInputs(**kw, behaviour_logp=behaviour, behaviour_rows=torch.tensor([1.0, 0.0])), cfg)
    assert m["is_weight_mean"] == pytest.approx(float(torch.exp(torch.tensor(0.3))), rel=1e-5)
    assert m["is_tokens_frac"] == 0.5
    # without the row flag, row 1 would be weighted by p_old (the bug): its mean drops below 1
    _, bad = policy_loss(PolicyLossInputs(**kw, behaviour_logp=behaviour), cfg)
    assert bad["is_weight_mean"] < m["is_weight_mean"]


# --------------------------------------------------------------------------------------- the learner
def test_n_updates_are_n_steps_and_later_steps_clip():
    """3 updates on a batch of 3 groups: 3 optimizer steps, policy version 3; step 1 is on-policy (ratio 1),
    steps 2 and 3 train on data the moved policy did not sample: ratio != 1, and a tight clip acts."""
    cfg = lora_cfg(eps_low=1e-4, eps_high=1e-4, dual_clip_c=None, kl_coef=0.0, lr=5e-3)
    learner = Learner(ModelConfig(), cfg, roles=(ROLE,), seed=0)
    nonzero_lora_b(learner)
    batch = make_batch(groups=3)
    steps = learner.train_batch(ROLE, batch, updates=3)
    assert len(steps) == 3 and learner.policy_version[ROLE] == 3 and learner.step == 3
    assert [s["mini_batch"] for s in steps] == [0, 1, 2] and [s["seqs"] for s in steps] == [3, 3, 3]
    assert steps[0]["ratio_max"] == 1.0 and steps[0]["clip_frac"] == 0.0
    for s in steps[1:]:
        assert s["ratio_max"] != 1.0 and s["clip_frac"] > 0.0, s
    summary = summarise_steps(steps, 3)
    assert summary["steps"] == summary["steps_requested"] == 3 and summary["ratio_max"] > 1.0


def test_fewer_groups_than_updates_runs_what_there_is_and_says_so(caplog):
    learner = Learner(ModelConfig(), lora_cfg(kl_coef=0.0, ppo_epochs=2), roles=(ROLE,), seed=0)
    with caplog.at_level(logging.WARNING):
        steps = learner.train_batch(ROLE, make_batch(groups=2), updates=4)
    assert len(steps) == 4 and learner.policy_version[ROLE] == 4  # 2 mini-batches x 2 epochs
    assert [(s["epoch"], s["mini_batch"]) for s in steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "4 updates requested but the batch holds 2 groups" in caplog.text


def _hf_samples(n_prompts: int = 2) -> list[Trajectory]:
    """Real samples with the engine's (truncated) log-probs: T 0.7, top-p 0.9, like the executor's."""
    from selfplay.config import EngineConfig
    from selfplay.engines.hf import HFEngine
    from selfplay.types import SamplingParams

    engine = HFEngine(ModelConfig(), EngineConfig(backend="hf"), seed=0)
    try:
        prompts = [engine.tokenizer.encode(q) for q in ("What is 17 * 23? Answer:", "The capital of France is")]
        outs = engine.generate(prompts[:n_prompts], SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=24,
                                                                   seed=5))
    finally:
        engine.close()
    trajs = []
    for k, out in enumerate(outs):
        for j, c in enumerate(out.outputs):
            trajs.append(Trajectory(role=ROLE, task_id=f"t{k}", group_id=f"g{k}", prompt_ids=list(out.prompt_token_ids),
                                    completion_ids=list(c.token_ids), loss_mask=[1] * len(c.token_ids),
                                    behaviour_logprobs=list(c.logprobs), reward=float(j % 2),
                                    meta={"temperature": 0.7, "top_p": 0.9}))
    return trajs


def test_on_policy_is_weights_are_one_with_real_engine_logprobs():
    """The hf engine's log-probs are of its truncated (top-p 0.9) distribution. Scored under that same
    truncation, every on-policy token gets w = 1 +- 1e-3; scored on the full vocabulary (the old code) the
    weight is the token's nucleus mass. A trajectory without log-probs in the batch is not weighted."""
    trajs = _hf_samples()
    learner = Learner(ModelConfig(), lora_cfg(kl_coef=0.0, tis_cap=2.0), roles=(ROLE,), seed=0)
    sampler = learner.logprobs(ROLE, trajs, sampler=True)
    full = learner.logprobs(ROLE, trajs)
    w = torch.cat([torch.tensor(s) - torch.tensor(t.behaviour_logprobs) for s, t in zip(sampler, trajs)]).exp()
    assert (w - 1).abs().max() < 1e-3, (w - 1).abs().max()
    w_full = torch.cat([torch.tensor(f) - torch.tensor(t.behaviour_logprobs) for f, t in zip(full, trajs)]).exp()
    assert w_full.min() < 0.99  # the bias the truncation-aware scoring removes

    missing = Trajectory(role=ROLE, task_id="t9", group_id="g9", prompt_ids=trajs[0].prompt_ids,
                         completion_ids=trajs[0].completion_ids, loss_mask=trajs[0].loss_mask,
                         behaviour_logprobs=[0.0] * len(trajs[0].completion_ids), reward=1.0,
                         meta={"temperature": 0.7, "top_p": 0.9, "logprobs_missing": True})
    m = learner.train_step(ROLE, trajs + [missing])
    assert abs(m["is_weight_mean"] - 1) < 1e-3 and abs(m["is_weight_max"] - 1) < 1e-3, m
    assert 0 < m["is_tokens_frac"] < 1


_FRAGMENT = """
import os, sys, torch
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if sys.argv[1] == "pin":
    from selfplay.learner.learner import _large_tensors_via_mmap
    _large_tensors_via_mmap()
x = torch.ones(8 * 2**20 // 4); del x  # a freed 8 MiB mapping: glibc's dynamic threshold rises to 8 MiB
base = rss()
big, keep = [], []
for i in range(40):
    big.append(torch.ones(2**20))  # 4 MiB activations ...
    keep.append(torch.ones(64))  # ... with small long-lived tensors between them
del big
print(rss() - base)
"""


def test_freed_activations_go_back_to_the_os():
    """The learner's memory cause (5.2 GB peak RSS on the debug learner): glibc's dynamic mmap threshold puts
    activation-sized tensors on the heap after the first one is freed, where small live blocks pin them.
    With the threshold pinned (what a CPU Learner does), 160 MB of freed activations return to the OS."""
    import subprocess
    import sys
    from pathlib import Path

    import os

    # A fresh process with glibc's malloc as the learner gets it, not this pytest process's environment, which
    # earlier tests and the libraries they load change (vLLM's CPU platform adds to LD_PRELOAD; an allocator
    # preload or a MALLOC_*/GLIBC_TUNABLES setting would disable the dynamic threshold this test shows). Passed
    # alone, failed once inside the full suite with 16 MB retained by default (2026-12-03; cause not pinned down).
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}

    def retained(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1], env=env)
        return float(out.stdout.strip())

    inherited = {k: v for k, v in os.environ.items() if k in ("LD_PRELOAD", "GLIBC_TUNABLES") or "MALLOC" in k}
    default = retained("default")
    assert default > 100, (default, inherited)  # the mechanism, shown without the pin
    assert retained("pin") < 20


# The loop runs every requested update (loop.proposer_updates=2 through Ray and the replay buffer): checked in
# runs other tests make anyway, one learner process (tests/test_console.py) and two ranks (tests/test_scale_e2e.py).
