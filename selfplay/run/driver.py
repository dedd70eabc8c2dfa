"""The driver: owns a run directory, starts Ray and the actors, runs iterations, commits each one.

Commit protocol (why a SIGKILL loses at most the iteration in flight, and a resume duplicates nothing):
an iteration's checkpoint is written by the learner, then `state.json` records {iteration, checkpoint} with
an atomic rename: that rename is the commit. Pool, replay buffer and metrics are appended during the
iteration; on resume everything they hold from iterations after the committed one is dropped, the learner
reloads the committed checkpoint, and its adapters are republished to the rollout engine (the rollback is
selfplay/run/recovery.py's `rollback`; a dead learner rank takes the same way back without leaving the run).
SIGINT/SIGTERM (also `selfplay stop` / `ray job stop`) set a flag; the loop stops at the next safe point
between steps, leaving the last committed iteration as the resume point.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from typing import Callable

import ray
from rich.progress import Progress

from sandbox.selftest import SandboxSelfTestFailed
from selfplay.run.cluster.actors import Actors, restart_counts
from selfplay.run.console import ConsoleLogHandler, RunConsole, WarningRelay, progress_display
from selfplay.run.loop import Context, SandboxUnhealthy, StopRequested, run_iteration, stage
from selfplay.run.pipeline import run_async_iteration
from selfplay.run.recovery import LearnerRestartsExhausted, dead_ranks, describe, rollback, wait_gone
from selfplay.run.rundir import RunDir

log = logging.getLogger("selfplay")


class ReferenceTasksError(RuntimeError):
    """The `reference` tasks (reference mode, probes) cannot be loaded; the message says why."""


def _setup_logging(console: RunConsole) -> logging.Handler:
    """The `selfplay` logger goes to the run's console (INFO: driver.log only), not to the root logger,
    whose handlers (the libraries') write to stderr, which is logs/libraries.log during a CLI run."""
    logger = logging.getLogger("selfplay")
    for h in list(logger.handlers):
        if isinstance(h, ConsoleLogHandler):
            logger.removeHandler(h)
    handler = ConsoleLogHandler(console)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    logger = logging.getLogger("selfplay")
    logger.removeHandler(handler)
    logger.propagate = True


def _stop(progress: Progress) -> None:
    if progress.live.is_started:  # a progress display never started prints blank lines when stopped
        progress.stop()


class Driver:
    def __init__(self, rd: RunDir, resume: bool = False, warnings: list[str] | tuple = (),
                 capture_libraries: bool = False):
        """`warnings`: our own, printed after the run directory. `capture_libraries`: send everything else
        written to stdout/stderr (Ray, vLLM, C++ libraries) to logs/libraries.log (the CLI does)."""
        self.rd = rd
        self.resume = resume
        self.warnings = list(warnings)
        self.capture_libraries = capture_libraries
        self.cfg = rd.load_config()
        self._stop = False
        self._signals = 0

    # ------------------------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        self._stop = True
        self.rd.event("signal", signal=signal.Signals(signum).name)
        if self._signals >= 3:  # the user insists: leave now; the last committed iteration stays valid
            raise KeyboardInterrupt
        log.warning("%s received: stopping at the next safe point", signal.Signals(signum).name)

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    # ------------------------------------------------------------------------------------ run
    def run(self) -> int:
        console = RunConsole(self.rd.logs, capture_libraries=self.capture_libraries)
        handler = _setup_logging(console)
        try:
            return self._run(console)
        finally:
            _teardown_logging(handler)
            console.close()

    def _run(self, console: RunConsole) -> int:
        from selfplay.telemetry.exporters import make_exporters
        from selfplay.telemetry.metrics import MetricsStore
        from selfplay.data.replay import ReplayBuffer
        from selfplay.data.task_pool import TaskPool

        cfg, rd = self.cfg, self.rd
        state = rd.state()
        done = int(state.get("iteration", 0)) if self.resume else 0
        console.print(f"run directory: {rd.root}")
        if self.resume and state.get("status") == "finished" and done >= cfg.loop.iterations:
            console.print(f"run already finished ({done} iterations); extend it with: "
                          f"selfplay resume {rd.root} loop.iterations={cfg.loop.iterations * 2}")
            return 0
        for w in self.warnings:
            console.warn(w)
        relay = WarningRelay(rd.events, console)  # the actors' warnings, from events.jsonl
        rd.event("driver_start", pid=os.getpid(), resume=self.resume, from_iteration=done)
        rd.write_state(status="running", pid=os.getpid())

        pool = TaskPool(rd.pool, cfg.loop.pool_capacity)
        replay = ReplayBuffer(rd.replay, cfg.replay)
        exporters = make_exporters(cfg.metrics, rd.root, resume_from=done if self.resume else None,
                                   run_name=cfg.name, run_config=cfg.model_dump(mode="json"), console=console)
        store = self._store = MetricsStore(rd.metrics, exporters=exporters)
        if self.resume:
            dropped = rollback(rd, pool, replay, store)
            rd.event("resume", **dropped)
            console.print(f"resuming after iteration {done} (dropped {dropped['pool_dropped']} pool tasks of "
                          "later iterations)")
            log.info("resume: replay %s, metrics %s", dropped["replay"], dropped["metrics"])

        progress = progress_display(console.rich)
        started_ray = False
        actors = None
        status, code, crashed = "failed", 1, False
        iterate = run_iteration
        try:
            where = f"the cluster at {cfg.ray.address}" if cfg.ray.address else "a local Ray"
            console.print(f"starting {where} and the actors (model {cfg.model.name_or_path}, engine "
                          f"{cfg.engine.backend}); their output: {rd.logs}/<actor>.log"
                          + (", libraries.log" if self.capture_libraries else ""))
            # the live line from here on (a terminal only): vLLM's start alone takes a minute on a CPU
            bar = progress.add_task("iterations", total=cfg.loop.iterations, completed=done,
                                    stage="starting the actors", since=time.monotonic())
            if console.interactive:
                progress.start()
            known = self._known_tasks()
            if cfg.loop.mode == "reference":
                from selfplay.run.reference import run_reference_iteration as iterate
            elif cfg.loop.pipeline == "async":
                iterate = run_async_iteration
            if not ray.is_initialized():
                quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
                if cfg.ray.address:
                    ray.init(address=cfg.ray.address, **quiet)
                else:
                    # "local": a fresh private instance, never a cluster some `ray start` left on this machine
                    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **quiet)
                    started_ray = True
            self._install_signals()  # after ray.init, which installs its own SIGTERM handler
            t_start = time.perf_counter()
            actors = Actors.start(cfg, rd)
            versions = ray.get(actors.learner.versions.remote())
            relay.poll()
            console.print(f"actors ready in {time.perf_counter() - t_start:.0f} s; "
                          f"iterations {done + 1}..{cfg.loop.iterations}")
            ctx = Context(cfg, rd, actors, pool, replay, versions, stop_requested=lambda: self._stop,
                          known=known)
            if self.resume:
                self._republish(ctx)
            current = {"it": done + 1}
            group_restarts = 0

            def on_stage(stage: str) -> None:
                relay.poll()
                progress.update(bar, stage=f"iteration {current['it']} · {stage}", since=time.monotonic())
                console.note(f"iteration {current['it']}: {stage}")

            ctx.on_stage = on_stage
            t_loop = time.monotonic()
            it = done
            while it < cfg.loop.iterations:
                it += 1
                current["it"] = it
                if self._stop:
                    raise StopRequested()
                try:  # through the commit: a rank that dies while saving its checkpoint restarts the group too
                    last = self._iteration(ctx, iterate, it, t_loop, group_restarts)
                except Exception as e:  # a dead learner rank: restart the group from the last commit
                    dead = dead_ranks(actors.learner, rd, e)
                    if not dead:
                        raise
                    group_restarts += 1
                    actors = None  # stopped by restart_group (the `finally` below must not stop them twice)
                    actors, ctx = self._restart_group(ctx, dead, it, group_restarts)
                    ctx.on_stage = on_stage
                    it = int(rd.state().get("iteration", 0))
                    continue
                progress.update(bar, completed=it, stage="")
                if last and it < cfg.loop.iterations:
                    budget = cfg.loop.time_budget_s
                    rd.event("time_budget_reached", iteration=it, budget_s=budget)
                    console.print(f"loop.time_budget_s={budget:g} reached after iteration {it}")
                    break
            status, code = "finished", 0
        except (StopRequested, KeyboardInterrupt):
            status, code = "stopped", 130
            _stop(progress)
            console.warn(f"stopped at a safe point after iteration {rd.state().get('iteration', 0)}; "
                         f"resume with: selfplay resume {rd.root}")
        except (SandboxUnhealthy, SandboxSelfTestFailed, ReferenceTasksError, LearnerRestartsExhausted) as e:  # the run's verdict, not a bug: one line
            status, code = "failed", 1
            _stop(progress)
            console.error(str(e))
        except Exception:
            _stop(progress)
            console.note("run failed:\n" + traceback.format_exc())
            crashed = True  # the CLI prints the one-line error; no "where to look next" after a crash
            raise
        finally:
            _stop(progress)
            rd.write_state(status=status)
            rd.event("driver_end", status=status)
            store.close()
            replay.close()
            if actors is not None:
                actors.stop()
            if started_ray:
                ray.shutdown()
            relay.poll()
            if not crashed:
                self._epilogue(console, status)
        return code

    def _iteration(self, ctx: Context, iterate: Callable, it: int, t_loop: float, group_restarts: int) -> bool:
        """Iteration `it`'s stages, evaluation, metrics and commit (the commit protocol above); whether it is the
        run's last (loop.iterations, or loop.time_budget_s spent since `t_loop`)."""
        cfg, rd, store = self.cfg, self.rd, self._store
        result = iterate(ctx, it)
        if cfg.eval.benchmark and cfg.eval.every and it % cfg.eval.every == 0:
            with stage(ctx, it, "evaluate", safe_point=False):
                result.scalars.update(self._evaluate(ctx, it))
            # evaluation is a stage of the iteration's wall time too
            result.scalars["time/stage/eval"] = result.scalars.get("time/eval", 0.0)
            result.scalars["time/total"] += result.scalars["time/stage/eval"]
        budget = cfg.loop.time_budget_s
        last = it == cfg.loop.iterations or (budget is not None and time.monotonic() - t_loop >= budget)
        result.scalars["faults/actor_restarts"] = float(sum(restart_counts(rd).values()))
        result.scalars["faults/learner_restarts"] = float(group_restarts)
        # metrics, then the checkpoint, then state.json's atomic rename (the commit): a kill anywhere in here
        # leaves iteration `it` uncommitted, and a resume (or a learner-group restart) drops what it had written
        with stage(ctx, it, "log_metrics", safe_point=False):
            store.log_tasks(it, result.tasks)
            store.log_trajectories(it, result.trajectories)
            store.log_scalars(it, result.scalars)
        with stage(ctx, it, "commit", safe_point=False):
            if it % cfg.loop.checkpoint_every == 0 or last:
                ckpt = ray.get(ctx.actors.learner.save_checkpoint.remote(str(rd.checkpoints)))
                rd.write_state(iteration=it, checkpoint=ckpt, versions=dict(ctx.versions))  # the commit
        return last

    def _epilogue(self, console: RunConsole, status: str) -> None:
        """Where the results are and what to run next."""
        from selfplay.run.summary import next_steps

        rd = self.rd
        done = int(rd.state().get("iteration", 0))
        console.print(f"{status}: {done}/{self.cfg.loop.iterations} iterations committed in {rd.root} "
                      f"(metrics.sqlite, pool.jsonl, checkpoints/, logs/)")
        for line in next_steps(rd.root, status, done, self.cfg.loop.iterations):
            console.print(line)

    def _known_tasks(self):
        """Known-answer tasks for reference mode and the verifier's probes, loaded (and checked) before Ray."""
        cfg = self.cfg
        if cfg.loop.mode != "reference" and not cfg.verifier.probes:
            return None
        from selfplay.evaluation.benchmarks import BenchmarkError
        from selfplay.evaluation.reference import known_tasks

        try:
            known = known_tasks(cfg)
        except BenchmarkError as e:
            raise ReferenceTasksError(str(e)) from None
        self.rd.event("known_tasks", source=known.source, train=len(known.train), probes=len(known.probes),
                      excluded_eval_items=known.excluded, duplicates=known.duplicates)
        log.info("known-answer tasks from %s: %d training, %d probes (%d evaluation items removed)",
                 known.source, len(known.train), len(known.probes), known.excluded)
        return known

    def _restart_group(self, ctx: Context, dead: list[dict], it: int, n: int) -> tuple[Actors, Context]:
        """Stop every actor, roll back to the last commit as a resume does, start them all again (every rank
        loads the committed checkpoint) and republish the committed adapters (selfplay/run/recovery.py)."""
        rd, cfg = self.rd, self.cfg
        committed = int(rd.state().get("iteration", 0))
        old = ctx.actors.handles()
        ctx.actors.stop()
        limit = cfg.ray.max_learner_restarts
        if n > limit:
            rd.event("learner_restarts_exhausted", iteration=it, limit=limit, ranks=[d["rank"] for d in dead],
                     why=[d.get("why") for d in dead])
            raise LearnerRestartsExhausted(
                f"learner rank {', '.join(str(d['rank']) for d in dead)} died in iteration {it} "
                f"({'; '.join(str(d.get('why')) for d in dead)}) after {limit} learner group restart(s) "
                f"(ray.max_learner_restarts={limit}); resume with: selfplay resume {rd.root}")
        left = wait_gone(old, rd)  # the old ranks' memory and ports free before the new ones start
        if left:
            log.warning("learner restart: processes %s of the stopped actors still run after 60 s", left)
        rd.event("learner_restart", iteration=it, committed=committed, restart=n,
                 ranks=[d["rank"] for d in dead], pids=[d["pid"] for d in dead], nodes=[d["node"] for d in dead],
                 why=[d.get("why") for d in dead])
        log.warning(describe(dead, it, committed))
        dropped = rollback(rd, ctx.pool, ctx.replay, self._store)
        log.info("learner restart rollback: %s", dropped)
        actors = Actors.start(cfg, rd)
        versions = ray.get(actors.learner.versions.remote())
        ctx = Context(cfg, rd, actors, ctx.pool, ctx.replay, versions, stop_requested=lambda: self._stop,
                      known=ctx.known)
        self._republish(ctx)
        return actors, ctx

    def _republish(self, ctx: Context) -> None:
        """After a resume the engine may hold adapters from the lost iteration: push the committed ones."""
        from selfplay.run.rundir import record_published

        for role, version in ctx.versions.items():
            if version <= 0:
                continue
            out_dir = self.rd.adapters / role / f"v{version:06d}-resume-{int(time.time())}"
            update = ray.get(ctx.actors.learner.export.remote(role, str(out_dir)))
            ray.get(ctx.actors.rollout.update_weights.remote(update))
            if hasattr(update, "path"):
                record_published(self.rd.adapters, role, update.path, update.version)

    def _evaluate(self, ctx: Context, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            scalars = ray.get(ctx.actors.rollout.evaluate.remote(iteration, str(self.rd.root / "eval")))
        except Exception as e:  # an evaluation bug must not kill a training run: logged, counted, visible
            log.exception("evaluation failed")
            ctx.rd.event("eval_failed", iteration=iteration, error=repr(e))
            return {"faults/eval_failures": 1.0}
        return {**scalars, "time/eval": time.perf_counter() - t0}
