"""What the documents promise about reproducing their numbers: `make bench` runs every benchmark script
BENCHMARKS.md cites, and each of its sections names the script (or make target) its figures come from."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = (REPO / "BENCHMARKS.md").read_text()


@pytest.fixture(scope="module")
def bench_recipe(tmp_path_factory) -> str:
    """What `make bench` would run (dry run: nothing is executed)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    runs = tmp_path_factory.mktemp("bench-runs")
    out = subprocess.run(["make", "-n", "bench", f"BENCH_RUNS={runs}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_bench_runs_every_script_benchmarks_md_cites(bench_recipe):
    cited = set(re.findall(r"bench/[\w-]+\.py", BENCHMARKS))
    assert len(cited) >= 6
    missing = sorted(s for s in cited if s not in bench_recipe)
    assert not missing, f"BENCHMARKS.md cites {missing}, which `make bench` does not run"


def test_make_bench_reruns_the_evaluation_and_learning_tables(bench_recipe):
    assert re.search(r"selfplay run configs/debug.yaml loop.iterations=6 eval.every=0", bench_recipe)
    assert "for t in --no-tools --tools" in bench_recipe  # both modes, base and adapter, as the table
    assert bench_recipe.count("selfplay eval --model embedded --benchmark generated --limit 50") == 2
    assert "--adapter" in bench_recipe and "/after-selfplay/checkpoints" in bench_recipe


def test_every_benchmarks_section_names_its_script():
    sections = re.split(r"^## ", BENCHMARKS, flags=re.M)[1:]
    assert len(sections) >= 6
    for section in sections:
        title = section.splitlines()[0]
        assert re.search(r"`(bench/[\w-]+\.py|make bench-[\w-]+)", title), f"section {title!r} names no script"
