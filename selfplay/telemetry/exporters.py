"""Optional views of a run's scalars in other tools: console, TensorBoard, Weights & Biases, MLflow.

The metrics store (`selfplay/telemetry/metrics.py`) is the source of truth; an exporter only mirrors the scalars
the store receives. Choose them with `metrics.exporters` in the run config. wandb and mlflow are imported
only when selected, and a missing package fails at start with the pip command, not mid-run.

Resume: each exporter is told the last iteration kept (`resume_from`) so the re-logged iterations replace
the old ones where the backend allows it: TensorBoard purges events past it; wandb uses `iteration` as a
custom x-axis because its own `step` must only grow (ms-swift #7080: out-of-order steps were dropped);
MLflow keeps history per step, so a re-logged step appears twice there (the dashboard has no such issue).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

from selfplay.config import MetricsConfig


@runtime_checkable
class Exporter(Protocol):
    name: str

    def log_scalars(self, iteration: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _pick(scalars: Mapping[str, float], key: str) -> float | None:
    v = scalars.get(key)
    return None if v is None or v != v else float(v)


def summary_line(iteration: int, scalars: Mapping[str, float]) -> str:
    """One human line per iteration: what a user scans for in a terminal (difficulty, accuracy, speed)."""
    parts = [f"it {iteration:>4}"]
    proposed, accepted = _pick(scalars, "tasks/proposed"), _pick(scalars, "tasks/accepted")
    rate = _pick(scalars, "tasks/accepted_rate")
    if proposed is not None and accepted is not None:
        share = f" ({accepted / proposed:.0%})" if proposed else ""
        parts.append(f"accepted {accepted:.0f}/{proposed:.0f}{share}")
    elif rate is not None:
        parts.append(f"accepted {rate:.0%}")
    labels = [
        ("pool/size", "pool {:.0f}"), ("executor/accuracy", "exec acc {:.2f}"),
        ("proposer/reward_mean", "prop R {:+.3f}"), ("executor/tool_calls_mean", "tools {:.1f}"),
        ("throughput/tokens_per_s", "{:.0f} tok/s"), ("time/total", "{:.1f}s"),
    ]
    parts += [fmt.format(v) for key, fmt in labels if (v := _pick(scalars, key)) is not None]
    for key in sorted(scalars):
        if key.startswith("eval/") and key.endswith("/pass@1") and (v := _pick(scalars, key)) is not None:
            lo, hi = _pick(scalars, f"{key}_ci95_lo"), _pick(scalars, f"{key}_ci95_hi")
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            parts.append(f"{key[5:-7]} pass@1 {v:.3f}{ci}")
    labels_right, probes = _pick(scalars, "verifier/label_accuracy"), _pick(scalars, "verifier/probes")
    if labels_right is not None and probes:  # pseudo-label accuracy on known-answer probes
        parts.append(f"labels {labels_right:.0%} of {probes:.0f} probes")
    calls, err = _pick(scalars, "sandbox/calls"), _pick(scalars, "sandbox/error_rate")
    if calls:  # sandbox health: a run must never look fine while its tool fails
        failed = round((err or 0.0) * calls)
        parts.append(f"SANDBOX FAILING {failed}/{calls:.0f}" if failed else f"sandbox ok {calls:.0f} calls")
    restarts = _pick(scalars, "faults/actor_restarts")
    if restarts:
        parts.append(f"restarts {restarts:.0f}")
    if len(parts) == 1:
        parts.append(f"{len(scalars)} scalars")
    return "  ".join(parts)


class ConsoleExporter:
    name = "console"

    def __init__(self, console: Any = None):
        from rich.console import Console

        self.console = console or Console(highlight=False, soft_wrap=True)

    def log_scalars(self, iteration: int, scalars: Mapping[str, float]) -> None:
        from rich.text import Text

        line = Text(summary_line(iteration, scalars))
        line.highlight_regex(r"SANDBOX FAILING \S+", "bold red")
        self.console.print(line)

    def close(self) -> None:
        pass


class TensorBoardExporter:
    """Event files under `<run_dir>/tensorboard`; `tensorboard --logdir <run_dir>/tensorboard` shows them."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, resume_from: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch ships the writer; it needs the tensorboard package
            raise ImportError(f"metrics.exporters has 'tensorboard' but it cannot be imported ({e}): "
                              "pip install tensorboard") from None
        purge = None if resume_from is None else resume_from + 1  # events at steps >= purge are hidden
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log_scalars(self, iteration: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=iteration)
        self.writer.flush()  # once per iteration: a live `tensorboard` sees it now, not in 2 minutes

    def close(self) -> None:
        self.writer.close()


def _import_optional(module: str, exporter: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(
            f"metrics.exporters has {exporter!r} but {module.split('.')[0]} cannot be imported ({e}): "
            f"pip install 'selfplay[exporters]' (or pip install {exporter})"
        ) from None


def _remembered_id(path: Path, make: Any) -> str:
    """The backend's run id lives in the run dir, so a resumed run appends to the same remote run."""
    if path.is_file():
        return path.read_text().strip()
    run_id = str(make())
    path.write_text(run_id + "\n")
    return run_id


class WandbExporter:
    """wandb in offline mode by default (clusters have no internet): `wandb sync <run_dir>/wandb` uploads."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, mode: str, run_name: str | None, run_config: dict | None):
        wandb = _import_optional("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE") or mode
        run_id = _remembered_id(run_dir / "wandb_run_id", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=project, name=run_name or run_dir.name, id=run_id, dir=str(run_dir), mode=mode,
            config=run_config, resume=None if mode == "offline" else "allow", reinit="create_new",
        )
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")  # x = iteration, not wandb's monotonic step

    def log_scalars(self, iteration: int, scalars: Mapping[str, float]) -> None:
        self.run.log({**scalars, "iteration": iteration})

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")  # MLflow metric names: alphanumerics, _ - . space : /


def mlflow_key(key: str) -> str:
    """`eval/gsm8k/pass@1` -> `eval/gsm8k/pass_1`: MLflow rejects other characters."""
    return _MLFLOW_BAD.sub("_", key)


class MlflowExporter:
    """MLflow run; by default a SQLite tracking store in the run dir (`mlflow ui --backend-store-uri ...`)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, tracking_uri: str | None, run_name: str | None, run_config: dict | None):
        tracking = _import_optional("mlflow.tracking", "mlflow")
        entities = _import_optional("mlflow.entities", "mlflow")
        self._metric, param = entities.Metric, entities.Param
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"
        self.client = tracking.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("selfplay")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("selfplay")

        def new_run() -> str:
            run = self.client.create_run(experiment_id, run_name=run_name or run_dir.name)
            params = [param(k, v) for k, v in _flatten(run_config or {}).items()]
            for start in range(0, len(params), 100):  # MLflow's log_batch limit for params
                self.client.log_batch(run.info.run_id, params=params[start:start + 100])
            return run.info.run_id

        self.run_id = _remembered_id(run_dir / "mlflow_run_id", new_run)

    def log_scalars(self, iteration: int, scalars: Mapping[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        metrics = [self._metric(mlflow_key(k), float(v), now_ms, iteration) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[mlflow_key(name)] = str(value)[:500]  # MLflow param values are limited in length
    return out


def make_exporters(
    cfg: MetricsConfig,
    run_dir: str | Path,
    *,
    resume_from: int | None = None,
    run_name: str | None = None,
    run_config: dict | None = None,
    console: Any = None,
) -> list[Exporter]:
    """Build the exporters `cfg.exporters` names. `resume_from`: last iteration kept after `truncate_after`.
    `console`: where the console exporter prints (the run's console, which also keeps logs/driver.log)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out: list[Exporter] = []
    for name in dict.fromkeys(cfg.exporters):  # each once, in the order given
        if name == "console":
            out.append(ConsoleExporter(console))
        elif name == "tensorboard":
            out.append(TensorBoardExporter(run_dir / "tensorboard", resume_from))
        elif name == "wandb":
            out.append(WandbExporter(run_dir, cfg.wandb_project, cfg.wandb_mode, run_name, run_config))
        elif name == "mlflow":
            out.append(MlflowExporter(run_dir, cfg.mlflow_tracking_uri, run_name, run_config))
        else:
            raise ValueError(f"unknown metrics exporter {name!r}: choose from console, tensorboard, wandb, mlflow")
    return out
