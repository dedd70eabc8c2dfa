"""What only a GPU runs: bf16 autocast on CUDA, vLLM's CUDA engine with LoRA adapters, multi-rank learners.
Each compares against an fp32 / teacher-forced reference on the same inputs, as the CPU suite does."""
from __future__ import annotations

import pytest
import torch

from selfplay.config import EngineConfig, LearnerConfig, ModelConfig
from test_learner import ROLE, adapter_grads, lora_cfg, make_batch, nonzero_lora_b

pytestmark = pytest.mark.gpu


def _grad(bf16: str, dtype: str) -> tuple[torch.Tensor, dict]:
    from selfplay.learner.learner import Learner

    learner = Learner(ModelConfig(dtype=dtype), lora_cfg(bf16=bf16, gradient_checkpointing="on"), roles=(ROLE,),
                      seed=3, device="cuda")
    nonzero_lora_b(learner)
    metrics = learner.train_step(ROLE, make_batch(seed=5))
    g = adapter_grads(learner, ROLE)
    return torch.cat([g[n].float().flatten().cpu() for n in sorted(g)]), metrics


def test_bf16_autocast_on_cuda_keeps_the_fp32_gradient():
    fp32, m32 = _grad(bf16="off", dtype="float32")
    bf16, m16 = _grad(bf16="on", dtype="float32")
    rel = float((bf16 - fp32).norm() / fp32.norm())
    cos = float(torch.nn.functional.cosine_similarity(bf16, fp32, dim=0))
    assert 0.0 < rel < 0.15 and cos > 0.99, (rel, cos)
    assert abs(m16["loss"] - m32["loss"]) < 0.05 * max(1.0, abs(m32["loss"]))


def test_default_cuda_learner_runs_bf16_with_checkpointing():
    """`auto` on CUDA means bf16 autocast and gradient checkpointing (config.py): both really engaged."""
    from selfplay.learner.learner import Learner

    learner = Learner(ModelConfig(), LearnerConfig(), roles=(ROLE,), device="cuda")
    assert learner.bf16 and learner.model.get_base_model().is_gradient_checkpointing
    metrics = learner.train_step(ROLE, make_batch(seed=6))
    assert all(v == v for v in metrics.values())  # no NaN


def test_vllm_on_cuda_serves_lora_adapters_as_teacher_forcing_scores_them(tmp_path):
    pytest.importorskip("vllm", reason="vLLM (CUDA build) not installed: pip install 'selfplay[vllm]'")
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

    from selfplay.engines import make_engine
    from selfplay.models import load_causal_lm, resolve_model_path
    from selfplay.types import AdapterUpdate, SamplingParams

    path = resolve_model_path("embedded")
    torch.manual_seed(1)
    peft = get_peft_model(load_causal_lm(path, "float32", "cpu"),
                          PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft.save_pretrained(tmp_path / "lora")
    engine = make_engine(ModelConfig(dtype="float32", max_model_len=512),
                         EngineConfig(backend="vllm", max_batch_size=8, max_lora_rank=8, gpu_memory_utilization=0.3))
    try:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "List five fruits."}],
                                                      tokenize=False, add_generation_prompt=True)
        greedy = SamplingParams(temperature=0.0, max_tokens=16)
        base = engine.generate([prompt], greedy)[0].outputs[0].token_ids
        engine.update_weights(AdapterUpdate(name="executor", path=str(tmp_path / "lora"), version=1))
        adapted = engine.generate([prompt], greedy, adapter="executor")[0].outputs[0].token_ids
        assert adapted != base
        out = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, seed=5), adapter="executor")[0]
    finally:
        engine.close()
    c = out.outputs[0]
    ref = PeftModel.from_pretrained(load_causal_lm(path, "float32", "cpu"), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([out.prompt_token_ids + c.token_ids])).logits[0, len(out.prompt_token_ids) - 1:-1]
    expect = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(c.logprobs), expect, atol=5e-2)


def _nccl_rank(rank: int, port: int, model: str, out: str) -> None:
    """One of two ddp ranks, each on its own GPU, in the group `init_group` makes on CUDA (NCCL + gloo)."""
    from selfplay.learner.distributed import init_group, shard_groups
    from selfplay.learner.learner import Learner
    from test_ranks import batch

    torch.cuda.set_device(rank)
    cfg = _nccl_config(model)
    learner = Learner(cfg.model, cfg.learner, seed=cfg.seed, device=f"cuda:{rank}")
    learner.dist = init_group(rank, 2, "127.0.0.1", port)
    with torch.no_grad():  # as LearnerActor.join: every rank starts from rank 0's weights
        for params in learner._params.values():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
    for b in (batch(1, 5), batch(2, 5)):
        mine = [b[i] for i in shard_groups(b, 2)[rank]]
        learner.train_batch("executor", mine, parts=[list(range(len(mine)))])
    learner.export("executor", f"{out}/rank{rank}")


def _nccl_config(model: str):
    from selfplay.config import load_config

    return load_config(None, [f"model.name_or_path={model}", "model.dtype=float32", "learner.bf16=off",
                              "learner.gradient_checkpointing=off", "learner.world_size=2", "learner.lr=1e-2",
                              "learner.kl_coef=0.05", "learner.micro_batch_tokens=64", "learner.lora.r=4",
                              "learner.lora.alpha=8", "learner.adpo=false", "learner.entropy_control=clip_cov",
                              "learner.clip_cov_ratio=0.1", "learner.clip_cov_lb=-100", "learner.clip_cov_ub=100"])


def test_nccl_learner_ranks_agree(tmp_path):
    """Two ddp ranks over NCCL (gradients) and gloo (the CPU-side totals and Clip-Cov's whole-step choice) end
    two steps with identical adapters, equal to one process's on the whole batches (fp32, TF32 off)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices (NCCL refuses two ranks on one), found {torch.cuda.device_count()}")
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from selfplay.learner.distributed import free_port
    from selfplay.learner.learner import Learner
    from test_ranks import batch, make_tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_tiny_model(tmp_path / "model")
    cfg = _nccl_config(model)
    single = Learner(cfg.model, cfg.learner, seed=cfg.seed, device="cuda:0")
    for b in (batch(1, 5), batch(2, 5)):
        single.train_step("executor", b)
    single.export("executor", tmp_path / "single")
    mp.spawn(_nccl_rank, args=(free_port(), model, str(tmp_path)), nprocs=2)
    want, r0, r1 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "rank0", "rank1"))
    assert want.keys() == r0.keys() == r1.keys()
    for k in want:
        assert torch.equal(r0[k], r1[k]), k  # the ranks stay identical
        assert torch.allclose(r0[k], want[k], atol=1e-4, rtol=0), (k, (r0[k] - want[k]).abs().max())
