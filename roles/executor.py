"""The executor: multi-turn tool-integrated reasoning; the model writes Python, the sandbox runs it.

A turn ends when the model closes a ```python block (stop "\\n```\\n") or opens an ```output block itself
(stop "```output", as in Agent0). The code runs in the sandbox, its output is appended in an ```output block
(roles/prompts/executor_observation.txt) and generation continues, for at most `max_turns` tool calls.
Scheduling (`executor.schedule`): on an engine that takes requests one at a time (vLLM's request-level API,
`StreamingEngine`) every conversation goes engine -> sandbox -> engine on its own (roles/conversations.py),
so no conversation waits for the slowest one at a turn and tool calls overlap generation; otherwise (hf)
every round makes one engine call for all active trajectories. Both paths send the same requests: with a
`seed`, each request's seed depends only on (seed, question, sample, request number), so the two schedules
sample the same tokens wherever the engine's numerics do not depend on batch composition.

Token exactness: the model's tokens are kept as sampled, never re-tokenized; only the observation text is
tokenized, alone, and spliced in. Spans record who wrote each token: "model" (loss_mask 1, sampled logprob),
"tool" and "prefill" (loss_mask 0, logprob 0.0), so tool output is masked out of the loss (Agent0, verl-tool).
"""
from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from roles.answers import extract_answer
from roles.templates import PromptTemplates, chat_prompt, encode
from selfplay.config import ExecutorConfig, ModelConfig
from selfplay.types import SamplingParams, Trajectory

log = logging.getLogger(__name__)

SpanKind = Literal["model", "tool", "prefill"]
# "eos": the model ended; the others mean the trajectory was cut (Rollout.truncated).
Finish = Literal["eos", "max_tokens", "max_turns", "max_model_len", "malformed"]
MAX_RESUMES_PER_TURN = 8  # stops on fences that open no tool call (``` blocks of other languages)

_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_AFTER_CALL = re.compile(r"\s*(?:```)?(?:output[^\n]*)?\s*")  # what may follow the block that makes a call
_OUTPUT_OPENED = re.compile(r"```output[^\n]*\s*$")
_OPEN_PYTHON = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n", re.IGNORECASE)
PYTHON_TAGS = {"python", "python3", "py"}


def tool_call_code(turn: str) -> str | None:
    """Code to run if this turn (model text since the last tool output) ends in a tool call: a closed
    ```python block, optionally followed by an opened ```output fence. All python blocks of the turn are
    joined (Agent0 does the same). None when the turn does not end in a python block."""
    blocks = list(_BLOCK.finditer(turn))
    if not blocks or blocks[-1].group(1).lower() not in PYTHON_TAGS:
        return None
    if not _AFTER_CALL.fullmatch(turn[blocks[-1].end():]):
        return None
    return "\n".join(b.group(2) for b in blocks if b.group(1).lower() in PYTHON_TAGS)


def next_action(turn: str, stop: str | None, calls_made: int, max_turns: int) -> tuple[str, str | None]:
    """What to do when a turn stopped on `stop`: ("call", code), ("end", "max_turns") when the call budget is
    spent, or ("resume", malformed reason or None) to keep generating the turn (a fence that opens no call,
    e.g. ```text or a bare ```, is ordinary markdown; an empty block or ```output without code is counted)."""
    code = tool_call_code(turn)
    if code is not None and code.strip():
        return ("end", "max_turns") if calls_made >= max_turns else ("call", code)
    if code is not None:
        return "resume", "empty_code"
    if stop and "output" in stop:
        return "resume", "output_without_code"
    return "resume", None


def has_unclosed_python(turn: str) -> bool:
    """A ```python block opened after the last closed block: the model stopped mid-code."""
    closed_until = max((b.end() for b in _BLOCK.finditer(turn)), default=0)
    return bool(_OPEN_PYTHON.search(turn, closed_until))


def request_seed(seed: int, group: int, sample: int, request: int) -> int:
    """The seed of one engine request: a hash of who asks (question, sample; -1 for a whole group) and which
    request of that conversation it is, so it does not depend on the order requests reach the engine."""
    digest = hashlib.blake2b(f"{seed}:{group}:{sample}:{request}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


def clip_output(text: str, max_chars: int) -> tuple[str, bool]:
    """Keep the head and the tail (errors print last) within about max_chars characters."""
    if len(text) <= max_chars:
        return text, False
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n... [{len(text) - head - tail} characters omitted] ...\n{text[-tail:]}", True


@dataclass
class Span:
    start: int  # [start, end) in completion_ids
    end: int
    kind: SpanKind


@dataclass
class ToolCall:
    code: str
    status: str  # the sandbox's ExecStatus value: ok, error, timeout, memory_limit, ..., sandbox_error
    observation: str  # the text appended for the model
    duration_s: float = 0.0
    truncated: bool = False
    shown: bool = True  # False when the output did not fit in max_model_len


@dataclass
class Rollout:
    """One executor trajectory: tokens, who wrote them, tool calls, how it ended."""

    task_id: str
    question: str
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # e.g. output_without_code, empty_code, unclosed_code_block
    finish: Finish | None = None
    text: str = ""  # decoded completion (model + tool output)
    model_text: str = ""  # decoded model-written spans only: where the final answer is read
    answer: str | None = None
    logprobs_missing: bool = False
    turn_start: int = 0  # where the current turn's model text begins in completion_ids
    resumes: int = 0
    group: int = 0  # index of its question in the rollout call (request seeds are derived from it)
    requests: int = 0  # engine requests made for it so far
    # with weights swapped between requests (Executor.between_requests): the oldest adapter version any of its
    # requests sampled with, which its trajectory is stamped with (staleness never under-counted)
    sampled_version: int | None = None

    @property
    def loss_mask(self) -> list[int]:
        mask = [0] * len(self.completion_ids)
        for s in self.spans:
            if s.kind == "model":
                mask[s.start: s.end] = [1] * (s.end - s.start)
        return mask

    @property
    def n_tool_calls(self) -> int:
        return len(self.tool_calls)

    @property
    def statuses(self) -> list[str]:
        return [c.status for c in self.tool_calls]

    @property
    def truncated(self) -> bool:
        return self.finish != "eos"

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    def append(self, ids: Sequence[int], logprobs: Sequence[float] | None, kind: SpanKind) -> None:
        if not ids:
            return
        start = len(self.completion_ids)
        self.completion_ids += ids
        self.logprobs += list(logprobs) if kind == "model" and logprobs is not None else [0.0] * len(ids)
        if self.spans and self.spans[-1].kind == kind and self.spans[-1].end == start:
            self.spans[-1].end += len(ids)
        else:
            self.spans.append(Span(start, start + len(ids), kind))

    def to_trajectory(self, reward: float, p_hat: float | None = None, policy_version: int = 0,
                      group_id: str | None = None) -> Trajectory:
        return Trajectory(
            role="executor", task_id=self.task_id, group_id=group_id or self.task_id,
            prompt_ids=list(self.prompt_ids), completion_ids=list(self.completion_ids), loss_mask=self.loss_mask,
            behaviour_logprobs=list(self.logprobs), reward=float(reward),
            policy_version=policy_version if self.sampled_version is None else self.sampled_version,
            p_hat=p_hat, text=self.text,
            meta={"question": self.question, "answer": self.answer, "tool_calls": self.n_tool_calls,
                  "statuses": self.statuses, "finish": self.finish, "malformed": list(self.malformed),
                  "spans": [(s.start, s.end, s.kind) for s in self.spans], "logprobs_missing": self.logprobs_missing},
        )


class Executor:
    """Runs tool-integrated rollouts on an engine and a sandbox. No Ray, no model of its own.

    `sandbox`: a pool object with `run_many(codes, ...)` or a `run_many`-like callable returning results with
    `.stdout .stderr .status .truncated .duration_s` (package `sandbox`).
    """

    def __init__(self, engine: Any, sandbox: Any, cfg: ExecutorConfig | None = None,
                 max_model_len: int | None = None, tool_timeout_s: float | None = None):
        self.engine = engine
        self.cfg = cfg or ExecutorConfig()
        self.run_many: Callable[..., list] = getattr(sandbox, "run_many", sandbox)
        if not callable(self.run_many):
            raise TypeError("sandbox must have run_many(codes) or be a callable like sandbox.run_many")
        self.tokenizer = engine.tokenizer
        self.max_model_len = max_model_len or getattr(engine, "max_model_len", None) or ModelConfig().max_model_len
        self.tool_timeout_s = tool_timeout_s
        self.templates = PromptTemplates(self.cfg.prompt_dir)
        # Set by a rollout worker that takes new weights inside a call (loop.weight_sync=between_requests):
        # called by the thread driving the engine before each request and engine step of the per-conversation
        # schedule, it may load a newer adapter; `role_adapter` is then used once loaded (its versions recorded)
        self.between_requests: Callable[[], None] | None = None
        self.role_adapter: str | None = None

    def build_prompt(self, question: str) -> str:
        system = self.templates.render(
            "executor_system.txt", max_turns=self.cfg.max_turns, use_tools=self.cfg.use_tools).strip()
        user = self.templates.render("executor_user.txt", question=question).strip()
        return chat_prompt(self.tokenizer, system, user)

    def sampling_params(self, n: int = 1) -> SamplingParams:
        return SamplingParams(
            n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_tokens_per_turn,
            stop=list(self.cfg.stop) if self.cfg.use_tools else [], logprobs=True, include_stop_str_in_output=True,
        )

    def rollout(self, questions: Sequence[str], n: int | None = None, task_ids: Sequence[str] | None = None,
                prefill: str | Sequence[str | None] | None = None, adapter: str | None = None,
                seed: int | None = None) -> list[list[Rollout]]:
        """`n` (default samples_per_task) rollouts per question, grouped by question. `prefill`: text forced
        at the start of the answer (loss_mask 0); if it ends in a python block, that code runs first.
        `seed`: every engine request gets a seed derived from it (same tokens on either schedule); None: the
        engine's own seeds."""
        n = self.cfg.samples_per_task if n is None else n
        if n < 1:
            raise ValueError(f"n (samples per question) must be >= 1, got {n}")
        task_ids = list(task_ids) if task_ids is not None else [uuid.uuid4().hex for _ in questions]
        prefills = [prefill] * len(questions) if prefill is None or isinstance(prefill, str) else list(prefill)
        if not len(task_ids) == len(prefills) == len(questions):
            raise ValueError("questions, task_ids and prefill must have the same length")
        groups: list[list[Rollout]] = []
        for t, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"question {t} is empty or not a string: {question!r}")
            prompt_ids = encode(self.tokenizer, self.build_prompt(question))
            prefill_ids = encode(self.tokenizer, prefills[t]) if prefills[t] else []
            group = [Rollout(task_ids[t], question, j, prompt_ids, group=t) for j in range(n)]
            for r in group:
                r.append(prefill_ids, None, "prefill")
                if r.length >= self.max_model_len:
                    r.finish = "max_model_len"
            groups.append(group)
        flat = [r for g in groups for r in g]
        if self.per_conversation:
            from roles.conversations import run_conversations

            run_conversations(self, groups, adapter, seed)
        else:
            self._run_rounds(groups, adapter, seed)
        for r in flat:
            self._finalize(r)
        return groups

    @property
    def per_conversation(self) -> bool:
        """Whether conversations advance on their own (`executor.schedule`; auto: when the engine can)."""
        can = all(hasattr(self.engine, a) for a in ("submit", "step", "in_flight"))
        if self.cfg.schedule == "conversations" and not can:
            raise ValueError(f"executor.schedule=conversations needs an engine with a request-level API "
                             f"(engine.backend=vllm); {type(self.engine).__name__} has none")
        return can and self.cfg.schedule != "rounds"

    def prefill_calls(self, flat: list[Rollout]) -> list:
        calls: list = []
        for r in flat:
            if r.finish is None and r.completion_ids and self.cfg.use_tools:
                self._decide(r, stop="prefill", calls=calls)
        return calls

    def _run_rounds(self, groups: list[list[Rollout]], adapter: str | None, seed: int | None) -> None:
        """Every round: one engine call for all active trajectories, then one sandbox batch for their calls."""
        flat = [r for g in groups for r in g]
        self._run_tools(self.prefill_calls(flat))
        while True:
            for r in flat:
                self.check_length(r)
            if not any(r.finish is None for r in flat):
                break
            calls: list = []
            for members, outs in self._generate_round(groups, adapter, seed):
                for r, out in zip(members, outs):
                    self._absorb(r, out, calls)
            self._run_tools(calls)

    def check_length(self, r: Rollout) -> None:
        if r.finish is None and r.length >= self.max_model_len:
            r.finish = "max_model_len"

    @staticmethod
    def plan_requests(groups: list[list[Rollout]], ready: set[int]) -> list[list[Rollout]]:
        """Engine requests for the ready trajectories (ids in `ready`): a whole group on its first request with
        one shared sequence goes as one request with n = group size (prefilled once, vLLM's rule gives sample
        j seed + j); everything else as one request each. The same rule on both schedules."""
        out = []
        for g in groups:
            members = [r for r in g if id(r) in ready]
            if (len(members) > 1 and len(members) == len(g) and all(r.requests == 0 for r in g)
                    and len({tuple(r.completion_ids) for r in g}) == 1):
                out.append(members)
            else:
                out.extend([r] for r in members)
        return out

    def request_params(self, members: list[Rollout], seed: int | None) -> SamplingParams:
        params = self.sampling_params(len(members))
        if seed is not None:
            r = members[0]
            params.seed = request_seed(seed, r.group, -1 if len(members) > 1 else r.sample_index, r.requests)
        for m in members:
            m.requests += 1
        return params

    def _generate_round(self, groups: list[list[Rollout]], adapter: str | None, seed: int | None):
        """One round's engine calls (one per request size n): yields (members, outputs) per request."""
        active = {id(r) for g in groups for r in g if r.finish is None}
        requests = self.plan_requests(groups, active)
        for size in sorted({len(m) for m in requests}):
            batch = [m for m in requests if len(m) == size]
            params = [self.request_params(m, seed) for m in batch]
            seeds = {} if seed is None else {"seeds": [p.seed for p in params]}  # per-prompt seeds only if asked
            outs = self.engine.generate([m[0].prompt_ids + m[0].completion_ids for m in batch],
                                        self.sampling_params(size), adapter=adapter, **seeds)
            for m, o in zip(batch, outs):
                yield m, list(o.outputs)

    def _absorb(self, r: Rollout, out: Any, calls: list) -> None:
        ids, lps = list(out.token_ids), out.logprobs
        room = self.max_model_len - r.length
        cut = len(ids) > room  # an engine that ignored max_model_len
        ids = ids[:room]
        if lps is None:
            r.logprobs_missing = True
        r.append(ids, None if lps is None else list(lps)[: len(ids)], "model")
        if cut or out.finish_reason == "length":
            r.finish = "max_model_len" if r.length >= self.max_model_len else "max_tokens"
            if has_unclosed_python(self._turn_text(r)):
                r.malformed.append("unclosed_code_block")
        elif not out.stop_reason:  # EOS: the model is done
            r.finish = "eos"
            if has_unclosed_python(self._turn_text(r)):
                r.malformed.append("unclosed_code_block")
        else:
            self._decide(r, out.stop_reason, calls)

    def _decide(self, r: Rollout, stop: str, calls: list) -> None:
        """After a stop string (or a prefill): queue a tool call, resume the turn, or end the trajectory."""
        turn = self._turn_text(r)
        action, detail = next_action(turn, stop, len(r.tool_calls), self.cfg.max_turns)
        if action == "call":
            calls.append((r, detail, turn))
        elif action == "end":
            r.finish = detail
        elif stop != "prefill":  # a prefill without a complete block: the model simply continues it
            if detail:
                r.malformed.append(detail)
            r.resumes += 1
            if r.resumes > MAX_RESUMES_PER_TURN:
                r.malformed.append("too_many_resumes")
                r.finish = "malformed"

    def _run_tools(self, calls: list[tuple[Rollout, str, str]]) -> None:
        """Run every queued call in one sandbox batch and splice the observations in."""
        if not calls:
            return
        results, error = self.run_tools([code for _, code, _ in calls])
        for (r, code, turn), res in zip(calls, results):
            self.splice(r, code, turn, res, error)

    def run_tools(self, codes: list[str]) -> tuple[list[Any], str]:
        """Sandbox results for `codes`, and the error text when the sandbox call itself failed (then every
        result is None). Thread-safe when the sandbox is (SandboxPool is)."""
        try:
            kwargs = {"timeout_s": self.tool_timeout_s} if self.tool_timeout_s is not None else {}
            results = list(self.run_many(codes, **kwargs))
            if len(results) != len(codes):
                raise RuntimeError(f"sandbox returned {len(results)} results for {len(codes)} programs")
            return results, ""
        except Exception as e:  # a broken sandbox must not kill the rollout; each call records it
            log.exception("sandbox.run_many failed for %d programs", len(codes))
            return [None] * len(codes), f"{type(e).__name__}: {e}"

    def splice(self, r: Rollout, code: str, turn: str, res: Any, error: str) -> None:
        """Append one tool call's observation to its trajectory (or end it when the output does not fit)."""
        status = "sandbox_error" if res is None else str(getattr(res.status, "value", res.status))
        if res is None:
            output = error
        else:
            output = (res.stdout or "").rstrip("\n")
            if res.stderr:
                output = f"{output}\n{res.stderr.rstrip()}" if output else res.stderr.rstrip()
        output, clipped = clip_output(output, self.cfg.max_tool_output_chars)
        truncated = clipped or bool(getattr(res, "truncated", False))
        obs = self.templates.render("executor_observation.txt", output=output, status=status, truncated=truncated)
        if _OUTPUT_OPENED.search(turn) and obs.startswith("```output"):
            obs = obs[len("```output"):]  # the model already opened the block
        elif not turn.endswith("\n"):
            obs = "\n" + obs
        ids = encode(self.tokenizer, obs)
        call = ToolCall(code, status, obs, float(getattr(res, "duration_s", 0.0) or 0.0), truncated)
        r.tool_calls.append(call)
        if r.length + len(ids) >= self.max_model_len:
            call.shown = False
            r.finish = "max_model_len"
            return
        r.append(ids, None, "tool")
        r.turn_start, r.resumes = len(r.completion_ids), 0

    def _turn_text(self, r: Rollout) -> str:
        return self.tokenizer.decode(r.completion_ids[r.turn_start:], skip_special_tokens=True)

    def _finalize(self, r: Rollout) -> None:
        decode = self.tokenizer.decode
        r.text = decode(r.completion_ids, skip_special_tokens=True)
        r.model_text = "".join(
            decode(r.completion_ids[s.start: s.end], skip_special_tokens=True) for s in r.spans if s.kind == "model"
        )
        ans = extract_answer(r.model_text)
        r.answer = ans.text if ans is not None else None
