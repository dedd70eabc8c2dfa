"""`selfplay` command line: run, resume, submit to a Ray cluster, follow jobs, inspect runs, dashboard, eval.

Heavy imports (torch, ray, vllm) happen inside commands, so `selfplay --help` and config errors are instant.
Error policy (one place, `App.__call__`): a failure prints one to three lines, `error: what; the fix`, and
exits non-zero (2: the config or the command line, 1: anything else); `--verbose` anywhere on the command
line, or SELFPLAY_DEBUG=1, prints the traceback too.
"""
from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from selfplay.config import ConfigError, load_config


class App(typer.Typer):
    """Typer with the error policy: short errors unless verbose."""

    def __call__(self, *args, **kwargs):
        argv = sys.argv if not args else args[0]
        verbose = "--verbose" in argv or os.environ.get("SELFPLAY_DEBUG", "") not in ("", "0")
        while "--verbose" in argv:
            argv.remove("--verbose")
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit:
            raise
        except KeyboardInterrupt:  # Ctrl-C outside a run (a run handles its own: it stops at a safe point)
            if verbose:
                traceback.print_exc()
            console.print("interrupted", highlight=False)
            sys.exit(130)
        except Exception as e:
            if verbose:
                traceback.print_exception(e)
            code = 2 if isinstance(e, ConfigError) else 1
            console.print(short_error(e, verbose), highlight=False, markup=False, soft_wrap=True)
            sys.exit(code)


USAGE = ("LLM self-play: a curriculum proposer, a tool-using executor and a verifier, trained with RL.\n\n"
         "Start with `selfplay run configs/debug.yaml` (what `make run` does); it prints its run directory RUN "
         "(runs/NAME-DATE by default): follow it with `selfplay status RUN` and `selfplay dashboard RUN`. "
         "Overrides are dotted keys after the config: `selfplay run configs/debug.yaml loop.iterations=5`. "
         "Errors are one line; `--verbose` (or SELFPLAY_DEBUG=1) adds the traceback.")
# the module's docstring is for developers; `selfplay --help` shows USAGE
app = App(add_completion=False, no_args_is_help=True, help=USAGE, pretty_exceptions_enable=False)
console = Console(stderr=True)
RUN_LOG: list[Path] = []  # the driver log of the run this process started, named in error messages


def short_error(e: BaseException, verbose: bool = False) -> str:
    """`error: <what>` in at most three lines; Ray's wrapped errors are unwrapped to the actor's own."""
    if isinstance(e, ConfigError):
        return f"error: {e}"
    while isinstance(getattr(e, "cause", None), BaseException) and e.cause is not e:  # RayTaskError.cause
        e = e.cause
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # a remote traceback in the message ends with the line that names the exception: keep that one
    named = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?", ln)]
    what = named[-1] if named else f"{type(e).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    if len(what) > 300:
        what = what[:297] + "..."
    out = [f"error: {what}"]
    if not verbose:
        out.append("  the traceback: rerun with --verbose (or SELFPLAY_DEBUG=1)"
                   + (f"; the run's log: {RUN_LOG[-1]}" if RUN_LOG else ""))
    return "\n".join(out)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", help="print tracebacks (also SELFPLAY_DEBUG=1)")] = False) -> None:
    """selfplay: LLM self-play with a curriculum proposer, a tool-using executor and a verifier."""

AddressOpt = Annotated[str, typer.Option("--address", envvar="RAY_ADDRESS", help="Ray dashboard, e.g. http://HEAD:8265")]


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/debug.yaml")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted overrides: learner.lr=1e-5 run_dir=runs/x")] = None,
) -> None:
    """Start a self-play run (Ray starts locally unless ray.address is set)."""
    from selfplay.config import band_warnings
    from selfplay.run.preflight import check_run

    cfg = load_config(config, overrides or [])
    check_run(cfg)  # model, engine, cluster address: before Ray starts
    from selfplay.run.driver import Driver
    from selfplay.run.rundir import RunDir

    rd = RunDir.create(cfg)
    RUN_LOG.append(rd.logs / "driver.log")
    sys.exit(Driver(rd, warnings=band_warnings(cfg), capture_libraries=True).run())


# What `resume` may change: how long the run goes and what it records, never what it learns from or how.
RESUME_KEYS = frozenset({"loop.iterations", "loop.checkpoint_every", "eval.every", "eval.limit",
                         "metrics.exporters", "metrics.trajectories_per_iteration", "ray.address", "ray.num_cpus"})


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `selfplay run`")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help=f"changes that keep the run comparable: {', '.join(sorted(RESUME_KEYS))}")] = None,
) -> None:
    """Continue a stopped, killed or finished run from its last checkpoint (`loop.iterations=N` extends it)."""
    from selfplay.config import band_warnings
    from selfplay.run.preflight import check_run
    from selfplay.run.rundir import RunDir

    rd = RunDir(run_dir.resolve())
    cfg = rd.load_config()
    if overrides:
        cfg = _resume_overrides(rd, overrides)
    check_run(cfg)
    from selfplay.run.driver import Driver

    RUN_LOG.append(rd.logs / "driver.log")
    sys.exit(Driver(rd, resume=True, warnings=band_warnings(cfg), capture_libraries=True).run())


def _resume_overrides(rd, overrides: list[str]):
    import yaml

    from selfplay.config import apply_overrides, config_from_dict, dump_config, parse_override
    from selfplay.run.rundir import write_atomic

    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key not in RESUME_KEYS:
            raise ConfigError(f"resume cannot change {key}: a resumed run keeps its config except "
                              f"{', '.join(sorted(RESUME_KEYS))}; start a new run for other changes")
    data = apply_overrides(yaml.safe_load(rd.config.read_text()), overrides)
    cfg = config_from_dict(data, f"{rd.config} + {' '.join(overrides)}")
    done = int(rd.state().get("iteration", 0))
    if cfg.loop.iterations < done:
        raise ConfigError(f"loop.iterations={cfg.loop.iterations} is below the {done} iterations already done")
    write_atomic(rd.config, dump_config(cfg))
    rd.event("config_changed", overrides=list(overrides))
    return cfg


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="the raw state and latest scalars as JSON")] = False,
) -> None:
    """Where a run stands: a short summary (`--json`: state and latest scalars)."""
    from selfplay.telemetry.metrics import MetricsStore
    from selfplay.run.rundir import RunDir

    rd = RunDir(run_dir.resolve())
    if not rd.config.exists():
        _fail(f"{run_dir} is not a run directory (no config.yaml); runs are under runs/ by default")
    state = rd.state()
    out = {"run_dir": str(rd.root), **state}
    if rd.metrics.exists():
        store = MetricsStore(rd.metrics, readonly=True)
        last = store.last_iteration()
        out["last_logged_iteration"] = last
        if last is not None:
            out["scalars"] = store.scalars_at(last)
        store.close()
    if as_json:
        typer.echo(json.dumps(out, indent=1, default=str))
    else:
        from selfplay.run.summary import status_lines

        typer.echo("\n".join(status_lines(out, rd.load_config(), run_dir, events=rd.read_events())))


@app.command()
def plan(
    config: Annotated[Path, typer.Argument()],
    overrides: Annotated[Optional[list[str]], typer.Argument()] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster (auto, HEAD:6379); default: this machine")] = None,
    node: Annotated[Optional[list[str]], typer.Option("--node", help="plan for a described node GPUS:CPUS (repeatable)")] = None,
) -> None:
    """Which actor gets which CPUs/GPUs on which node; exits 1, naming the missing resource, if it cannot fit."""
    from selfplay.run.cluster.placement import cluster_nodes, parse_node, plan_report

    try:
        cfg = load_config(config, overrides or [])
        if node:
            nodes = [parse_node(n) for n in node]
            names = [f"node{i} ({n['GPU']:g} GPU, {n['CPU']:g} CPU)" for i, n in enumerate(nodes)]
        else:
            nodes, names = cluster_nodes(address)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    table, problems = plan_report(cfg, nodes, names)
    typer.echo(table)
    if problems:
        _fail("the cluster cannot hold this run:\n  " + "\n  ".join(problems), code=1)


@app.command()
def submit(
    config: Annotated[Path, typer.Argument()],
    address: AddressOpt,
    overrides: Annotated[Optional[list[str]], typer.Argument()] = None,
    working_dir: Annotated[Path, typer.Option(help="directory shipped to the cluster")] = Path("."),
    wait: Annotated[bool, typer.Option(help="block until the job ends and print its logs")] = False,
) -> None:
    """Submit a run to a Ray cluster as a job (Ray Job Submission SDK); prints the job id."""
    from selfplay.run import jobs
    from selfplay.run.preflight import check_reachable

    load_config(config, overrides or [])  # a typo fails here, naming the field
    check_reachable(address, "the Ray dashboard (--address)", 8265)
    try:
        job_id = jobs.submit(str(config), address, overrides or [], str(working_dir))
    except ValueError as e:
        _fail(str(e))
    typer.echo(job_id)
    if wait:
        st = jobs.wait(job_id, address, timeout_s=24 * 3600)
        typer.echo(jobs.logs(job_id, address))
        console.print(f"job {job_id}: {st}")
        raise typer.Exit(0 if st == "SUCCEEDED" else 1)


@app.command()
def logs(job_id: str, address: AddressOpt) -> None:
    """Print a submitted job's logs."""
    from selfplay.run import jobs
    from selfplay.run.preflight import check_reachable

    check_reachable(address, "the Ray dashboard (--address)", 8265)

    typer.echo(jobs.logs(job_id, address))


@app.command()
def stop(job_id: str, address: AddressOpt) -> None:
    """Stop a submitted job (the driver checkpoints at its next safe point)."""
    from selfplay.run import jobs
    from selfplay.run.preflight import check_reachable

    check_reachable(address, "the Ray dashboard (--address)", 8265)

    typer.echo("stopping" if jobs.stop(job_id, address) else "not running")


@app.command()
def dashboard(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
    port: Annotated[int, typer.Option()] = 8321,
    host: Annotated[str, typer.Option(help="bind address; keep 127.0.0.1 and port-forward over SSH")] = "127.0.0.1",
) -> None:
    """Serve the curriculum dashboard for the named runs (read-only); a directory of runs serves each."""
    from selfplay.dashboard.runs import NoRunFound, find_runs

    try:
        runs = find_runs(run_dirs)
    except NoRunFound as e:
        _fail(str(e))
    from selfplay.dashboard.app import port_in_use, serve

    busy = port_in_use(host, port)
    if busy:
        _fail(busy)
    console.print(f"dashboard: http://{host}:{port}/  ({len(runs)} run{'s' * (len(runs) != 1)}; Ctrl-C stops it)")
    serve(runs, host=host, port=port)


def _register_eval() -> None:
    try:
        from selfplay.evaluation.evaluate import eval_command
    except ImportError:  # evaluation extras missing: the rest of the CLI still works
        return
    app.command("eval", help="Evaluate a model (and adapter) on a benchmark: pass@1, maj@k, tool calls.")(eval_command)


_register_eval()
