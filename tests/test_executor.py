"""Executor: turn parsing (closed/unclosed/garbage code blocks), spans and masks, and a real multi-turn rollout
on the embedded model with the hf engine and the real sandbox."""
from __future__ import annotations

import pytest

from roles.executor import (MAX_RESUMES_PER_TURN, Executor, Rollout, clip_output, has_unclosed_python,
                            next_action, request_seed, tool_call_code)
from selfplay.config import ExecutorConfig
from selfplay.types import Trajectory

PY = "```python\nprint(6 * 7)\n```"


# ---------------------------------------------------------------- turn parsing
@pytest.mark.parametrize("turn,code", [
    (f"Let me compute.\n{PY}\n", "print(6 * 7)\n"),  # stopped on the closing fence
    (f"{PY}\n```output", "print(6 * 7)\n"),  # the model opened the output block (Agent0's stop)
    ("```python\nprint(1)\n```output", "print(1)\n"),  # ```output right on the closing fence
    ("```py\nx = 1\n```\ntext\n```python\nprint(x)\n```\n", "x = 1\n\nprint(x)\n"),  # blocks of a turn joined
    ("Here:\n```\n", None),  # a bare opening fence
    ("```text\nnot code\n```\n", None),  # another language
    (f"{PY}\nand then more prose", None),  # the block is not the end of the turn
    ("```python\nprint(1)\n", None),  # unclosed (truncated) block
    ("garbage ``` ```` `` ```python", None),
    ("", None),
])
def test_tool_call_code(turn, code):
    assert tool_call_code(turn) == code


def test_next_action_decisions():
    assert next_action(f"{PY}\n", "\n```\n", 0, 2) == ("call", "print(6 * 7)\n")
    assert next_action(f"{PY}\n", "\n```\n", 2, 2) == ("end", "max_turns")
    assert next_action("```python\n   \n```\n", "\n```\n", 0, 2) == ("resume", "empty_code")
    assert next_action("I will now show output\n```output", "```output", 0, 2) == ("resume", "output_without_code")
    assert next_action("Example:\n```\n", "\n```\n", 0, 2) == ("resume", None)


def test_unclosed_python_detection():
    assert has_unclosed_python("text\n```python\nfor i in range(")
    assert not has_unclosed_python(f"{PY}\nall done")
    assert has_unclosed_python(f"{PY}\nnow:\n```python\nx = ")


def test_clip_output_keeps_head_and_tail():
    text = "".join(str(i % 10) for i in range(1000))
    clipped, cut = clip_output(text, 90)
    assert cut and clipped.startswith(text[:60]) and clipped.endswith(text[-30:])
    assert "[910 characters omitted]" in clipped  # 1000 - 60 - 30
    assert clip_output("short", 90) == ("short", False)


def test_spans_mask_and_trajectory_alignment():
    r = Rollout("t", "q", 0, prompt_ids=[1, 2, 3])
    r.append([10, 11], None, "prefill")
    r.append([12, 13, 14], [-0.1, -0.2, -0.3], "model")
    r.append([15], [-0.4], "model")  # a resumed turn extends the model span
    r.append([16, 17], None, "tool")
    r.append([18], [-0.5], "model")
    assert [(s.start, s.end, s.kind) for s in r.spans] == [(0, 2, "prefill"), (2, 6, "model"), (6, 8, "tool"),
                                                          (8, 9, "model")]
    assert r.loss_mask == [0, 0, 1, 1, 1, 1, 0, 0, 1]
    assert r.logprobs == [0.0, 0.0, -0.1, -0.2, -0.3, -0.4, 0.0, 0.0, -0.5]
    r.finish = "eos"
    traj = r.to_trajectory(reward=1.0, p_hat=0.5, policy_version=2)
    assert isinstance(traj, Trajectory) and traj.role == "executor" and traj.group_id == "t"
    assert traj.loss_mask == r.loss_mask and traj.behaviour_logprobs == r.logprobs and traj.p_hat == 0.5


def test_request_seeds_depend_on_who_asks_not_on_order():
    seeds = {request_seed(0, g, s, k) for g in range(4) for s in range(-1, 4) for k in range(3)}
    assert len(seeds) == 4 * 5 * 3  # distinct per (question, sample, request)
    assert request_seed(3, 1, 2, 0) == request_seed(3, 1, 2, 0) != request_seed(4, 1, 2, 0)
    assert all(0 <= s < 2**56 for s in seeds)  # room for vLLM's seed + j of n samples


def test_plan_requests_shares_a_group_prompt_once_then_goes_one_by_one():
    groups = [[Rollout("a", "q", j, [1, 2], group=0) for j in range(3)],
              [Rollout("b", "q", j, [3], group=1) for j in range(2)]]
    ready = {id(r) for g in groups for r in g}
    plan = Executor.plan_requests(groups, ready)
    assert [[r.sample_index for r in m] for m in plan] == [[0, 1, 2], [0, 1]]  # n = group size, prefilled once
    groups[1][0].requests = 1  # one conversation of group b has been sampled: b's samples go alone
    plan = Executor.plan_requests(groups, ready - {id(groups[0][2])})  # a's 3rd sample is at a tool call
    assert [[(r.task_id, r.sample_index) for r in m] for m in plan] == [[("a", 0)], [("a", 1)], [("b", 0)],
                                                                       [("b", 1)]]


# ---------------------------------------------------------------- real rollout
@pytest.fixture(scope="module")
def engine():
    from selfplay.config import EngineConfig, ModelConfig
    from selfplay.engines import make_engine

    eng = make_engine(ModelConfig(max_model_len=1024), EngineConfig(backend="hf"), seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def pool():
    from sandbox import Limits, SandboxPool

    with SandboxPool(Limits(timeout_s=2, cpu_time_s=2), workers=2) as p:
        yield p


def _check_structure(r: Rollout, executor) -> None:
    n = len(r.completion_ids)
    assert len(r.logprobs) == len(r.loss_mask) == n
    assert r.spans and r.spans[0].start == 0 and r.spans[-1].end == n
    assert all(a.end == b.start for a, b in zip(r.spans, r.spans[1:]))  # contiguous, no gaps
    for s in r.spans:
        assert s.end > s.start
        mask, lps = r.loss_mask[s.start:s.end], r.logprobs[s.start:s.end]
        if s.kind == "model":
            assert mask == [1] * len(mask) and all(lp <= 0.0 for lp in lps)
        else:
            assert mask == [0] * len(mask) and lps == [0.0] * len(lps)
    tool_spans = [s for s in r.spans if s.kind == "tool"]
    shown = [c for c in r.tool_calls if c.shown]
    assert len(tool_spans) == len(shown)
    tok = executor.tokenizer
    for s, call in zip(tool_spans, shown):  # tool tokens are exactly the observation text, tokenized alone
        assert r.completion_ids[s.start:s.end] == tok(call.observation, add_special_tokens=False)["input_ids"]
    assert r.prompt_ids == tok(executor.build_prompt(r.question), add_special_tokens=False)["input_ids"]
    assert r.finish in ("eos", "max_tokens", "max_turns", "max_model_len", "malformed")
    assert r.truncated == (r.finish != "eos")
    assert len(r.prompt_ids) + n <= executor.max_model_len


@pytest.mark.slow
def test_real_multi_turn_rollout(engine, pool):
    from roles.executor import Executor

    cfg = ExecutorConfig(max_turns=2, max_tokens_per_turn=16, samples_per_task=2, temperature=0.7)
    executor = Executor(engine, pool, cfg)
    questions = ["What is 6 * 7? Use Python.", "What is 1 / 0?", "Count to infinity."]
    prefills = ["```python\nprint(6 * 7)\n```\n",  # forced first turn: the tool path always runs
                "I will check.\n```python\nprint(1 / 0)\n```\n",
                "```python\nwhile True:\n    pass\n```\n"]
    groups = executor.rollout(questions, task_ids=["mul", "div", "loop"], prefill=prefills)
    assert [len(g) for g in groups] == [2, 2, 2]
    assert [r.task_id for r in groups[0]] == ["mul", "mul"] and [r.sample_index for r in groups[0]] == [0, 1]
    expected = {"mul": ("ok", "42"), "div": ("error", "ZeroDivisionError"), "loop": ("timeout", "[timed out]")}
    for group in groups:
        for r in group:
            _check_structure(r, executor)
            status, needle = expected[r.task_id]
            assert r.n_tool_calls >= 1 and r.statuses[0] == status
            assert r.spans[0].kind == "prefill" and r.spans[1].kind == "tool"
            assert needle in r.tool_calls[0].observation
            assert r.n_tool_calls <= cfg.max_turns
            assert any(s.kind == "model" for s in r.spans) or r.finish == "max_model_len"
            traj = r.to_trajectory(reward=-1.0)
            assert traj.meta["tool_calls"] == r.n_tool_calls and traj.meta["statuses"] == r.statuses


@pytest.mark.slow
def test_real_rollout_hits_max_model_len_without_crashing(engine, pool):
    from roles.executor import Executor

    probe = Executor(engine, pool, ExecutorConfig(max_tokens_per_turn=64))
    prompt_len = len(engine.tokenizer(probe.build_prompt("Add 2 and 3."), add_special_tokens=False)["input_ids"])
    executor = Executor(engine, pool, ExecutorConfig(max_tokens_per_turn=64, max_turns=4), max_model_len=prompt_len + 12)
    [[r]] = executor.rollout(["Add 2 and 3."], n=1)
    _check_structure(r, executor)
    assert r.finish in ("max_model_len", "eos") and len(r.completion_ids) <= 12
    too_long = Executor(engine, pool, ExecutorConfig(), max_model_len=prompt_len)
    [[r]] = too_long.rollout(["Add 2 and 3."], n=1)
    assert r.finish == "max_model_len" and r.completion_ids == [] and r.truncated


@pytest.mark.slow
def test_real_rollout_without_tools_is_one_turn(engine, pool):
    from roles.executor import Executor

    executor = Executor(engine, pool, ExecutorConfig(use_tools=False, max_tokens_per_turn=16))
    assert "```python" not in executor.build_prompt("Add 2 and 3.")
    [[r]] = executor.rollout(["Add 2 and 3."], n=1, prefill="```python\nprint(5)\n```\n")
    _check_structure(r, executor)
    assert r.n_tool_calls == 0 and [s.kind for s in r.spans] == ["prefill", "model"]
    assert r.finish in ("eos", "max_tokens")


def test_executor_rejects_bad_input(engine):
    from roles.executor import Executor

    with pytest.raises(TypeError, match="run_many"):
        Executor(engine, object())
    executor = Executor(engine, lambda codes: [])
    with pytest.raises(ValueError, match="empty"):
        executor.rollout(["  "], n=1)
    with pytest.raises(ValueError, match=">= 1"):
        executor.rollout(["a"], n=0)
    assert executor.rollout([], n=1) == []
    with pytest.raises(ValueError, match="same length"):
        executor.rollout(["a", "b"], task_ids=["x"], n=1)


def test_a_turn_that_never_ends_in_a_call_stops_after_the_resume_budget(engine):
    """A stop string that opens no tool call resumes the turn; after MAX_RESUMES_PER_TURN resumes the rollout
    ends as malformed instead of looping (here every "e" the greedy model writes is such a stop)."""
    from roles.executor import Executor

    calls = []
    executor = Executor(engine, lambda codes, **kw: calls.extend(codes) or [],
                        ExecutorConfig(stop=["e"], temperature=0.0, max_tokens_per_turn=32, max_turns=2))
    [[r]] = executor.rollout(["Write a long essay about the trees of the forest and the rivers."], n=1)
    assert r.finish == "malformed" and r.malformed == ["too_many_resumes"], (r.finish, r.malformed, r.text)
    assert r.resumes == MAX_RESUMES_PER_TURN + 1 and r.text.count("e") == MAX_RESUMES_PER_TURN + 1
    assert calls == [] and r.n_tool_calls == 0


@pytest.mark.slow
def test_per_conversation_schedule_samples_what_rounds_sample_on_vllm(pool):
    """The same seed gives the same trajectories whether conversations advance in rounds or each on its own
    (vLLM's request-level API, tool calls overlapping generation): same requests, same per-request seeds.

    Group 2's prefill is a whole tool call: on rounds its two samples share their first request (n = 2, one
    seed); per conversation they must wait for each other's call to share it too (they once went one by one,
    with other seeds). Same seeds give the same tokens only where the logits do not depend on which other
    requests share a forward pass, which vLLM does not promise; so this engine decodes one sequence at a
    time without prefix caching, and any difference left is the schedule's."""
    from roles.executor import Executor
    from selfplay.config import EngineConfig, ModelConfig
    from selfplay.engines import make_engine

    eng = make_engine(ModelConfig(max_model_len=1024),
                      EngineConfig(backend="vllm", max_batch_size=1, enable_prefix_caching=False,
                                   kv_cache_space_gib=1.0), seed=0)
    questions = ["What is 6 * 7? Use Python.", "What is the 10th prime?", "Sum the numbers 1..100.",
                 "What is 2 ** 20?"]
    prefill = ["```python\n", None, "```python\nprint(6 * 7)\n```\n", "```python\n"]  # tool calls on turn 1
    try:
        seen = {}
        for schedule, seed in (("rounds", 11), ("conversations", 11), ("conversations", 12)):
            cfg = ExecutorConfig(max_turns=2, max_tokens_per_turn=40, samples_per_task=2, temperature=0.8,
                                 schedule=schedule)
            executor = Executor(eng, pool, cfg)
            assert executor.per_conversation == (schedule == "conversations")
            groups = executor.rollout(questions, prefill=prefill, seed=seed)
            for r in (r for g in groups for r in g):
                _check_structure(r, executor)
            seen[schedule, seed] = [(r.completion_ids, r.logprobs, r.statuses, r.finish, [c.code for c in r.tool_calls])
                                    for g in groups for r in g]
        rounds, conversations = seen["rounds", 11], seen["conversations", 11]
        assert sum(len(s[2]) for s in rounds) >= 4  # multi-turn: tool calls were made and answered
        assert [s[:1] + s[2:] for s in conversations] == [s[:1] + s[2:] for s in rounds]
        for a, b in zip(conversations, rounds):
            assert a[1] == pytest.approx(b[1], abs=1e-4)
        assert seen["conversations", 12] != conversations  # the seed is really used
    finally:
        eng.close()


def test_conversations_schedule_needs_an_engine_with_a_request_api(engine, pool):
    from roles.executor import Executor

    executor = Executor(engine, pool, ExecutorConfig(schedule="conversations"))
    with pytest.raises(ValueError, match="executor.schedule=conversations"):
        executor.rollout(["Add 2 and 3."], n=1)
    assert not Executor(engine, pool, ExecutorConfig()).per_conversation  # auto on hf: rounds
