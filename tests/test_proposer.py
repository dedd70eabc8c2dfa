"""Proposer: parsing of malformed replies, Agent0 reward terms against hand-computed values, real generation."""
from __future__ import annotations

import random

import numpy as np
import pytest

from roles.proposer import REJECT_REASONS, Proposer, leaks_answer, parse_task
from roles.proposer_reward import ProposerReward, score_batch, tool_reward, uncertainty_reward
from roles.repetition import average_linkage, bleu_similarity, repetition_penalties
from selfplay.config import ProposerConfig
from selfplay.types import Trajectory


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,finish,reason", [
    ("What is 2+2?", "stop", "no_question"),
    ("<question>What is 2+2?", "stop", "unclosed_question"),
    ("<question>What is 2+2? Let me think about a long", "length", "truncated"),
    ("<question>A</question><answer>5</answer> and more text", "length", "truncated"),
    ("<question>a <question>b</question> c</question>", "stop", "nested_tags"),
    ("<question>Find x. <answer>3</answer></question>", "stop", "nested_tags"),
    ("<question>   \u200b\n</question>", "stop", "empty_question"),
    (r"<question>Compute 2+3. Hint: \boxed{5}</question>", "stop", "answer_leak"),
    ("<question>What is 6*7? The answer is 42.</question><answer>42</answer>", "stop", "answer_leak"),
    ("<question>Show that 6*7 = 42</question><answer>42</answer>", "stop", "answer_leak"),
])
def test_rejections_carry_a_reason(text, finish, reason):
    task = parse_task(text, finish)
    assert not task.ok
    assert task.reason == reason and reason in REJECT_REASONS


def test_accepted_task_with_answer_unwrapped():
    task = parse_task(r"<question>What is 6*7?</question>" "\n" r"<answer>\boxed{42}</answer>")
    assert task.ok and task.question == "What is 6*7?" and task.answer == "42"


def test_tags_are_case_insensitive_and_unicode_is_kept():
    task = parse_task("<Question> Find the smallest n with n² > 50 — in ℕ. </QUESTION>")
    assert task.ok and task.question == "Find the smallest n with n² > 50 — in ℕ."
    assert task.answer is None  # the answer tag is optional


def test_last_complete_question_wins_and_empty_answer_is_none():
    task = parse_task("<question>draft</question> better: <question>Final one?</question><answer> </answer>")
    assert task.ok and task.question == "Final one?" and task.answer is None


def test_leak_check_does_not_fire_on_unrelated_numbers():
    assert not leaks_answer("How many primes are below 42?", "13")
    assert not leaks_answer("Compute 3.5 * 2. Give a decimal.", "7")
    assert leaks_answer("Compute 3.5 * 2. The answer is 7.", "7")


# ---------------------------------------------------------------- reward terms, by hand
def test_uncertainty_term():
    assert uncertainty_reward(0.5) == 1.0
    assert uncertainty_reward(0.7) == pytest.approx(1 - 2 * 0.2)  # 0.6
    assert uncertainty_reward(0.0) == 0.0 and uncertainty_reward(1.0) == 0.0
    with pytest.raises(ValueError):
        uncertainty_reward(1.5)


def test_tool_term_is_capped_and_averaged_over_trajectories():
    # gamma=0.05, C=4: min(n,4) = 0, 2, 4, 4 -> 0.05 * (0+2+4+4) / 4
    assert tool_reward([0, 2, 5, 4], gamma=0.05, cap=4) == pytest.approx(0.05 * 10 / 4)
    assert tool_reward([], 0.05, 4) == 0.0


def test_bleu_by_hand():
    # hyp "a b c d e" vs ref "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2 (no zero counts, so no
    # smoothing), equal lengths so brevity penalty 1; BLEU = geometric mean, the same in both directions.
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu_similarity("a b c d e", "a b c d f") == pytest.approx(expected, abs=1e-9)
    assert bleu_similarity("same text here", "same text here") == 1.0
    assert bleu_similarity("alpha beta gamma", "one two three") == pytest.approx(0.0, abs=1e-9)


def test_average_linkage_differs_from_single_linkage():
    # {0,1} merge at 0.2; then avg distance({0,1}, 2) = (0.45 + 0.7) / 2 = 0.575 >= 0.5: 2 stays alone
    # (single linkage would merge it at 0.45).
    d = np.array([[0, 0.2, 0.45], [0.2, 0, 0.7], [0.45, 0.7, 0]])
    assert average_linkage(d, 0.5) == [0, 0, 1]
    assert average_linkage(d, 0.6) == [0, 0, 0]
    assert average_linkage(d, 0.2) == [0, 1, 2]  # strict: merges only below the threshold


def test_repetition_penalty_is_cluster_share():
    texts = ["What is the sum of the first ten primes?", "What is the sum of the first ten primes?",
             "How many subsets of a 5-element set have an odd number of elements?"]
    penalties, labels = repetition_penalties(texts, lambda_rep=1.0, tau=0.5)
    assert labels == [0, 0, 1]
    assert penalties == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert repetition_penalties(texts, lambda_rep=0.5)[0] == pytest.approx([1 / 3, 1 / 3, 1 / 6])
    assert repetition_penalties([]) == ([], [])


def test_score_batch_by_hand():
    # lambda_unc 1, lambda_tool 1, gamma 0.05, C 4, lambda_rep 1, tau 0.5, clamp on; the paper's form (no gate)
    cfg = ProposerConfig(require_agreement=False)
    q_dup = "What is the sum of the first ten primes?"
    q_other = "How many subsets of a 5-element set have an odd number of elements?"
    out = score_batch([q_dup, q_dup, None, q_other], [0.7, 0.2, None, 0.5], [[1, 3], [0, 0], [], [6, 2]], cfg)
    assert all(isinstance(r, ProposerReward) for r in out)
    # B = 3 accepted tasks: clusters {0, 1} and {3}
    # task 0: R_unc 1-2*0.2 = 0.6; R_tool 0.05*(1+3)/2 = 0.1; R_rep 2/3 -> max(0, 0.7 - 0.6667) = 0.0333
    assert out[0].uncertainty == pytest.approx(0.6) and out[0].tool == pytest.approx(0.1)
    assert out[0].repetition == pytest.approx(2 / 3)
    assert out[0].total == pytest.approx(0.6 + 0.1 - 2 / 3)
    # task 1: R_unc 1-2*0.3 = 0.4; R_tool 0; R_rep 2/3 -> clamped to 0
    assert out[1].total == 0.0 and out[1].uncertainty == pytest.approx(0.4)
    # task 2: format failure
    assert out[2].format_ok is False and out[2].total == cfg.format_penalty == -1.0
    # task 3: R_unc 1; R_tool 0.05*(4+2)/2 = 0.15; R_rep 1/3
    assert out[3].total == pytest.approx(1 + 0.15 - 1 / 3)
    unclamped = score_batch([q_dup, q_dup, None, q_other], [0.7, 0.2, None, 0.5], [[1, 3], [0, 0], [], [6, 2]],
                            cfg.model_copy(update={"clamp_nonnegative": False, "lambda_unc": 0.5}))
    assert unclamped[1].total == pytest.approx(0.5 * 0.4 - 2 / 3)  # Agent0's code: min(p, 1-p), no clamp


def test_score_batch_checks_alignment():
    with pytest.raises(ValueError, match="align"):
        score_batch(["q"], [0.5, 0.5], [[1]])
    with pytest.raises(ValueError, match="require_agreement needs"):
        score_batch(["q"], [0.5], [[1]], ProposerConfig())


def test_agreement_gate_zeroes_ambiguous_and_disowned_tasks():
    """Agent0's code: no reward unless the majority answer is the proposer's own and p_hat > 0.1. A 2/2 tie
    (k = 4) whose majority is not the proposer's answer earns the top uncertainty reward without the gate."""
    qs = ["What is 2 + 2?", "How many primes are below 20?", "What is 7 factorial?", "Name a prime above 90."]
    p_hats, tools, agrees = [0.5, 0.5, 0.1, 0.6], [[], [], [], []], [False, True, True, None]
    off = score_batch(qs, p_hats, tools, ProposerConfig(require_agreement=False, lambda_rep=0.0), agrees)
    assert off[0].total == pytest.approx(1.0) and not any(r.gated for r in off)
    on = score_batch(qs, p_hats, tools, ProposerConfig(lambda_rep=0.0), agrees)
    assert [r.gated for r in on] == [True, False, True, True]  # disowned; kept; p_hat not > 0.1; no majority
    assert [r.total for r in on] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert on[0].uncertainty == pytest.approx(1.0)  # the parts stay visible
    looser = score_batch(qs, p_hats, tools, ProposerConfig(lambda_rep=0.0, agreement_min_p_hat=0.05), agrees)
    assert looser[2].total == pytest.approx(0.2) and not looser[2].gated


# ---------------------------------------------------------------- prompts and real generation
@pytest.fixture(scope="module")
def engine():
    from selfplay.config import EngineConfig, ModelConfig
    from selfplay.engines import make_engine

    eng = make_engine(ModelConfig(max_model_len=1024), EngineConfig(backend="hf"), seed=0)
    yield eng
    eng.close()


def test_prompt_uses_chat_template_topic_and_examples(engine):
    p = Proposer(engine, ProposerConfig(conditioning_examples=1))
    text = p.build_prompt("modular arithmetic", ["Find 3^100 mod 7.", "Second earlier task."])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n<question>")
    assert p_noprefix(engine).build_prompt("x").endswith("<|im_start|>assistant\n")
    assert "modular arithmetic" in text and "Find 3^100 mod 7." in text
    assert "Second earlier task." not in text  # only conditioning_examples of them
    assert "<question>" in text
    assert p.propose(count=0) == []
    with pytest.raises(ValueError, match="count"):
        p.propose(count=-1)


def p_noprefix(engine):
    return Proposer(engine, ProposerConfig(response_prefix=""))


@pytest.mark.parametrize("completion, finish, question, reason", [
    ("What is 2+3?</question>\n<answer>5</answer>", "stop", "What is 2+3?", None),
    ("What is 2+3?", "stop", "What is 2+3?", None),                       # closed at EOS
    ("What is 2+3?\n<answer>5</answer>", "stop", "What is 2+3?", None),   # closed where the answer starts
    ("What is 2+3? And then", "length", None, "truncated"),               # cut by max_tokens: not closed
    ("", "stop", None, "empty_question"),
])
def test_reply_text_with_forced_prefix(engine, completion, finish, question, reason):
    p = Proposer(engine, ProposerConfig())
    task = parse_task(p.reply_text(completion, finish), finish)
    assert task.reason == reason and (question is None or task.question == question)
    # without the prefix the model must open the tag itself
    assert parse_task(p_noprefix(engine).reply_text("What is 2+3?", "stop"), "stop").reason == "no_question"


def test_prompt_dir_overrides_one_file(engine, tmp_path):
    (tmp_path / "proposer_user.txt").write_text("Custom ask about {{ topic }}.")
    p = Proposer(engine, ProposerConfig(prompt_dir=str(tmp_path)))
    text = p.build_prompt("primes")
    assert "Custom ask about primes." in text and "problem setter" in text  # system file from the package
    (tmp_path / "proposer_user.txt").write_text("{{ undefined_variable }}")
    with pytest.raises(ValueError, match="undefined_variable"):
        Proposer(engine, ProposerConfig(prompt_dir=str(tmp_path))).build_prompt()
    with pytest.raises(FileNotFoundError):
        Proposer(engine, ProposerConfig(prompt_dir=str(tmp_path / "missing")))


@pytest.mark.slow
def test_propose_on_the_embedded_model(engine):
    cfg = ProposerConfig(group_size=2, max_tokens=48, topics=["arithmetic"], conditioning_examples=1)
    proposals = Proposer(engine, cfg).propose(count=1, pool=["What is 12 * 12?"], rng=random.Random(0))
    assert len(proposals) == 2 and proposals[0].group_id == proposals[1].group_id
    for prop in proposals:
        assert prop.topic == "arithmetic" and prop.examples == ["What is 12 * 12?"]
        assert len(prop.completion_ids) == len(prop.logprobs) > 0
        # what the model was asked: the topic and the example, the reply opened by the forced prefix
        prompt = engine.tokenizer.decode(prop.prompt_ids)
        assert "arithmetic" in prompt and "What is 12 * 12?" in prompt and prompt.endswith(cfg.response_prefix)
        # the parsed task is the parse of the sampled tokens (prefix included), not of some other text
        reply = engine.tokenizer.decode(prop.completion_ids, skip_special_tokens=True)
        assert prop.text == Proposer(engine, cfg).reply_text(reply, prop.finish_reason)
        assert prop.task == parse_task(prop.text, prop.finish_reason)
        assert prop.finish_reason in ("stop", "length") and all(lp <= 0.0 for lp in prop.logprobs)
        if prop.finish_reason == "length":
            assert len(prop.completion_ids) == cfg.max_tokens
        assert prop.task == parse_task(prop.text, prop.finish_reason)
    rewards = score_batch([p.task.question if p.task.ok else None for p in proposals], [0.5, 0.5], [[1], [1]], cfg,
                          agrees=[True, True])
    traj = proposals[0].to_trajectory(rewards[0], policy_version=3)
    assert isinstance(traj, Trajectory) and traj.role == "proposer"
    assert traj.loss_mask == [1] * len(traj.completion_ids) and traj.reward == rewards[0].total
    assert traj.meta["reward_parts"]["format_ok"] == proposals[0].task.ok
