"""Data-parallel learner ranks: a thin layer around the one-process `Learner` (docs/learner.md, "Ranks").

`learner.world_size: N` runs N learners (Ray actors, selfplay/run/cluster/ranks.py) in one torch.distributed group
(NCCL on GPU, gloo on CPU). Strategy `ddp` (the one built): every rank holds the whole base and the
adapters; the driver gives each rank a share of the batch's GRPO groups, balanced by tokens
(`shard_groups`, longest-processing-time first); each rank computes its groups' advantages itself (whole
groups, so they are exactly the single-process ones). Two collectives per optimizer step make N ranks take
the step one process takes on the whole batch:
1. `totals`: the loss normalisers (trained tokens, sequences: summed; the longest completion: max) are
   all-reduced, so every rank divides by the whole batch's totals, not its own (verl's global token-mean);
2. `all_reduce_grads`: the trainable gradients are summed over ranks before clipping, so the clip, AdamW
   and the scheduler see the full-batch gradient on every rank; parameters stay identical, bit for bit the
   same update on each rank.
A rank with no share (fewer groups than ranks) takes `idle_steps`: the same collectives with zero gradients.
Everything is identical across ranks after a step, so checkpoints and adapters come from rank 0, and a
resume loads that one checkpoint on every rank. Strategy `fsdp2` (learner/fsdp.py) uses the same shares and `totals`; FSDP2 reduce-scatters the gradients
(summed) instead of `all_reduce_grads`, and idle ranks run dummy forwards so the collectives match.
With `entropy_control` on, a third pair of collectives (`reduce_sum`, `gather`) lets Clip-Cov/KL-Cov choose
their tokens over the whole step (learner/entropy.py), so those too make the single-process update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from selfplay.types import Trajectory


def trained_tokens(t: Trajectory) -> int:
    return sum(1 for m in t.loss_mask if m)


def shard_groups(trajs: Sequence[Trajectory], world_size: int) -> list[list[int]]:
    """Indices of `trajs` per rank: whole groups (`group_id`), balanced by forward tokens (prompt +
    completion), largest group first onto the lightest rank. Each rank's indices stay in batch order."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.group_id, []).append(i)
    cost = {g: sum(len(trajs[i].prompt_ids) + len(trajs[i].completion_ids) for i in ix) for g, ix in groups.items()}
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for g in sorted(groups, key=lambda g: (-cost[g], groups[g][0])):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += cost[g]
        shards[r].extend(groups[g])
    return [sorted(s) for s in shards]


def merge_metrics(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """One metrics dict for the step from every rank's: counts summed, `*_max` maxed, the loss summed (each
    rank's loss is its share of the globally normalised loss), time the slowest rank's, grad_norm/lr/version
    from rank 0 (identical on every rank), other means weighted by each rank's trained tokens."""
    ranks = [m for m in per_rank if m]
    if not ranks:
        return {}
    summed = {"loss", "tokens", "seqs", "micro_batches", "seq_tokens", "forward_tokens"}
    same = {"grad_norm", "lr", "policy_version", "epoch", "mini_batch", "skipped", "steps", "steps_requested"}
    w = [m.get("tokens", 0.0) for m in ranks]
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for m in ranks for k in m):
        vals = [(m[k], wi) for m, wi in zip(ranks, w) if k in m]
        if k in summed:
            out[k] = sum(v for v, _ in vals)
        elif k in same:
            out[k] = vals[0][0]
        elif k.endswith("_max") or k == "time_s":
            out[k] = max(v for v, _ in vals)
        elif k.endswith("_min"):
            out[k] = min(v for v, _ in vals)
        else:
            total = sum(wi for _, wi in vals)
            out[k] = sum(v * wi for v, wi in vals) / total if total > 0 else sum(v for v, _ in vals) / len(vals)
    if "time_s" in out and out["time_s"] > 0 and "tokens" in out:
        out["tokens_per_s"] = out["tokens"] / out["time_s"]
    out["ranks"] = float(len(per_rank))
    return out


@dataclass
class GradSync:
    """The collectives a rank's `Learner` calls at its two hook points (`Learner.dist`)."""

    world_size: int
    rank: int

    def totals(self, totals: dict[str, float]) -> dict[str, float]:
        sums = torch.tensor([totals["total_tokens"], totals["total_seqs"]], dtype=torch.float64)
        longest = torch.tensor([float(totals["max_len"])], dtype=torch.float64)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        return {**totals, "total_tokens": float(sums[0]), "total_seqs": float(sums[1]),
                "max_len": int(longest[0])}

    sharded: bool = False  # fsdp2: gradients are reduce-scattered by FSDP itself (learner/fsdp.py)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (entropy control's whole-step means, learner/entropy.py)."""
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj):
        """Every rank's `obj`, in rank order (entropy control's candidates)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum of every rank's gradient, in one flat buffer (one collective, not one per tensor)."""
        if self.sharded:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n

    def idle_steps(self, learner, role: str, steps: int) -> None:
        """Take part in `steps` optimizer steps with nothing to train on: zero totals, zero gradients."""
        key = learner._key(role)
        opt, sched = learner._optim[key]
        params = learner._params[key]
        for _ in range(steps):
            totals = self.totals({"total_tokens": 0.0, "total_seqs": 0.0, "max_len": 0})
            if totals["total_tokens"] == 0:  # no rank has anything: the single process would skip too
                continue
            if learner.cfg.entropy_control != "none":  # the others' whole-step token choice
                learner.cov_picks(role, None)
            opt.zero_grad(set_to_none=True)
            learner._fill(learner._rounds(0), 0, backward=True)  # fsdp2: the others' forwards, on a dummy
            self.all_reduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, learner.cfg.max_grad_norm)
            opt.step()
            sched.step()
            learner.step += 1
            for r in (learner.roles if not learner.lora else (role,)):
                learner.policy_version[r] += 1


def init_group(rank: int, world_size: int, address: str, port: int, backend: str | None = None,
               sharded: bool = False) -> GradSync:
    """Join the ranks' process group (TCP rendezvous at rank 0's address). On CUDA the group has two backends:
    NCCL for the CUDA tensors (the gradients) and gloo for the small CPU ones (`totals`, `reduce_sum`, FSDP's
    forward counts), which NCCL alone refuses."""
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size)
    return GradSync(world_size, rank, sharded)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
