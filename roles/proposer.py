"""The proposer: asks the model for one new checkable problem, parses it, rejects broken ones with a reason.

The prompt (roles/prompts/proposer_*.txt) may name a topic and show a few earlier pool tasks to steer away
from; the reply carries the problem in <question>...</question> and, optionally, the proposer's own answer in
<answer>...</answer>. Rejected proposals (format failures) get the format penalty in roles/proposer_reward.py.
"""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from roles.answers import answer_key, boxed_contents, has_boxed, normalize_answer
from roles.proposer_reward import ProposerReward
from roles.templates import PromptTemplates, chat_prompt, encode
from selfplay.config import ProposerConfig
from selfplay.types import SamplingParams, Trajectory

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_TAG = re.compile(r"<\s*(/?)\s*(question|answer)\s*>", re.IGNORECASE)

# Reasons a proposal is rejected (ParsedTask.reason).
REJECT_REASONS = (
    "truncated",  # hit max_tokens: the task may be cut off
    "no_question",  # no <question> tag
    "unclosed_question",  # <question> without </question>
    "nested_tags",  # <question> inside <question>, or <answer> inside <question>
    "empty_question",
    "answer_leak",  # the question shows its answer (\boxed{}, "the answer is X", "... = X")
)


@dataclass
class ParsedTask:
    question: str | None
    answer: str | None  # the proposer's own final answer, normalised; optional
    reason: str | None = None  # None when accepted, else one of REJECT_REASONS

    @property
    def ok(self) -> bool:
        return self.reason is None


def _blocks(text: str, name: str) -> tuple[list[str], str | None]:
    """Contents of complete <name>...</name> blocks, or an error reason (nested / unclosed)."""
    blocks, depth, start = [], 0, 0
    for m in _TAG.finditer(text):
        if m.group(2).lower() != name:
            continue
        closing = bool(m.group(1))
        if not closing:
            if depth:
                return blocks, "nested_tags"
            depth, start = 1, m.end()
        elif depth:
            blocks.append(text[start: m.start()])
            depth = 0
    if depth:
        return blocks, "unclosed"
    return blocks, None


def leaks_answer(question: str, answer: str | None) -> bool:
    """True when the question gives its answer away: any \\boxed{}, or the answer stated after "answer is" /
    "answer:" or as the final "= X"."""
    if has_boxed(question):
        return True
    if not answer:
        return False
    key = answer_key(answer)
    stated = r"(?:answer|solution)\s*(?:is|:|=)\s*(.+?)(?:[.;!?,]?\s*$|[.;!?,]\s)"
    for m in re.finditer(stated, question, re.IGNORECASE | re.MULTILINE):
        if answer_key(m.group(1)) == key:
            return True
    tail = re.search(r"=\s*([^=\n]+?)\s*[.?!]?\s*$", question)
    return bool(tail and answer_key(tail.group(1)) == key)


def parse_task(text: str, finish_reason: str = "stop") -> ParsedTask:
    """The task in a proposer completion; rejects with a reason instead of raising. With several complete
    <question> blocks the last one counts (models sometimes draft, then write the final version)."""
    text = _INVISIBLE.sub("", text or "")
    questions, problem = _blocks(text, "question")
    if problem == "nested_tags":
        return ParsedTask(None, None, "nested_tags")
    if finish_reason == "length":
        return ParsedTask(questions[-1].strip() if questions else None, None, "truncated")
    if not questions:
        return ParsedTask(None, None, "unclosed_question" if problem == "unclosed" else "no_question")
    question = questions[-1].strip()
    if not question:
        return ParsedTask(None, None, "empty_question")
    if _TAG.search(question):
        return ParsedTask(question, None, "nested_tags")
    answers, _ = _blocks(text, "answer")
    answer = None
    if answers and answers[-1].strip():
        raw = answers[-1].strip()
        boxed = boxed_contents(raw)
        answer = normalize_answer(boxed[-1] if boxed else raw) or None
    if leaks_answer(question, answer):
        return ParsedTask(question, answer, "answer_leak")
    return ParsedTask(question, answer, None)


@dataclass
class Proposal:
    """One sampled proposer completion with its tokens (for GRPO) and the parsed task."""

    task_id: str
    group_id: str  # proposals from the same prompt form one GRPO group
    topic: str | None
    examples: list[str]
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    task: ParsedTask
    meta: dict[str, Any] = field(default_factory=dict)

    def to_trajectory(self, reward: float | ProposerReward, policy_version: int = 0) -> Trajectory:
        parts = reward.as_dict() if isinstance(reward, ProposerReward) else {}
        total = reward.total if isinstance(reward, ProposerReward) else float(reward)
        return Trajectory(
            role="proposer", task_id=self.task_id, group_id=self.group_id, prompt_ids=list(self.prompt_ids),
            completion_ids=list(self.completion_ids), loss_mask=[1] * len(self.completion_ids),
            behaviour_logprobs=list(self.logprobs), reward=total, policy_version=policy_version,
            p_hat=parts.get("p_hat"), text=self.text,
            meta={"topic": self.topic, "question": self.task.question, "answer": self.task.answer,
                  "reject_reason": self.task.reason, "finish_reason": self.finish_reason,
                  "reward_parts": parts, **self.meta},
        )


class Proposer:
    """Builds proposer prompts, samples them on an engine, parses the replies. No Ray, no model of its own."""

    def __init__(self, engine: Any = None, cfg: ProposerConfig | None = None, tokenizer: Any = None):
        self.engine = engine
        self.cfg = cfg or ProposerConfig()
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("Proposer needs an engine with a tokenizer, or a tokenizer")
        self.templates = PromptTemplates(self.cfg.prompt_dir)

    def build_prompt(self, topic: str | None = None, examples: Sequence[str] = ()) -> str:
        """The chat prompt, ending with `response_prefix` (default "<question>"): the reply starts inside
        the question tag, which small models otherwise rarely write."""
        examples = list(examples)[: self.cfg.conditioning_examples]
        system = self.templates.render("proposer_system.txt").strip()
        user = self.templates.render("proposer_user.txt", topic=topic, examples=examples).strip()
        return chat_prompt(self.tokenizer, system, user) + self.cfg.response_prefix

    def reply_text(self, completion: str, finish_reason: str) -> str:
        """The full reply as the parser sees it: the forced prefix plus the completion. A reply that opened
        the question through the prefix and ended on its own (EOS) without closing it is closed where the
        answer starts, or at its end; a reply cut by max_tokens stays unclosed (rejected as truncated)."""
        text = self.cfg.response_prefix + completion
        prefix_opens = "<question>" in self.cfg.response_prefix.lower()
        if prefix_opens and finish_reason == "stop" and "</question>" not in text.lower():
            cut = text.lower().find("<answer>")
            text = text + "</question>" if cut < 0 else text[:cut] + "</question>" + text[cut:]
        return text

    def sampling_params(self, n: int | None = None) -> SamplingParams:
        return SamplingParams(n=n or self.cfg.group_size, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              max_tokens=self.cfg.max_tokens, logprobs=True)

    def propose(self, count: int | None = None, pool: Sequence[str] = (), adapter: str | None = None,
                rng: random.Random | None = None) -> list[Proposal]:
        """`count` prompts (default candidates_per_iteration) x group_size samples each. Prompt i uses topic
        i mod len(topics) and `conditioning_examples` tasks drawn from `pool` (earlier accepted questions)."""
        if self.engine is None:
            raise RuntimeError("Proposer.propose needs an engine (Proposer(engine, cfg))")
        count = self.cfg.candidates_per_iteration if count is None else count
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count == 0:
            return []
        rng = rng or random.Random()
        specs = []
        for i in range(count):
            topic = self.cfg.topics[i % len(self.cfg.topics)] if self.cfg.topics else None
            examples = rng.sample(list(pool), min(self.cfg.conditioning_examples, len(pool)))
            specs.append((topic, examples, encode(self.tokenizer, self.build_prompt(topic, examples))))
        outputs = self.engine.generate([ids for _, _, ids in specs], self.sampling_params(), adapter=adapter)
        proposals = []
        for (topic, examples, prompt_ids), out in zip(specs, outputs):
            group_id = uuid.uuid4().hex
            for c in out.outputs:
                logprobs = list(c.logprobs) if c.logprobs is not None else [0.0] * len(c.token_ids)
                text = self.reply_text(self.tokenizer.decode(c.token_ids, skip_special_tokens=True), c.finish_reason)
                proposals.append(Proposal(
                    task_id=uuid.uuid4().hex, group_id=group_id, topic=topic, examples=examples,
                    prompt_ids=prompt_ids, completion_ids=list(c.token_ids), logprobs=logprobs, text=text,
                    finish_reason=c.finish_reason, task=parse_task(text, c.finish_reason),
                    meta={"logprobs_missing": c.logprobs is None},
                ))
        return proposals
