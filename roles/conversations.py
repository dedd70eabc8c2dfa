"""Per-conversation multi-turn rollouts: each conversation goes engine -> sandbox -> engine on its own.

The round-based schedule (Executor._run_rounds) makes one engine call for every active conversation, then
runs all their tool calls, then the next round: every conversation waits at every turn for the slowest
generation and the slowest tool call, and the engine idles while the sandbox works. Here the engine's
request-level API (`StreamingEngine.submit/step`, the loop vLLM's AsyncLLM runs) keeps a continuous batch:
a conversation whose turn ended in a tool call hands it to a thread (the sandbox pool runs calls of
different conversations at once) while the engine keeps decoding the others, and its next request joins
the running batch as soon as the observation is spliced in. This is the agent-loop design of verl's
AgentLoop and SkyRL's async generator; the requests (and with a seed, their seeds) are exactly the ones the
round-based schedule sends (Executor.plan_requests / request_params), so both sample the same tokens
wherever the engine's numerics do not depend on batch composition.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from roles.executor import Executor, Rollout


def run_conversations(executor: Executor, groups: list[list[Rollout]], adapter: str | None,
                      seed: int | None) -> None:
    """Drive every trajectory of `groups` to its end (sets `finish`); the caller finalises them."""
    engine = executor.engine
    if engine.in_flight:
        raise RuntimeError(f"the engine has {engine.in_flight} requests of another caller in flight")
    flat = [r for g in groups for r in g]
    waiting: dict[str, list[Rollout]] = {}  # engine request id -> the trajectories it samples for
    tools: dict[Future, tuple[Rollout, str, str]] = {}
    back: dict[int, list[Rollout]] = {}  # group index -> members whose prefill call has returned
    threads = ThreadPoolExecutor(max(1, min(executor.cfg.max_concurrent_tools, len(flat))),
                                 thread_name_prefix="executor-tool")

    def call_tool(r: Rollout, code: str, turn: str) -> None:
        tools[threads.submit(executor.run_tools, [code])] = (r, code, turn)

    swap = executor.between_requests

    def submit(requests: list[list[Rollout]]) -> None:
        for members in requests:
            params = executor.request_params(members, seed)
            r = members[0]
            name = adapter
            if swap is not None:  # weights may change between requests: this one samples with what is loaded now
                swap()
                role = executor.role_adapter
                name = role if adapter in (None, role) and role in engine.adapter_versions else adapter
                version = engine.adapter_versions.get(name, 0) if name is not None else 0
                for m in members:
                    m.sampled_version = version if m.sampled_version is None else min(m.sampled_version, version)
            waiting[engine.submit(r.prompt_ids + r.completion_ids, params, adapter=name)] = members

    def next_request(r: Rollout) -> None:
        executor.check_length(r)
        if r.finish is None:
            submit([[r]])

    try:
        calls = executor.prefill_calls(flat)
        calling = {id(r) for r, _, _ in calls}
        for call in calls:
            call_tool(*call)
        for r in flat:
            executor.check_length(r)
        submit(executor.plan_requests(groups, {id(r) for r in flat if r.finish is None and id(r) not in calling}))
        while waiting or tools:
            finished: list[tuple[str, Any]] = []
            if waiting:
                if swap is not None:
                    swap()
                finished = engine.step()
            else:  # only tool calls in flight: nothing to decode until one returns
                wait(list(tools), return_when=FIRST_COMPLETED)
            for rid, out in finished:
                for r, sample in zip(waiting.pop(rid), out.outputs):
                    calls = []
                    executor._absorb(r, sample, calls)
                    if calls:
                        call_tool(*calls[0])
                    else:
                        next_request(r)
            for fut in [f for f in tools if f.done()]:
                r, code, turn = tools.pop(fut)
                results, error = fut.result()
                executor.splice(r, code, turn, results[0], error)
                if id(r) in calling:  # back from a call its prefill made: the group's first request waits for
                    calling.discard(id(r))  # every member, so it is shared (plan_requests) as on the rounds
                    back.setdefault(r.group, []).append(r)  # schedule, with the same seed
                    if not any(id(m) in calling for m in groups[r.group]):
                        members = back.pop(r.group)
                        for m in members:
                            executor.check_length(m)
                        submit(executor.plan_requests([groups[r.group]],
                                                      {id(m) for m in members if m.finish is None}))
                else:
                    next_request(r)
    finally:
        threads.shutdown(wait=True, cancel_futures=True)
        while engine.in_flight:  # an error left requests behind: finish them so the engine stays usable
            engine.step()
