"""Replay buffer costs, each against a baseline measured in the same run.

1. append latency with fsync (durable against power loss) vs without (durable against a killed process);
2. reload time of an uncompacted log (one small file per append) vs the same state after compaction;
3. sample() on a full buffer vs add() of one group (is sampling ever the bottleneck?).

    python bench/bench_replay.py [--groups 300] [--group-size 8] [--tokens 512]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

from selfplay.config import ReplayConfig
from selfplay.data.replay import ReplayBuffer
from selfplay.types import Trajectory


def make_group(i: int, n: int, tokens: int, rng: random.Random) -> list[Trajectory]:
    return [Trajectory(role="executor", task_id=f"t{i}", group_id=f"g{i}", prompt_ids=list(range(64)),
                       completion_ids=[rng.randrange(50000) for _ in range(tokens)], loss_mask=[1] * tokens,
                       behaviour_logprobs=[-rng.random() for _ in range(tokens)], reward=rng.choice([-1.0, 1.0]),
                       meta={"group_size": n}) for _ in range(n)]


def timed_appends(cfg: ReplayConfig, groups: list[list[Trajectory]]) -> tuple[float, str]:
    d = tempfile.mkdtemp(prefix="bench-replay-")
    with ReplayBuffer(d, cfg) as buf:
        t0 = time.perf_counter()
        for g in groups:
            buf.add(g)
        return (time.perf_counter() - t0) / len(groups), d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=300)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    a = ap.parse_args()
    rng = random.Random(0)
    groups = [make_group(i, a.group_size, a.tokens, rng) for i in range(a.groups)]
    big = 10 ** 9  # never compact: the uncompacted-log baseline

    t_nosync, _ = timed_appends(ReplayConfig(capacity=big, fsync=False, compact_every=big), groups)
    t_sync, raw_dir = timed_appends(ReplayConfig(capacity=big, fsync=True, compact_every=big), groups)
    print(f"append one group of {a.group_size}x{a.tokens} tokens: fsync {t_sync * 1e3:.2f} ms, "
          f"no fsync {t_nosync * 1e3:.2f} ms  (ratio {t_sync / t_nosync:.2f}x)")

    cfg = ReplayConfig(capacity=big, fsync=False, compact_every=big)
    t0 = time.perf_counter()
    with ReplayBuffer(raw_dir, cfg) as buf:
        t_raw = time.perf_counter() - t0
        files = buf.stats()["files"]
        buf.compact()
    t0 = time.perf_counter()
    with ReplayBuffer(raw_dir, cfg) as buf:
        t_compact = time.perf_counter() - t0
        n = len(buf)
        t0 = time.perf_counter()
        reps = 20
        for _ in range(reps):
            buf.sample("executor", 16, current_version=0)
        t_sample = (time.perf_counter() - t0) / reps
    print(f"reload {n} trajectories: {files} log files {t_raw:.3f} s, compacted {t_compact:.3f} s "
          f"(ratio {t_raw / t_compact:.2f}x)")
    print(f"sample 16 groups from {n}: {t_sample * 1e3:.2f} ms = {t_sample / t_nosync:.2f}x one append")


if __name__ == "__main__":
    main()
