"""The dashboard draws the numbers the run logged: checked in real Chromium on a run whose every number is
known (written through the real MetricsStore). Each assertion reads what a chart drew (bar values, line
points, tick positions, card text), not only that it rendered."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from selfplay.config import RunConfig, dump_config
from selfplay.dashboard.app import create_app
from selfplay.telemetry.metrics import MetricsStore, TaskRecord

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
STAGES = {"propose": 10.0, "solve": 30.0, "learn_executor": 20.0, "other": 5.0}  # disjoint: sum = time/total
TOTAL = sum(STAGES.values())
ACCEPTED_RATE = [0.5, 0.5, 10 / 12]
TOKENS = [100.0, 250.0, 400.0]


def scalars_for(it: int) -> dict[str, float]:
    s = {f"time/stage/{k}": v for k, v in STAGES.items()}
    s.update({"time/total": TOTAL, "time/solve": 35.0, "time/tools": 3.0, "time/orchestration_share": 0.4,
              "time/busy/rollout": 38.0, "time/busy/learner": 50.0, "time/overlap": 8.0,
              "tasks/accepted_rate": ACCEPTED_RATE[it], "throughput/tokens": TOKENS[it],
              "executor/tool_calls_mean": 1.5, "sandbox/calls": 10.0, "sandbox/error_rate": 0.3,
              "learner/executor/entropy": 1.0, "sandbox/status/ok": 7.0, "sandbox/status/error": 3.0})
    return s


def tasks_for(it: int) -> list[TaskRecord]:
    """12 proposals: 4 unparseable, 8 at p_hat = 1/2 (inside the band 0.25-0.75 with k = 4)."""
    out = []
    for j in range(12):
        if j < 4:
            out.append(TaskRecord(f"i{it}-u{j}", it, "no question here", None, None, -1.0, {"format_ok": False},
                                  {}, 0, None, False, "parse:no_question"))
        else:
            out.append(TaskRecord(f"i{it}-t{j}", it, f"What is {j}+{it}?", str(j + it), 0.5, 1.0,
                                  {"uncertainty": 1.0}, {str(j + it): 2, "0": 2}, 4, 1.0, True, None))
    return out


@pytest.fixture
def served(tmp_path):
    import uvicorn

    run = tmp_path / "truth"
    run.mkdir()
    cfg = RunConfig(name="truth", run_dir=str(run))
    cfg.executor.samples_per_task, cfg.verifier.band_low, cfg.verifier.band_high = 4, 0.25, 0.75
    cfg.learner.kl_coef, cfg.loop.iterations = 0.0, 3
    (run / "config.yaml").write_text(dump_config(cfg))
    with MetricsStore(run / "metrics.sqlite") as store:
        for it in range(3):
            store.log_tasks(it, tasks_for(it))
            store.log_scalars(it, scalars_for(it))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(create_app([run]), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started and thread.is_alive():
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def ema_debiased(ys: list[float], w: float) -> list[float]:
    """TensorBoard's smoothing, written independently of the page's."""
    out, last = [], 0.0
    for n, y in enumerate(ys, 1):
        last = last * w + (1 - w) * y
        out.append(last / (1 - w ** n))
    return out


@contextmanager
def opened(served: str, errors: list[str]):
    """The dashboard at `served` in Chromium, drawn (the time chart's bars are there); page errors go to
    `errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(served)
        page.wait_for_selector('[data-chart="time"] rect.bar')
        yield page
        browser.close()


def test_charts_draw_the_logged_numbers(served):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (`make browser` installs it; needs root and apt)")
    from playwright.sync_api import expect

    errors: list[str] = []
    with opened(served, errors) as page:

        # time: only the disjoint stages are stacked, and each bar's height is the iteration's wall time
        bars = page.eval_on_selector_all('[data-chart="time"] rect.bar', "els => els.map(e => [+e.dataset.x, "
                                         "e.dataset.label, +e.dataset.value, +e.getAttribute('height')])")
        for it in range(3):
            mine = [b for b in bars if b[0] == it]
            assert {b[1] for b in mine} == set(STAGES)
            assert sum(b[2] for b in mine) == pytest.approx(TOTAL)
        heights = [sum(b[3] for b in bars if b[0] == it) for it in range(3)]
        assert max(heights) - min(heights) < 0.5  # same wall time, same drawn height
        colors = page.eval_on_selector_all('[data-chart="time"] rect.bar', "els => els.map(e => e.getAttribute('fill'))")
        assert len(set(colors)) == len(STAGES)  # one colour per stage
        # busy time and overlap are drawn beside it, as lines
        busy = set(page.eval_on_selector_all('[data-chart="busy"] path.series', "els => els.map(e => e.dataset.label)"))
        assert busy == {"busy/rollout", "busy/learner", "overlap", "total"}

        # curriculum verdict counts the unparseable proposals
        verdict = page.locator('[data-kpi="verdict"]').inner_text()
        assert "on target" in verdict and "24 of 36 proposals (67%)" in verdict and "12 unparseable" in verdict
        # a share's change is in percentage points
        assert "▲ 33 pp" in page.locator('[data-kpi="accepted"]').inner_text()
        # sandbox health: red, with the count
        card = page.locator('[data-kpi="sandbox"]')
        assert "health bad" in card.get_attribute("class") and "3 of 10 tool calls failed" in card.inner_text()

        # empty cards say why
        assert page.locator('[data-chart="kl"] .empty-msg').inner_text().startswith("KL off: learner.kl_coef = 0")
        assert "no evaluation configured" in page.locator('[data-chart="eval"] .empty-msg').inner_text()
        # units per axis: tool calls are counted in calls, not on a % axis
        assert page.locator('[data-chart="tools"] .axis-unit').text_content() == "calls"
        assert "%" not in "".join(page.locator('[data-chart="tools"] .ytick').all_text_contents())

        # heatmap: a row per p_hat = j/4, each tick at its row's centre; the band at row edges
        ticks = page.eval_on_selector_all('[data-chart="difficulty-truth"] .ytick',
                                          "els => els.map(e => [e.textContent, +e.dataset.value, +e.getAttribute('y')])")
        assert [t[0] for t in ticks] == ["0", "1/4", "1/2", "3/4", "1"]
        cell = page.eval_on_selector('[data-chart="difficulty-truth"] rect.cell[data-bin="2"]',
                                     "e => +e.getAttribute('y') + +e.getAttribute('height') / 2")
        half = next(t for t in ticks if t[0] == "1/2")
        assert abs((half[2] - 3.5) - cell) < 1.0
        edges = page.eval_on_selector_all('[data-chart="difficulty-truth"] .band-line', "els => els.map(e => +e.dataset.edge)")
        assert sorted(edges) == pytest.approx([0.125, 0.875])
        assert page.locator('[data-chart="difficulty-truth"] .color-scale').count() == 1
        shares = page.eval_on_selector_all('[data-chart="difficulty-truth"] rect.cell[data-bin="2"]',
                                           "els => els.map(e => +e.dataset.share)")
        assert shares == pytest.approx([8 / 12] * 3, abs=1e-3)

        # a rejected proposal shows its real reason
        page.click('#f-status button[data-v="rejected"]')
        badge = page.locator("#task-table tbody .badge").first
        expect(badge).to_have_text("unparseable")
        assert "no <question> tag" in badge.get_attribute("title")

        def points(chart: str) -> list[list[float]]:
            import json

            return json.loads(page.locator(f'[data-chart="{chart}"] path.series').first.get_attribute("data-points"))

        # smoothing: the drawn line is TensorBoard's debiased EMA of the logged values
        assert [y for _, y in points("accept")] == pytest.approx(ACCEPTED_RATE)
        page.eval_on_selector("#smoothing", "e => { e.value = '0.6'; e.dispatchEvent(new Event('input')); }")
        assert [y for _, y in points("accept")] == pytest.approx(ema_debiased(ACCEPTED_RATE, 0.6))
        page.eval_on_selector("#smoothing", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        # x axis: wall time (running sum of time/total) and generated tokens (running sum)
        page.select_option("#x-axis", "wall")
        assert [x for x, _ in points("accept")] == pytest.approx([TOTAL, 2 * TOTAL, 3 * TOTAL])
        page.select_option("#x-axis", "tokens")
        assert [x for x, _ in points("accept")] == pytest.approx([100, 350, 750])
    assert not errors, errors


def test_every_chart_follows_the_x_axis_choice(served):
    """Bars and heatmap columns too, not only the lines: on a wall-time or token axis an iteration covers the
    stretch from the previous iteration's end to its own, drawn where that axis's ticks say it is."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (`make browser` installs it; needs root and apt)")

    wall = [(it * TOTAL, (it + 1) * TOTAL) for it in range(3)]
    tokens = [(0.0, 100.0), (100.0, 350.0), (350.0, 750.0)]
    charts = {"time": "rect.bar", "sandbox": "rect.bar", "difficulty-truth": "rect.cell:not(.unscored)"}
    errors: list[str] = []
    with opened(served, errors) as page:

        def drawn(chart: str, sel: str) -> dict[int, tuple[float, float]]:
            """iteration -> [left, right] of its bars, in the x axis's unit, read back through the ticks."""
            ticks = page.eval_on_selector_all(f'[data-chart="{chart}"] .xtick',
                                              "els => els.map(e => [+e.dataset.value, +e.getAttribute('x')])")
            assert len(ticks) >= 2, (chart, ticks)
            (v0, p0), (v1, p1) = ticks[0], ticks[-1]
            unit = lambda px: v0 + (px - p0) * (v1 - v0) / (p1 - p0)
            rects = page.eval_on_selector_all(f'[data-chart="{chart}"] {sel}', "els => els.map(e => ["
                                              "+(e.dataset.x ?? e.dataset.iteration), +e.getAttribute('x'), "
                                              "+e.getAttribute('width')])")
            out: dict[int, tuple[float, float]] = {}
            for it, left, width in rects:
                out.setdefault(int(it), (unit(left), unit(left + width)))
            return out

        def max_xtick(chart: str) -> float:
            return max(page.eval_on_selector_all(f'[data-chart="{chart}"] .xtick', "els => els.map(e => +e.dataset.value)"))

        every = page.eval_on_selector_all("[data-chart]:has(svg)", "els => els.map(e => e.dataset.chart)")
        assert {"time", "sandbox", "difficulty-truth", "accept", "skill"} <= set(every)
        for kind, spans, tol in (("wall", wall, 1.0), ("tokens", tokens, 2.0)):
            page.select_option("#x-axis", kind)
            for chart, sel in charts.items():
                got = drawn(chart, sel)
                assert sorted(got) == [0, 1, 2], (kind, chart, got)
                for it, (lo, hi) in enumerate(spans):
                    assert got[it][0] == pytest.approx(lo, abs=tol) and got[it][1] == pytest.approx(hi, abs=tol), \
                        (kind, chart, it, got[it], (lo, hi))
            # every chart drawn is on this axis: its ticks are in seconds / tokens, far beyond iteration 2
            for chart in every:
                assert max_xtick(chart) >= spans[-1][1] / 2, (kind, chart)
        page.select_option("#x-axis", "iteration")
        for chart, sel in charts.items():
            got = drawn(chart, sel)
            for it in range(3):  # centred on the iteration
                assert sum(got[it]) / 2 == pytest.approx(it, abs=0.05), (chart, it, got[it])
        for chart in every:
            assert max_xtick(chart) <= 3, chart
    assert not errors, errors
