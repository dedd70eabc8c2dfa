"""The GPU experiment's table in the Agent0 layout: Base, Base w/ tool, + self-play, reference reward (RLVR),
on math benchmark files, every cell with its 95% interval (selfplay/evaluation/table.py).

    # on one 80 GB GPU, after the two runs of configs/single_gpu.yaml (self-play and loop.mode=reference):
    python bench/agent0_table.py --model Qwen/Qwen3-4B-Base --backend vllm \
        --benchmark data/math500.jsonl:math500 --benchmark data/gsm8k.jsonl:gsm8k --benchmark generated \
        --selfplay runs/single-gpu --reference runs/single-gpu-rlvr --config configs/single_gpu.yaml \
        --out runs/agent0-table
    python bench/agent0_table.py --out runs/agent0-table --benchmark math500 --table-only   # just the table

`--benchmark FILE:FIELDS` takes `selfplay eval`'s field mapping (a known name such as math500 or
question=problem,answer=answer). An evaluation whose results.json exists is reused (`--no-reuse` redoes it);
a row whose run is not given, or a cell never evaluated, reads "not run". The GPU machines have no network:
save hub sets as JSONL beforehand (`selfplay eval --benchmark math500` prints the command when offline).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfplay.config import load_config  # noqa: E402
from selfplay.evaluation.table import ROWS, cell_dir, format_table  # noqa: E402


def _bench(spec: str) -> tuple[str, str, str | None]:
    """'data/math500.jsonl:math500' -> (column name, source, fields)."""
    source, _, fields = spec.partition(":")
    name = Path(source).stem if source.endswith((".jsonl", ".json", ".parquet", ".csv")) else source
    return name, source, fields or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--benchmark", action="append", required=True, help="name or FILE[:FIELDS]; repeat")
    ap.add_argument("--selfplay", help="self-play run dir (its checkpoints' executor adapter)")
    ap.add_argument("--reference", help="reference-reward run dir")
    ap.add_argument("--config", help="run YAML supplying executor/sandbox/verifier/engine settings")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", default="runs/agent0-table")
    ap.add_argument("--no-reuse", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="print the table from what is already evaluated")
    args = ap.parse_args(argv)
    benches = [_bench(b) for b in args.benchmark]
    if not args.table_only:
        from selfplay.evaluation.evaluate import evaluate

        cfg = load_config(args.config) if args.config else None
        adapters = {"+ self-play": args.selfplay, "reference reward (RLVR)": args.reference}
        for row in ROWS:
            adapter = adapters.get(row.name)
            if row.name in adapters and adapter is None:
                continue  # that run was not made: its row reads "not run"
            if adapter is not None:
                adapter = str(Path(adapter) / "checkpoints") if (Path(adapter) / "checkpoints").is_dir() else adapter
            for name, source, fields in benches:
                out = cell_dir(args.out, row.name, name)
                if (out / "results.json").exists() and not args.no_reuse:
                    continue
                print(f"evaluating {row.name} on {name} -> {out}", file=sys.stderr)
                evaluate(args.model, source, adapter, tools=row.tools, samples=1, limit=args.limit, out=out,
                         backend=args.backend, fields=fields, run_cfg=cfg, progress=True)
    print(format_table(args.out, [name for name, _, _ in benches]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
