"""The verifier: majority vote over the executor's k answers -> pseudo-label, p_hat, band filter, rewards.

There is no ground truth in self-play: the executor's most common answer (grouping answers that are
mathematically equal, not just equal strings) becomes the task's pseudo-label, and the share of samples
agreeing with it, p_hat, measures how hard the task is (Agent0 arXiv 2511.16043 Eq. 2; R-Zero arXiv
2508.05004). p_hat's denominator is all k samples: a sample without an extractable answer counts as
disagreeing, so a task most samples fail to answer is not mistaken for an easy one.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from roles.answers import Answer, answer_key, extract_answer, normalize_answer
from roles.equivalence import EquivalenceChecker, Verdict
from selfplay.config import VerifierConfig


@dataclass
class Vote:
    """The outcome of one task's vote. `reason`: "majority", "tie" (largest classes of equal size: the one
    whose first answer came first wins, deterministically) or "all_invalid" (no sample had an answer)."""

    label: str | None  # the pseudo-label (normalised answer text), None when all_invalid
    p_hat: float  # size of the majority class / k (invalid samples included in k)
    k: int
    answers: list[Answer | None]
    class_of: list[int | None]  # equivalence class of each sample's answer; None for no answer
    class_sizes: list[int]
    majority: int | None  # index into class_sizes
    reason: str
    in_band: bool
    timeouts: int = 0  # comparisons that hit the equivalence deadline (counted as "different")
    errors: int = 0

    @property
    def tie(self) -> bool:
        return self.reason == "tie"

    @property
    def n_invalid(self) -> int:
        return sum(a is None for a in self.answers)

    @property
    def agrees(self) -> list[bool]:
        """Per sample: does its answer belong to the majority class?"""
        return [c is not None and c == self.majority for c in self.class_of]


@dataclass
class _Class:
    first: int  # index of the first sample in this class
    rep: str  # representative answer (normalised text of the first sample)
    members: list[int] = field(default_factory=list)


def in_band(p_hat: float, low: float, high: float) -> bool:
    """Agent0/R-Zero task filter: keep tasks the executor solves sometimes, 0.3 <= p_hat <= 0.8 by default."""
    return low <= p_hat <= high


def executor_rewards(vote: Vote, correct: float = 1.0, wrong: float = -1.0, format_penalty: float = -1.0) -> list[float]:
    """Per sample: `correct` if its answer is in the majority class, `format_penalty` if it has no answer,
    else `wrong` (Agent0 executor: +1 / -1 against the pseudo-label)."""
    return [
        format_penalty if a is None else correct if agree else wrong
        for a, agree in zip(vote.answers, vote.agrees)
    ]


class Verifier:
    """Votes, filters and rewards; owns the equivalence worker (call `close()` or use it as a context manager)."""

    def __init__(self, cfg: VerifierConfig | None = None, checker: EquivalenceChecker | None = None):
        self.cfg = cfg or VerifierConfig()
        self.checker = checker or EquivalenceChecker(timeout_s=self.cfg.equivalence_timeout_s)

    def extract(self, text: str | None) -> Answer | None:
        return extract_answer(text, fallbacks=self.cfg.answer_fallbacks)

    def compare(self, a: str, b: str) -> Verdict:
        """Normalised-string identity first (no process round trip), then math-verify under the deadline."""
        if answer_key(a) == answer_key(b):
            return "equal"
        return self.checker.check(a, b)

    def same(self, a: str, b: str) -> bool:
        """Equivalence as a plain predicate (timeouts and errors count as different); for evaluation."""
        return self.compare(a, b) == "equal"

    def vote(self, texts: Sequence[str | None]) -> Vote:
        """Vote over k completions (pass the executor's model text; None for a sample that failed outright)."""
        if len(texts) == 0:
            raise ValueError("vote needs at least one completion (k >= 1)")
        answers = [self.extract(t) for t in texts]
        classes: list[_Class] = []
        by_key: dict[str, int] = {}
        class_of: list[int | None] = []
        # A timeout is blamed on the newcomer (it is not compared again); a class representative is skipped
        # after its second timeout. Bounds the deadlines one vote can hit to about k + 2 * classes.
        slow: set[str] = set()
        rep_timeouts: Counter[int] = Counter()
        timeouts = errors = 0
        for i, ans in enumerate(answers):
            if ans is None:
                class_of.append(None)
                continue
            key = answer_key(ans.text)
            found = by_key.get(key)
            if found is None and key not in slow:
                for c, cls in enumerate(classes):
                    if rep_timeouts[c] >= 2:
                        continue
                    verdict = self.checker.check(cls.rep, ans.text)
                    if verdict == "equal":
                        found = c
                        break
                    if verdict == "timeout":
                        timeouts += 1
                        rep_timeouts[c] += 1
                        slow.add(key)
                        break
                    errors += verdict == "error"
            if found is None:
                found = len(classes)
                classes.append(_Class(first=i, rep=ans.text))
            classes[found].members.append(i)
            by_key.setdefault(key, found)
            class_of.append(found)
        k = len(texts)
        sizes = [len(c.members) for c in classes]
        if not classes:
            return Vote(None, 0.0, k, answers, class_of, sizes, None, "all_invalid",
                        in_band(0.0, self.cfg.band_low, self.cfg.band_high), timeouts, errors)
        top = max(sizes)
        majority = min((c for c in range(len(classes)) if sizes[c] == top), key=lambda c: classes[c].first)
        reason = "tie" if sizes.count(top) > 1 else "majority"
        p_hat = top / k
        return Vote(classes[majority].rep, p_hat, k, answers, class_of, sizes, majority, reason,
                    in_band(p_hat, self.cfg.band_low, self.cfg.band_high), timeouts, errors)

    def rewards(self, vote: Vote) -> list[float]:
        return executor_rewards(vote, self.cfg.correct_reward, self.cfg.wrong_reward, self.cfg.format_penalty)

    def matches(self, text: str | None, reference: str) -> bool:
        """Does a completion's final answer equal a known reference answer? (evaluation with ground truth)"""
        ans = self.extract(text)
        return ans is not None and self.same(normalize_reference(reference), ans.text)

    def close(self) -> None:
        self.checker.close()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def normalize_reference(reference: str) -> str:
    """A reference may come boxed or plain; compare its content."""
    ans = extract_answer(reference, fallbacks=False)
    return ans.text if ans is not None else normalize_answer(reference)
