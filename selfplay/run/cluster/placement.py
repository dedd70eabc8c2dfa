"""Where each actor runs, decided from the config alone (pure functions): what `Actors.start` reserves and
what `selfplay plan` prints before a job pays for anything.

Colocated (`ray.colocate: true`, debug / one GPU): no reservation, fractional GPUs from `ray.gpus`.
Split (`ray.colocate: false`, cluster): one placement-group bundle per learner rank and per rollout replica,
{CPU: 1, GPU: ray.gpus[role]}; a vLLM replica with `engine.tensor_parallel_size: T` takes T GPUs in its
bundle (a bundle never spans nodes, so its T GPUs are on one node). Strategy PACK fills a node before the
next. Sandbox and verifier actors reserve nothing and float.
"""
from __future__ import annotations

from dataclasses import dataclass

from selfplay.config import RunConfig


@dataclass(frozen=True)
class Slot:
    actor: str  # learner, learner-1, rollout, rollout-1, ...
    role: str  # learner | rollout | sandbox | verifier
    index: int  # rank or replica number
    cpus: float
    gpus: float
    bundle: int | None  # placement-group bundle, None when not reserved


def actor_name(role: str, index: int, count: int) -> str:
    """`learner` / `rollout` with one of them (names as before scale-out), `learner-1`, `rollout-0` ... else."""
    return role if count == 1 else f"{role}-{index}"


def role_gpus(cfg: RunConfig, cuda: bool = False) -> dict[str, float]:
    """GPUs per learner rank and per rollout replica."""
    gpus = dict(cfg.ray.gpus)
    if not gpus and cfg.ray.colocate and cuda:
        gpus = {"learner": 0.5, "rollout": 0.5}  # one GPU shared by training and generation
    if cfg.engine.tensor_parallel_size > 1:
        gpus["rollout"] = float(cfg.engine.tensor_parallel_size)
    return gpus


def plan(cfg: RunConfig, cuda: bool = False) -> list[Slot]:
    gpus = role_gpus(cfg, cuda)
    split = not cfg.ray.colocate
    slots, bundle = [], 0
    for role, count in (("learner", cfg.learner.world_size), ("rollout", cfg.engine.replicas)):
        for i in range(count):
            slots.append(Slot(actor_name(role, i, count), role, i, 1.0 if split else 0.0, gpus.get(role, 0.0),
                              bundle if split else None))
            bundle += 1
    slots += [Slot("sandbox", "sandbox", 0, 0.0, 0.0, None), Slot("verifier", "verifier", 0, 0.0, 0.0, None)]
    return slots


def bundles(slots: list[Slot]) -> list[dict[str, float]]:
    return [{"CPU": s.cpus, "GPU": s.gpus} for s in slots if s.bundle is not None]


def fit(slots: list[Slot], nodes: list[dict[str, float]]) -> tuple[list[int | None], list[str]]:
    """First-fit of the reserved slots onto nodes' free resources (PACK: fill a node before the next).
    Returns the node index per slot (None: unreserved, floats; -1: does not fit) and the problems, each
    naming what is short."""
    free = [dict(n) for n in nodes]
    where: list[int | None] = []
    problems = []
    for s in slots:
        if s.bundle is None and s.gpus == 0:
            where.append(None)
            continue
        need = {"CPU": s.cpus, "GPU": s.gpus}
        node = next((k for k, f in enumerate(free) if all(f.get(r, 0.0) + 1e-9 >= v for r, v in need.items())), None)
        if node is None:
            most = max((f.get("GPU", 0.0) for f in free), default=0.0)
            short = "GPU" if s.gpus > most else "CPU"
            have = most if short == "GPU" else max((f.get("CPU", 0.0) for f in free), default=0.0)
            problems.append(f"{s.actor} needs {need[short]:g} {short} on one node; the most any node has left is "
                            f"{have:g} {short} (total {short} asked: {total(slots, short):g}, cluster: "
                            f"{sum(n.get(short, 0.0) for n in nodes):g})")
            node = -1  # does not fit
        else:
            for r, v in need.items():
                free[node][r] = free[node].get(r, 0.0) - v
        where.append(node)
    return where, problems


def total(slots: list[Slot], resource: str) -> float:
    return sum(s.gpus if resource == "GPU" else s.cpus for s in slots)


def render(slots: list[Slot], where: list[int | None], node_names: list[str]) -> str:
    lines = [f"{'actor':<12} {'CPU':>4} {'GPU':>4}  {'bundle':>6}  node"]
    for s, w in zip(slots, where):
        node = "any (not reserved)" if w is None else "DOES NOT FIT" if w < 0 else node_names[w]
        bundle = "-" if s.bundle is None else str(s.bundle)
        lines.append(f"{s.actor:<12} {s.cpus:>4g} {s.gpus:>4g}  {bundle:>6}  {node}")
    lines.append(f"total reserved: {total(slots, 'CPU'):g} CPU, {total(slots, 'GPU'):g} GPU")
    return "\n".join(lines)


def parse_node(spec: str) -> dict[str, float]:
    """`GPUS:CPUS` (e.g. `8:64`), a node described on the command line."""
    try:
        gpus, cpus = (float(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--node {spec!r} must look like GPUS:CPUS, e.g. 8:64") from None
    return {"GPU": gpus, "CPU": cpus}


def cluster_nodes(address: str | None) -> tuple[list[dict[str, float]], list[str]]:
    """Alive nodes' resources and names: of the Ray cluster at `address`, or of this machine."""
    if address is None:
        import os

        import torch

        return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}], ["this machine"]
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        return ([{"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)} for n in alive],
                [n.get("NodeManagerAddress", "?") for n in alive])
    finally:
        ray.shutdown()


def plan_report(cfg: RunConfig, nodes: list[dict[str, float]], names: list[str]) -> tuple[str, list[str]]:
    """The placement table for these nodes, and what does not fit (empty when the cluster holds the run)."""
    slots = plan(cfg, cuda=any(n.get("GPU", 0) > 0 for n in nodes))
    where, problems = fit(slots, nodes)
    return render(slots, where, names), problems
