"""Data-parallel learner ranks on a real local Ray with gloo (selfplay/learner/distributed.py,
selfplay/run/cluster/ranks.py): two ranks make the update one process makes on the whole batch (fp32, 1e-5),
including a rank with nothing to train; shards are whole groups balanced by tokens; metrics merge."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from selfplay.learner.distributed import merge_metrics, shard_groups
from selfplay.types import Trajectory

REPO = Path(__file__).resolve().parents[1]


def batch(seed: int, groups: int, per_group: int = 3, vocab: int = 4000) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randrange(4, 12))]
        for k in range(per_group):
            n = rng.randrange(3, 20)
            mask = [1] * n
            if k == 1 and n > 6:
                mask[2:5] = [0, 0, 0]  # tool output: not trained
            out.append(Trajectory(role="executor", task_id=f"t{g}", group_id=f"{seed}:g{g}", prompt_ids=prompt,
                                  traj_id=f"{seed}:g{g}:{k}",  # the same in every process (entropy control's draw)
                                  completion_ids=[rng.randrange(10, vocab) for _ in range(n)], loss_mask=mask,
                                  behaviour_logprobs=[0.0] * n, reward=float(rng.random()),
                                  meta={"temperature": 0.7}))
    return out


def test_shards_are_whole_groups_balanced_by_tokens():
    trajs = batch(0, groups=7)
    shards = shard_groups(trajs, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(trajs)))
    for s in shards:  # no group is split between ranks
        groups = {trajs[i].group_id for i in s}
        assert all(trajs[i].group_id in groups for i in s)
        assert len(s) == sum(1 for t in trajs if t.group_id in groups)
    cost = [sum(len(trajs[i].prompt_ids) + len(trajs[i].completion_ids) for i in s) for s in shards]
    biggest = max(sum(len(t.prompt_ids) + len(t.completion_ids) for t in trajs if t.group_id == g)
                  for g in {t.group_id for t in trajs})
    assert max(cost) - min(cost) <= biggest  # LPT: within one group of balanced
    assert shard_groups(trajs[:3], 2)[1] == []  # one group, two ranks: one rank idles


def test_merge_metrics_sums_counts_and_weights_means_by_tokens():
    m = merge_metrics([{"loss": 1.0, "tokens": 10.0, "kl": 0.1, "ratio_max": 1.2, "grad_norm": 3.0, "time_s": 2.0},
                       {"loss": 0.5, "tokens": 30.0, "kl": 0.5, "ratio_max": 1.5, "grad_norm": 3.0, "time_s": 1.0},
                       {}])
    assert m["loss"] == 1.5 and m["tokens"] == 40.0 and m["ratio_max"] == 1.5 and m["grad_norm"] == 3.0
    assert m["kl"] == pytest.approx((0.1 * 10 + 0.5 * 30) / 40) and m["time_s"] == 2.0 and m["ranks"] == 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def make_tiny_model(out: Path) -> str:
    """A random-weight 2-layer Llama with the embedded model's tokenizer: fast, and fp32 on CPU."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from selfplay.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _adapter(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("groups", [5, 1])  # 1 group on 2 ranks: rank 1 idles through the collectives
def test_two_ranks_make_the_single_process_update(tiny_model, tmp_path, groups):
    import ray
    import torch

    from selfplay.config import load_config
    from selfplay.learner.learner import Learner
    from selfplay.run.cluster.actors import LearnerActor
    from selfplay.run.cluster.ranks import LearnerGroup
    from selfplay.run.rundir import RunDir

    overrides = [f"model.name_or_path={tiny_model}", "model.dtype=float32", "learner.world_size=2",
                 "learner.lr=1e-2", "learner.kl_coef=0.05", "learner.micro_batch_tokens=64",
                 "learner.lora.r=4", "learner.lora.alpha=8", "learner.adpo=false", "learner.max_grad_norm=0.5",
                 f"run_dir={tmp_path / 'run'}"]
    cfg = load_config(None, overrides)
    rd = RunDir.create(cfg)
    steps = [batch(1, groups), batch(2, groups)]

    single = Learner(cfg.model, cfg.learner, seed=cfg.seed)
    torch.set_num_threads(1)
    single_metrics = [single.train_step("executor", b) for b in steps]
    single.export("executor", tmp_path / "single")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ranks = [ray.remote(LearnerActor).options(num_cpus=0).remote(cfg, rd, f"learner-{i}") for i in range(2)]
        group = LearnerGroup.form(ranks, cfg.learner.ppo_epochs)
        for b, ref_metrics in zip(steps, single_metrics):
            metrics, adv = ray.get(group.train_step.remote("executor", b))
            assert set(adv) == {t.traj_id for t in b}
            assert metrics["tokens"] == ref_metrics["tokens"]
            assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-5)
            assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5)
        ray.get(group.export.remote("executor", str(tmp_path / "rank0")))
        ray.get(ranks[1].export.remote("executor", str(tmp_path / "rank1")))
        assert ray.get(group.versions.remote()) == single.policy_version
    finally:
        ray.shutdown()
    want, got, other = (_adapter(tmp_path / d) for d in ("single", "rank0", "rank1"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=0), (k, (got[k] - want[k]).abs().max())
        assert torch.equal(got[k], other[k])  # the ranks stay identical
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # peft starts lora_B at 0: it moved


# Clip-Cov/KL-Cov (learner/entropy.py) with ranges and ratios that pick many tokens of these small batches
ENTROPY = {"none": [], "clip_cov": ["learner.entropy_control=clip_cov", "learner.clip_cov_ratio=0.1",
                                    "learner.clip_cov_lb=-100", "learner.clip_cov_ub=100"],
           "kl_cov": ["learner.entropy_control=kl_cov", "learner.kl_cov_ratio=0.1", "learner.kl_cov_coef=5.0",
                      "learner.ppo_epochs=2"]}  # KL-Cov acts once r != 1: in the second epoch


def _mini_batch_cfg(tiny_model: str, tmp_path: Path, *extra: str):
    from selfplay.config import load_config

    return load_config(None, [f"model.name_or_path={tiny_model}", "model.dtype=float32", "learner.world_size=2",
                              "learner.lr=1e-2", "learner.kl_coef=0.0", "learner.micro_batch_tokens=64",
                              "learner.lora.r=4", "learner.lora.alpha=8", "learner.adpo=false",
                              f"run_dir={tmp_path / 'run'}", *extra])


@pytest.mark.slow
def test_two_ranks_take_every_mini_batch_step_of_the_single_process(tiny_model, tmp_path):
    """loop.<role>_updates across ranks: 3 groups in 2 mini-batches (2 groups, then 1, where rank 1 idles
    through the collectives): the same steps, losses and weights as one process's train_batch; also with
    Clip-Cov and KL-Cov, whose token choice spans the whole step, not one rank's micro-batches."""
    import ray
    import torch

    from selfplay.learner.learner import Learner
    from selfplay.run.cluster.actors import LearnerActor
    from selfplay.run.cluster.ranks import LearnerGroup
    from selfplay.run.rundir import RunDir

    b = batch(3, 3)
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for mode, extra in ENTROPY.items():
            cfg = _mini_batch_cfg(tiny_model, tmp_path / mode, *extra)
            rd = RunDir.create(cfg)
            single = Learner(cfg.model, cfg.learner, seed=cfg.seed)
            want = single.train_batch("executor", b, updates=2)
            single.export("executor", tmp_path / mode / "single")
            ranks = [ray.remote(LearnerActor).options(num_cpus=0).remote(cfg, rd, f"learner-{i}") for i in range(2)]
            group = LearnerGroup.form(ranks, cfg.learner.ppo_epochs)
            got, adv = ray.get(group.train_batch.remote("executor", b, None, None, 2))
            assert set(adv) == {t.traj_id for t in b}
            assert len(got) == len(want) == 2 * cfg.learner.ppo_epochs
            for g, w in zip(got, want):
                assert g["tokens"] == w["tokens"] and g["loss"] == pytest.approx(w["loss"], abs=1e-5), mode
                for key in ("clip_cov_frac", "kl_cov_frac"):  # the same number of tokens picked
                    assert g.get(key) == pytest.approx(w.get(key), abs=1e-9), (mode, key)
            assert got[1]["ratio_max"] == pytest.approx(want[1]["ratio_max"], rel=1e-5)
            if mode != "none":
                assert max(w[f"{mode}_frac"] for w in want) >= 0.05, want  # the rule picked tokens
            ray.get(group.export.remote("executor", str(tmp_path / mode / "rank0")))
            assert ray.get(group.versions.remote()) == single.policy_version
            group.kill()
            w_, g_ = _adapter(tmp_path / mode / "single"), _adapter(tmp_path / mode / "rank0")
            for k in w_:
                assert torch.allclose(g_[k], w_[k], atol=1e-5, rtol=0), (mode, k, (g_[k] - w_[k]).abs().max())
    finally:
        ray.shutdown()


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_entropy_control_does_not_depend_on_micro_batching(tiny_model, tmp_path, mode):
    """One process: Clip-Cov/KL-Cov choose their tokens over the whole step, so splitting it into micro-batches
    of 64 tokens or taking it whole makes the same update (verl chooses per micro-batch, which would not)."""
    import torch

    from selfplay.learner.learner import Learner

    b = batch(4, 3)
    adapters = []
    for tokens in (64, 4096):
        # lr 1e-3: Adam turns the float noise of another micro-batch split into steps of lr * noise / eps on
        # gradients near its eps (1e-8); a token picked differently moves weights by ~lr, 100x the bound
        cfg = _mini_batch_cfg(tiny_model, tmp_path, *ENTROPY[mode], "learner.world_size=1", "learner.lr=1e-3",
                              f"learner.micro_batch_tokens={tokens}")
        learner = Learner(cfg.model, cfg.learner, seed=cfg.seed)
        steps = learner.train_batch("executor", b)
        assert all(s["micro_batches"] > 1 if tokens == 64 else s["micro_batches"] == 1 for s in steps)
        assert max(s[f"{mode}_frac"] for s in steps) >= 0.05, steps
        learner.export("executor", tmp_path / f"mb{tokens}")
        adapters.append(_adapter(tmp_path / f"mb{tokens}"))
    for k in adapters[0]:
        assert torch.allclose(adapters[0][k], adapters[1][k], atol=1e-5, rtol=0), (k, (adapters[0][k] - adapters[1][k]).abs().max())
