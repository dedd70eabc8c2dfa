"""`learner.strategy: fsdp2` on CPU with gloo (selfplay/learner/fsdp.py): two FSDP2 ranks (torch.multiprocessing,
no Ray) make the update one plain process makes on the whole batch, within 1e-5 in fp32, for LoRA (adapter)
and full fine-tuning (all weights); a rank with no share runs the dummy forwards; checkpoints written by rank 0
from the gathered state restore every shard, and (LoRA) the resumed ranks' next step is the uninterrupted
single process's."""
from __future__ import annotations

import pytest

from test_ranks import ENTROPY, batch, tiny_model  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def _config(model: str, finetune: str, run_dir: str, entropy: str = "none"):
    from selfplay.config import load_config

    return load_config(None, [f"model.name_or_path={model}", "model.dtype=float32", "learner.lr=1e-2",
                              "learner.kl_coef=0.05", "learner.micro_batch_tokens=64", "learner.lora.r=4",
                              "learner.lora.alpha=8", "learner.adpo=false", "learner.max_grad_norm=0.5",
                              f"learner.finetune={finetune}", f"run_dir={run_dir}", *ENTROPY[entropy]])


def _steps(groups: int):
    return [batch(1, groups), batch(2, groups), batch(3, groups)]


def _weights(learner) -> dict:
    """The trained weights, full (gathered under fsdp2), keyed as the unsharded model names them."""
    import torch

    sd = learner.fsdp.full_state() if learner.fsdp is not None else learner.model.state_dict()
    keep = (lambda k: "lora_" in k) if learner.lora else (lambda k: True)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items() if keep(k)}


def _rank_main(rank: int, world_size: int, port: int, model: str, finetune: str, groups: int, tmp: str,
               entropy: str) -> None:
    """Two steps, a checkpoint, then a fresh sharded learner resumes from it and takes the third step."""
    import torch

    from selfplay.learner.batches import summarise_steps
    from selfplay.learner.distributed import init_group, shard_groups
    from selfplay.learner.learner import Learner

    torch.set_num_threads(1)
    cfg = _config(model, finetune, f"{tmp}/run", entropy)
    steps = _steps(groups)
    sync = init_group(rank, world_size, "127.0.0.1", port, backend="gloo", sharded=True)

    def sharded_learner() -> Learner:
        learner = Learner(cfg.model, cfg.learner, seed=cfg.seed, device="cpu")
        learner.dist = sync
        learner.shard()
        return learner

    def train(learner: Learner, b: list) -> dict:
        mine = [b[i] for i in shard_groups(b, world_size)[rank]]
        return summarise_steps(learner.train_batch("executor", mine, parts=[list(range(len(mine)))]),
                               cfg.learner.ppo_epochs)

    learner = sharded_learner()
    metrics = [train(learner, b) for b in steps[:2]]
    learner.save_checkpoint(f"{tmp}/ck")
    learner.export("executor", f"{tmp}/adapter")
    before = _weights(learner)
    resumed = sharded_learner()
    resumed.load_checkpoint(f"{tmp}/ck")
    same = _weights(resumed)
    metrics.append(train(resumed, steps[2]))
    after = _weights(resumed)
    if rank == 0:
        torch.save({"metrics": metrics, "before": before, "same": same, "after": after,
                    "version": resumed.policy_version}, f"{tmp}/rank0.pt")


# with entropy control, its whole-step token choice (learner/entropy.py) spans the shards; rank 1 idles in one
@pytest.mark.parametrize("finetune,groups,entropy", [("lora", 5, "none"), ("lora", 1, "none"), ("full", 3, "none"),
                                                     ("lora", 1, "clip_cov"), ("lora", 5, "kl_cov")])
def test_fsdp2_ranks_make_the_single_process_update_and_resume(tiny_model, tmp_path, finetune, groups,  # noqa: F811
                                                               entropy):
    import torch
    import torch.multiprocessing as mp

    from selfplay.learner.distributed import free_port
    from selfplay.learner.learner import Learner

    torch.set_num_threads(1)
    cfg = _config(tiny_model, finetune, str(tmp_path / "run"), entropy)
    single = Learner(cfg.model, cfg.learner, seed=cfg.seed, device="cpu")
    steps = _steps(groups)
    want_metrics = [single.train_step("executor", b) for b in steps[:2]]
    want_before = _weights(single)
    want_metrics.append(single.train_step("executor", steps[2]))
    want_after = _weights(single)

    mp.spawn(_rank_main, args=(2, free_port(), tiny_model, finetune, groups, str(tmp_path), entropy), nprocs=2)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for m, w in zip(got["metrics"], want_metrics):  # rank 0's share; the totals are global
        assert m == {} or m["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
    assert sum(bool(m) for m in got["metrics"]) >= 2  # rank 0 trained (the checks above did not all pass on {})
    assert got["version"] == single.policy_version
    assert got["before"].keys() == want_before.keys() and want_before
    for k in want_before:
        assert torch.equal(got["same"][k], got["before"][k]), k  # the checkpoint restored every shard
        # full fine-tuning: Adam (lr 1e-2) turns last-bit differences of near-zero gradients into steps of up
        # to lr, so there the gradient (grad_norm above, every step) is what is compared (docs/learner.md)
        if finetune == "lora":
            assert torch.allclose(got["before"][k], want_before[k], atol=1e-5, rtol=0), k
            assert torch.allclose(got["after"][k], want_after[k], atol=1e-5, rtol=0), k
    fresh = _weights(Learner(cfg.model, cfg.learner, seed=cfg.seed, device="cpu"))
    assert sum(not torch.equal(want_after[k], fresh[k]) for k in fresh) > len(fresh) // 3  # not a no-op
    if finetune == "lora":  # the exported adapter (rank 0, gathered) is the single process's
        from safetensors.torch import load_file

        exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert len(exported) == len([k for k in want_before if ".executor." in k])
