"""Verifier: answer extraction, equivalence under a hard timeout, majority vote, band filter, rewards."""
from __future__ import annotations

import time

import pytest

from roles.answers import boxed_contents, extract_answer, normalize_answer
from roles.equivalence import EquivalenceChecker
from roles.verifier import Verifier, executor_rewards, in_band
from selfplay.config import VerifierConfig


@pytest.fixture(scope="module")
def verifier():
    with Verifier(VerifierConfig(answer_fallbacks=False, equivalence_timeout_s=2.0)) as v:
        yield v


# ---------------------------------------------------------------- extraction
def test_last_boxed_with_nested_braces():
    text = r"first \boxed{1} then \boxed{\frac{\sqrt{3}}{2}} done"
    assert boxed_contents(text) == ["1", r"\frac{\sqrt{3}}{2}"]
    assert extract_answer(text).text == r"\frac{\sqrt{3}}{2}"
    assert extract_answer(text).method == "boxed"


def test_unclosed_boxed_is_skipped_and_fallbacks_are_optional():
    text = r"so it is \boxed{7} ... actually \boxed{8"
    assert extract_answer(text, fallbacks=False).text == "7"
    assert extract_answer(r"only \boxed{8", fallbacks=False) is None
    assert extract_answer(r"only \boxed{8", fallbacks=True).text == "8"  # last number


def test_fallbacks_phrase_then_last_number():
    assert extract_answer("We get 3 and 4. The answer is 12.").text == "12"
    assert extract_answer("We get 3 and 4. The answer is 12.").method == "phrase"
    assert extract_answer("values 3, then 4.5").text == "4.5"
    assert extract_answer("values 3, then 4.5").method == "last_number"
    assert extract_answer("no digits at all") is None
    assert extract_answer("") is None and extract_answer(None) is None
    assert extract_answer(r"\boxed{}", fallbacks=False) is None


def test_unicode_and_presentation_are_normalised():
    assert extract_answer(r"so \boxed{π²}").text == "π²"
    assert normalize_answer(r"$\dfrac{3}{4}$.") == r"\frac{3}{4}"
    assert normalize_answer(r"5\text{ cm}") == "5"
    assert normalize_answer("1,000,000") == "1000000"
    assert normalize_answer("x = 7") == "7"
    assert normalize_answer(r"90^\circ") == "90"
    assert normalize_answer("2 x") == "2 x"  # a variable is not a unit


# ---------------------------------------------------------------- equivalence
EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),  # fraction vs decimal
    ("3", "3.0"),  # decimals
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),  # LaTeX forms
    (r"5\text{ cm}", "5"),  # units
    ("(0,1]", "(0, 1]"),  # intervals
    (r"\{1,2\}", r"\{2,1\}"),  # sets
    ("1,000", "1000"),
    ("10^{2}", "100"),
]
DIFFERENT = [
    ("2", "3"),
    ("0.333", r"\frac{1}{3}"),
    ("(0,1]", "[0,1]"),  # open vs closed end
    (r"\{1,2\}", r"\{1,3\}"),
    (r"\pi", "3.14159"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_pairs(verifier, a, b):
    assert verifier.compare(a, b) == "equal"
    assert verifier.same(b, a)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_pairs(verifier, a, b):
    assert verifier.compare(a, b) == "different"
    assert not verifier.same(a, b)


def test_hanging_sympy_input_times_out_and_the_worker_recovers():
    with EquivalenceChecker(timeout_s=1.0) as checker:
        assert checker.check("2", "2.0") == "equal"  # worker started
        start = time.monotonic()
        verdict = checker.check("9^{9^{9^{9}}}", "1")  # sympy evaluates the power tower: hangs without a kill
        elapsed = time.monotonic() - start
        assert verdict == "timeout"
        assert elapsed < 30  # the deadline is 1 s; without the kill this never returns
        assert checker.restarts == 1
        assert checker.check(r"\frac{1}{4}", "0.25") == "equal"  # a fresh worker answers again


def test_checker_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        EquivalenceChecker(timeout_s=0)


# ---------------------------------------------------------------- voting
def test_vote_groups_equivalent_answers_and_counts_invalid_in_denominator(verifier):
    texts = [r"\boxed{1/2}", r"\boxed{0.5}", r"\boxed{3}", "I give up", r"\boxed{\frac{1}{2}}"]
    vote = verifier.vote(texts)
    assert vote.reason == "majority" and not vote.tie
    assert vote.label == "1/2"  # the first answer of the majority class
    assert vote.class_of == [0, 0, 1, None, 0]
    assert vote.class_sizes == [3, 1]
    assert vote.p_hat == pytest.approx(3 / 5)  # the sample without an answer counts in k
    assert vote.n_invalid == 1
    assert vote.in_band  # 0.3 <= 0.6 <= 0.8
    assert verifier.rewards(vote) == [1.0, 1.0, -1.0, -1.0, 1.0]


def test_vote_tie_is_deterministic_and_reported(verifier):
    vote = verifier.vote([r"\boxed{2}", r"\boxed{3}", r"\boxed{3}", r"\boxed{2.0}"])
    assert vote.reason == "tie" and vote.tie
    assert vote.label == "2"  # the class whose first answer came first
    assert vote.p_hat == pytest.approx(0.5)
    again = verifier.vote([r"\boxed{2}", r"\boxed{3}", r"\boxed{3}", r"\boxed{2.0}"])
    assert again.label == vote.label and again.class_of == vote.class_of


def test_vote_all_invalid(verifier):
    vote = verifier.vote(["", None, "no boxed answer 42"])
    assert vote.reason == "all_invalid"
    assert vote.label is None and vote.majority is None
    assert vote.p_hat == 0.0 and not vote.in_band
    assert verifier.rewards(vote) == [-1.0, -1.0, -1.0]


def test_vote_needs_samples(verifier):
    with pytest.raises(ValueError, match="at least one"):
        verifier.vote([])


def test_vote_survives_a_hanging_answer():
    with Verifier(VerifierConfig(answer_fallbacks=False, equivalence_timeout_s=1.0)) as v:
        vote = v.vote([r"\boxed{1}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{1.0}", r"\boxed{(10^{7})!}"])
    assert vote.timeouts >= 1
    assert vote.label == "1" and vote.class_sizes[vote.majority] == 2
    assert vote.p_hat == pytest.approx(0.5)


def test_band_filter_edges():
    assert in_band(0.3, 0.3, 0.8) and in_band(0.8, 0.3, 0.8)
    assert not in_band(0.29, 0.3, 0.8) and not in_band(0.81, 0.3, 0.8)
    with pytest.raises(ValueError):
        VerifierConfig(band_low=0.9, band_high=0.1)


def test_reward_values_come_from_config(verifier):
    vote = verifier.vote([r"\boxed{4}", r"\boxed{4}", r"\boxed{5}", "nothing"])
    assert executor_rewards(vote, correct=1.0, wrong=0.0, format_penalty=-0.5) == [1.0, 1.0, 0.0, -0.5]


def test_matches_reference(verifier):
    assert verifier.matches(r"... so \boxed{0.25}", r"\frac{1}{4}")
    assert verifier.matches(r"\boxed{0.25}", r"\boxed{\frac{1}{4}}")
    assert not verifier.matches(r"\boxed{0.2}", "1/4")
    assert not verifier.matches("no answer", "1/4")
