"""Final answers in model text: find them (last \\boxed{}, then fallbacks) and normalise them.

One module because three roles read answers the same way: the verifier votes on them, the executor records
its final answer, the proposer checks its own answer and refuses questions that leak one. Normalisation only
removes presentation (dollar signs, \\left, \\text{} units, thousands separators); deciding that two
different-looking answers are equal is the verifier's job (math-verify, with a hard timeout).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Method = Literal["boxed", "phrase", "last_number"]

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed[ \t]+([^\s$]+)")  # \boxed 5 (no braces)
# "The final answer is X", "Answer: X"; X runs to the end of the line or of the sentence.
_PHRASE = re.compile(r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_UNITS = re.compile(r"(-?[\d.,/]+)\s+(?:[A-Za-z]{2,}\.?\s*)+")  # "5 cm", "3 apples" (not "2 x")
_LHS = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")  # "x = 5" -> "5"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class Answer:
    text: str  # normalised
    raw: str  # as written
    method: Method  # where it was found


def boxed_contents(text: str) -> list[str]:
    """Contents of every closed \\boxed{...} / \\fbox{...} in order, nested braces kept; unclosed ones skipped."""
    found: list[tuple[int, str]] = []
    for m in _BOX_OPEN.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end(): i - 1]))
    found += [(m.start(), m.group(1)) for m in _BOX_BARE.finditer(text)]
    return [c for _, c in sorted(found)]


def has_boxed(text: str) -> bool:
    return bool(_BOX_OPEN.search(text) or _BOX_BARE.search(text))


def _phrase_answer(text: str) -> str | None:
    matches = list(_PHRASE.finditer(text))
    if not matches:
        return None
    value = matches[-1].group(1)
    end = _SENTENCE_END.search(value)
    value = value[: end.start()] if end else value
    value = value.strip().strip("*").strip()
    return value if 0 < len(value) <= 100 else None


def extract_answer(text: str | None, fallbacks: bool = True) -> Answer | None:
    """The final answer: the last closed \\boxed{}; with `fallbacks`, else the last "answer is X", else the
    last number. None when nothing usable is there (the format failure the rewards penalise)."""
    if not text:
        return None
    candidates: list[tuple[str, Method]] = []
    boxed = boxed_contents(text)
    if boxed:
        candidates.append((boxed[-1], "boxed"))
    if fallbacks:
        phrase = _phrase_answer(text)
        if phrase is not None:
            candidates.append((phrase, "phrase"))
        numbers = _NUMBER.findall(text)
        if numbers:
            candidates.append((numbers[-1], "last_number"))
    for raw, method in candidates:
        norm = normalize_answer(raw)
        if norm:
            return Answer(norm, raw.strip(), method)
    return None


def normalize_answer(s: str) -> str:
    """Drop presentation, keep meaning: `$\\dfrac{1}{2}$.` -> `\\frac{1}{2}`, `5\\text{ cm}` -> `5`."""
    s = s.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left): len(s) - len(right)].strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\b|\\right\b", "", s)
    s = re.sub(r"\\[!,;:]|\\ |~", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = _TEXT_CMD.sub(lambda m: " " + m.group(1).strip() + " ", s)
    s = _THOUSANDS.sub("", s)
    if s.count("=") == 1:
        s = _LHS.sub("", s)
    s = re.sub(r"\s+", " ", s).strip()
    m = _UNITS.fullmatch(s)
    if m:
        s = m.group(1)
    return s.rstrip(".").strip()


def answer_key(s: str) -> str:
    """A cheap identity for answers: normalised, whitespace removed ("(0, 1]" == "(0,1]")."""
    return re.sub(r"\s+", "", normalize_answer(s))
