"""`selfplay` command line: run, resume, submit to a Ray cluster, follow jobs, inspect runs, dashboard, eval.

Heavy imports (torch, ray, vllm) happen inside commands, so `selfplay --help` and config errors are instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from selfplay.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

AddressOpt = Annotated[str, typer.Option("--address", envvar="RAY_ADDRESS", help="Ray dashboard, e.g. http://HEAD:8265")]


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/debug.yaml")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted overrides: learner.lr=1e-5 run_dir=runs/x")] = None,
) -> None:
    """Start a self-play run (Ray starts locally unless ray.address is set)."""
    try:
        cfg = load_config(config, overrides or [])
        from selfplay.run.driver import Driver
        from selfplay.run.rundir import RunDir

        rd = RunDir.create(cfg)
    except ConfigError as e:
        _fail(str(e))
    console.print(f"run directory: [bold]{rd.root}[/bold]")
    sys.exit(Driver(rd).run())


@app.command()
def resume(run_dir: Annotated[Path, typer.Argument(help="a run directory written by `selfplay run`")]) -> None:
    """Continue a stopped or killed run from its last checkpoint, with its identical config."""
    from selfplay.run.driver import Driver
    from selfplay.run.rundir import RunDir

    rd = RunDir(run_dir.resolve())
    try:
        rd.load_config()
    except ConfigError as e:
        _fail(str(e))
    sys.exit(Driver(rd, resume=True).run())


@app.command()
def status(run_dir: Annotated[Path, typer.Argument()]) -> None:
    """Where a run stands: status, iteration, and its latest scalars."""
    from selfplay.telemetry.metrics import MetricsStore
    from selfplay.run.rundir import RunDir

    rd = RunDir(run_dir.resolve())
    if not rd.config.exists():
        _fail(f"{run_dir} is not a run directory")
    state = rd.state()
    out = {"run_dir": str(rd.root), **state}
    if rd.metrics.exists():
        store = MetricsStore(rd.metrics, readonly=True)
        last = store.last_iteration()
        out["last_logged_iteration"] = last
        if last is not None:
            out["scalars"] = store.scalars_at(last)
        store.close()
    typer.echo(json.dumps(out, indent=1, default=str))


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

    try:
        job_id = jobs.submit(str(config), address, overrides or [], str(working_dir))
    except (ConfigError, ValueError) as e:
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

    typer.echo(jobs.logs(job_id, address))


@app.command()
def stop(job_id: str, address: AddressOpt) -> None:
    """Stop a submitted job (the driver checkpoints at its next safe point)."""
    from selfplay.run import jobs

    typer.echo("stopping" if jobs.stop(job_id, address) else "not running")


@app.command()
def dashboard(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
    port: Annotated[int, typer.Option()] = 8321,
    host: Annotated[str, typer.Option(help="bind address; keep 127.0.0.1 and port-forward over SSH")] = "127.0.0.1",
) -> None:
    """Serve the curriculum dashboard for the named runs (read-only)."""
    from selfplay.dashboard.app import serve

    missing = [str(d) for d in run_dirs if not d.is_dir()]
    if missing:
        _fail(f"not a directory: {', '.join(missing)}")
    console.print(f"dashboard: http://{host}:{port}/")
    serve([d.resolve() for d in run_dirs], host=host, port=port)


def _register_eval() -> None:
    try:
        from selfplay.evaluation.evaluate import eval_command
    except ImportError:  # evaluation extras missing: the rest of the CLI still works
        return
    app.command("eval", help="Evaluate a model (and adapter) on a benchmark: pass@1, maj@k, tool calls.")(eval_command)


_register_eval()
