"""loop.weight_sync=between_requests: a learner update that finishes while a per-conversation rollout call is in
flight reaches the engine between two of its requests; later requests sample with it, requests in flight finish
on the old adapter, and every trajectory is stamped with the oldest version any of its requests sampled with.
"""
from __future__ import annotations

import gc

import pytest

from adapters import random_lora
from selfplay.config import load_config
from selfplay.types import AdapterUpdate


def test_between_requests_is_a_validated_choice_of_the_async_pipeline():
    assert load_config(None, []).loop.weight_sync == "between_calls"  # default: today's behaviour
    with pytest.raises(ValueError, match="weight_sync=between_requests needs loop.pipeline=async"):
        load_config(None, ["loop.weight_sync=between_requests"])
    with pytest.raises(ValueError, match="needs learner.finetune=lora"):
        load_config(None, ["loop.weight_sync=between_requests", "loop.pipeline=async", "replay.max_staleness=1",
                           "learner.finetune=full"])
    with pytest.raises(ValueError, match="weight_sync"):
        load_config(None, ["loop.weight_sync=sometimes"])
    swap = ["loop.weight_sync=between_requests", "loop.pipeline=async", "replay.max_staleness=1"]
    for other in (["engine.backend=hf"], ["engine.backend=vllm", "executor.schedule=rounds"]):
        with pytest.raises(ValueError, match="need engine.backend=vllm and executor.schedule auto or conversations"):
            load_config(None, swap + other)  # the round-based schedule never takes an update inside a call
    assert load_config(None, swap + ["engine.backend=vllm"]).loop.weight_sync == "between_requests"


@pytest.mark.slow
def test_an_update_arriving_mid_call_serves_later_requests_and_stamps_stay_conservative(tmp_path):
    """Real vLLM CPU engine, the rollout worker class (what the Ray actor wraps), a real sandbox pool. Version 2
    arrives right after the call's first request went in: that group's conversations are mixed (first request
    on v1, later turns on v2) and carry v1; the groups submitted after it sample and carry v2 only."""
    from sandbox import Limits, SandboxPool

    from selfplay.rollout.worker import RolloutWorker

    cfg = load_config(None, [
        "engine.backend=vllm", "engine.max_batch_size=8", "engine.kv_cache_space_gib=1", "engine.max_lora_rank=8",
        "model.max_model_len=1024", "loop.pipeline=async", "replay.max_staleness=1",
        "loop.weight_sync=between_requests", "executor.max_turns=2", "executor.max_tokens_per_turn=48",
        "executor.temperature=0.8"])
    v1, v2 = random_lora(tmp_path / "v1", 1, std=0.02), random_lora(tmp_path / "v2", 2, std=0.02)
    with SandboxPool(Limits(timeout_s=2, cpu_time_s=2), workers=2) as pool:
        worker = RolloutWorker(cfg, pool, initial_adapters=[AdapterUpdate("executor", v1, 1)])
        engine = worker.engine
        try:
            mailbox = [AdapterUpdate("executor", v2, 2)]
            offered_in_flight = []

            def incoming():  # the learner's export "finishes" once the call has a request in flight
                if mailbox and engine.in_flight:
                    offered_in_flight.append(engine.in_flight)
                    return [mailbox.pop()]
                return []

            worker.take_updates_between_requests(incoming)
            submitted = []  # ground truth: (prompt ids, adapter version) of every request the engine got
            real_submit = engine.submit

            def submit(prompt_ids, params, adapter=None):
                submitted.append((list(prompt_ids), engine.adapter_versions[adapter]))
                return real_submit(prompt_ids, params, adapter=adapter)

            engine.submit = submit
            # group a opens a code block (a tool call, then a second turn, is likely); b starts with a tool call
            prefill = ["```python\n", "```python\nprint(6 * 7)\n```\n", None]
            groups = worker.executor.rollout(["What is 6 * 7? Use Python.", "What is 6 * 7?", "What is 2 ** 10?"],
                                             n=2, task_ids=["a", "b", "c"], prefill=prefill, seed=3)
            assert offered_in_flight == [1]  # the update arrived inside the call, with a request in flight
            assert worker.swaps_in_call == 1 and engine.adapter_versions == {"executor": 2}
            assert not engine._retired and not engine.in_flight  # v1 unloaded once its last request finished
            stamps = {}
            for r in (r for g in groups for r in g):
                full = r.prompt_ids + r.completion_ids
                used = [v for p, v in submitted if full[:len(p)] == p]  # the requests that sampled its tokens
                assert len(used) == r.requests >= 1
                t = r.to_trajectory(1.0, policy_version=5)  # the driver's stamp is overridden by what sampled
                assert t.policy_version == min(used)  # the oldest version it sampled with, never newer
                stamps[r.task_id, r.sample_index] = (t.policy_version, used)
            assert submitted[0][1] == 1 and all(v == 2 for _, v in submitted[1:])
            assert {stamps["a", j][0] for j in range(2)} == {1}  # group a went first, on v1
            assert {stamps[k, j][0] for k in "bc" for j in range(2)} == {2}  # submitted after the update
            assert any(used[0] == 1 and 2 in used for _, used in stamps.values())  # a mixed conversation: v1
            # the driver's push of the version already loaded reloads nothing
            worker.update_weights(AdapterUpdate("executor", v2, 2))
            assert engine.adapter_versions == {"executor": 2} and len(engine._loras) == 1
        finally:
            worker.close()
            gc.collect()


def test_shipped_adapters_keep_the_previous_version_when_versions_step_by_two():
    """Requests in flight may still sample with the previous version (between_requests): its files stay."""
    import shutil
    from pathlib import Path

    from selfplay.rollout.worker import local_adapter

    paths = [Path(local_adapter(AdapterUpdate("swaptest", "/nowhere", v, files={"a.txt": b"x"})).path)
             for v in (2, 4, 6)]
    try:
        assert [p.exists() for p in paths] == [False, True, True]
    finally:
        shutil.rmtree(paths[-1].parent / "swaptest-v000004", ignore_errors=True)
        shutil.rmtree(paths[-1], ignore_errors=True)
