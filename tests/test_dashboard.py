"""Dashboard: the JSON API over stores written by MetricsStore, its security model, and the page in Chromium."""
from __future__ import annotations

import os
import random
import re
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfplay.config import RunConfig, dump_config
from selfplay.dashboard.app import create_app
from selfplay.dashboard.demo import synthetic_iteration, write_config
from selfplay.telemetry.metrics import MetricsStore, TaskRecord

XSS = 'Compute 2+2. <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
CHROMIUM = "/usr/bin/chromium"


def write_run(run_dir: Path, iterations: int, seed: int, band: tuple[float, float] = (0.3, 0.8)) -> dict:
    """A run dir with config.yaml and a store written through MetricsStore; returns what was logged."""
    cfg = write_config(run_dir, iterations=iterations)
    cfg.verifier.band_low, cfg.verifier.band_high = band
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    rng, logged = random.Random(seed), {"scalars": {}, "tasks": [], "trajs": []}
    with MetricsStore(run_dir / "metrics.sqlite") as store:
        for it in range(iterations):
            scalars, tasks, trajs = synthetic_iteration(it, cfg, rng)
            if it == 1:
                tasks.append(TaskRecord("xss", 1, XSS, "4", 0.5, 1.0, {"uncertainty": 1.0}, {"4": 5, "5": 5}, 10,
                                        0.0, True, None))
            store.log_tasks(it, tasks)
            store.log_trajectories(it, trajs)
            store.log_scalars(it, scalars)
            logged["scalars"][it] = scalars
            logged["tasks"] += tasks
            logged["trajs"] += trajs
    return {"cfg": cfg, **logged}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    return {"root": root, "alpha": write_run(root / "alpha", 8, seed=1),
            "beta": write_run(root / "beta", 5, seed=2, band=(0.25, 0.75))}


@pytest.fixture(scope="module")
def client(runs) -> TestClient:
    return TestClient(create_app([runs["root"] / "alpha", runs["root"] / "beta"]), base_url="http://127.0.0.1")


def test_runs_are_listed_by_id_with_their_band(client) -> None:
    got = {r["id"]: r for r in client.get("/api/runs").json()}
    assert set(got) == {"alpha", "beta"}
    assert (got["alpha"]["config"]["band_low"], got["alpha"]["config"]["band_high"]) == (0.3, 0.8)
    assert (got["beta"]["config"]["band_low"], got["beta"]["config"]["band_high"]) == (0.25, 0.75)
    assert "/" not in got["alpha"]["dir_name"]  # the page never learns absolute paths


def test_scalars_are_the_logged_series(client, runs) -> None:
    series = client.get("/api/runs/alpha/scalars").json()
    logged = runs["alpha"]["scalars"]
    for key in ("executor/accuracy", "tasks/accepted_rate", "time/total", "sandbox/status/ok"):
        assert series[key]["x"] == sorted(logged)
        assert series[key]["y"] == pytest.approx([logged[it][key] for it in sorted(logged)])
    evals = series["eval/gsm8k/pass@1"]
    assert evals["x"] == [it for it in sorted(logged) if "eval/gsm8k/pass@1" in logged[it]]
    only = client.get("/api/runs/alpha/scalars", params={"prefix": "learner/"}).json()
    assert only and all(k.startswith("learner/") for k in only)


def test_difficulty_matches_the_logged_tasks(client, runs) -> None:
    diff = client.get("/api/runs/beta/difficulty").json()
    tasks, (lo, hi) = runs["beta"]["tasks"], (0.25, 0.75)
    k = runs["beta"]["cfg"].executor.samples_per_task
    assert diff["band"] == [lo, hi] and diff["bins"] == k
    for p in diff["per_iteration"]:
        mine = [t for t in tasks if t.iteration == p["iteration"]]
        scored = [t.p_hat for t in mine if t.p_hat is not None]
        assert p["tasks"] == len(mine) and p["accepted"] == sum(t.accepted for t in mine)
        assert (p["below"], p["inside"], p["above"]) == (
            sum(x < lo for x in scored), sum(lo <= x <= hi for x in scored), sum(x > hi for x in scored))
        assert p["unscored"] == len(mine) - len(scored)
        assert p["mean_p_hat"] == pytest.approx(sum(scored) / len(scored))
        cells = {c["bin"]: c["count"] for c in diff["cells"] if c["iteration"] == p["iteration"]}
        expected: dict[int, int] = {}
        for x in scored:
            expected[round(x * k)] = expected.get(round(x * k), 0) + 1
        assert cells == expected


@pytest.mark.parametrize("k", [2, 3])
def test_heatmap_has_one_row_per_possible_p_hat_for_small_k(tmp_path, k) -> None:
    """k = 3 gives p_hat in {1/3, 2/3, 1}: three rows plus 0, not four bins that 1/3 and 2/3 fall between,
    even when most logged proposals were unparseable (they have no samples)."""
    run = tmp_path / f"k{k}"
    cfg = write_config(run)
    cfg.executor.samples_per_task = k
    (run / "config.yaml").write_text(dump_config(cfg))
    tasks = [TaskRecord(f"u{j}", 0, "?", None, None, -1.0, {}, {}, 0, None, False, "parse:no_question") for j in range(5)]
    tasks += [TaskRecord(f"t{j}", 0, "q", "1", j / k, 0.0, {}, {"1": j}, k, 0.0, False, None) for j in range(1, k + 1)]
    with MetricsStore(run / "metrics.sqlite") as store:
        store.log_tasks(0, tasks)
    diff = TestClient(create_app([run]), base_url="http://127.0.0.1").get(f"/api/runs/k{k}/difficulty").json()
    assert diff["bins"] == k
    assert sorted(c["bin"] for c in diff["cells"]) == list(range(1, k + 1))
    (run / "config.yaml").write_text("name: no-k\n")  # without k in the config: the scored tasks' own k
    diff = TestClient(create_app([run]), base_url="http://127.0.0.1").get(f"/api/runs/k{k}/difficulty").json()
    assert diff["bins"] == k


def test_task_filters_search_sort_and_paging(client, runs) -> None:
    tasks = runs["alpha"]["tasks"]
    page = client.get("/api/runs/alpha/tasks", params={"status": "accepted", "limit": 500}).json()
    assert page["total"] == sum(t.accepted for t in tasks) and all(r["accepted"] for r in page["rows"])
    page = client.get("/api/runs/alpha/tasks", params={"iteration": 3, "status": "rejected"}).json()
    assert page["total"] == sum(t.iteration == 3 and not t.accepted for t in tasks)
    page = client.get("/api/runs/alpha/tasks", params={"q": "GEOMETRY", "limit": 500}).json()
    assert page["total"] == sum("geometry" in t.question.lower() for t in tasks) > 0
    assert client.get("/api/runs/alpha/tasks", params={"q": "100%_"}).json()["total"] == 0  # LIKE chars literal
    ranked = client.get("/api/runs/alpha/tasks", params={"sort": "p_hat", "limit": 500}).json()["rows"]
    values = [r["p_hat"] for r in ranked if r["p_hat"] is not None]
    assert values == sorted(values, reverse=True) and ranked[-1]["p_hat"] is None
    seen = []
    for offset in range(0, len(tasks), 7):
        seen += [r["task_id"] for r in client.get("/api/runs/alpha/tasks", params={"limit": 7, "offset": offset}).json()["rows"]]
    assert sorted(seen) == sorted(t.task_id for t in tasks)
    assert client.get("/api/runs/alpha/tasks", params={"status": "maybe"}).status_code == 422
    assert client.get("/api/runs/alpha/tasks", params={"sort": "question; DROP TABLE tasks"}).status_code == 422


def test_task_detail_lists_its_trajectories(client, runs) -> None:
    task = next(t for t in runs["alpha"]["tasks"] if t.iteration == 2)
    detail = client.get(f"/api/runs/alpha/tasks/{task.task_id}").json()
    mine = sorted((t for t in runs["alpha"]["trajs"] if t.task_id == task.task_id), key=lambda t: (t.iteration, t.traj_id))
    assert [t["traj_id"] for t in detail["trajectories"]] == [t.traj_id for t in mine]
    assert [t["text"] for t in detail["trajectories"]] == [t.text for t in mine]
    assert [t["sandbox_statuses"] for t in detail["trajectories"]] == [t.sandbox_statuses for t in mine]
    assert detail["agreement"] == task.agreement and detail["p_hat"] == task.p_hat
    assert client.get("/api/runs/alpha/tasks/nope").status_code == 404


@pytest.mark.parametrize("url", [
    "/api/runs/../version", "/api/runs/..%2F..%2Fetc/version", "/api/runs/%2Fetc%2Fpasswd/version",
    "/api/runs/..%252Fsecret/version", "/api/runs/secret/version", "/api/runs/%2e%2e/version",
    "/api/runs/alpha/../secret/version", "/api/runs/alpha%2F..%2Fsecret/tasks", "/static/../app.py",
    "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fconfig.py",
])
def test_no_path_reaches_outside_the_named_runs(client, runs, url) -> None:
    secret = runs["root"] / "secret"
    if not secret.exists():
        write_run(secret, 1, seed=9)
    r = client.get(url)
    assert r.status_code in (404, 400, 405), (url, r.status_code)
    assert "revision" not in r.text and "import" not in r.text  # no run data, no package source


def test_symlinks_cannot_lead_a_run_outside_its_directory(tmp_path, runs) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "metrics.sqlite").symlink_to(runs["root"] / "alpha" / "metrics.sqlite")  # a store elsewhere
    (planted / "config.yaml").symlink_to("/etc/hostname")
    linked = tmp_path / "linked"
    linked.symlink_to(runs["root"] / "beta", target_is_directory=True)  # a symlink named on the command line
    c = TestClient(create_app([planted, linked]), base_url="http://127.0.0.1")
    assert c.get("/api/runs/planted/version").status_code == 403
    assert c.get("/api/runs/planted/tasks").status_code == 403
    assert c.get("/api/runs/planted/difficulty").status_code == 403
    listed = {r["id"]: r for r in c.get("/api/runs").json()}
    assert "outside" in listed["planted"]["error"]
    assert c.get("/api/runs/beta/version").json()["last_iteration"] == 4  # the named link resolves, as given


def test_read_only_bound_to_local_host_names_with_strict_headers(client, runs) -> None:
    store = runs["root"] / "alpha" / "metrics.sqlite"
    before = sqlite3.connect(store).execute("SELECT value FROM meta WHERE key='revision'").fetchone()
    for method in ("post", "put", "delete", "patch"):
        assert getattr(client, method)("/api/runs/alpha/tasks").status_code == 405
    r = client.get("/api/runs/alpha/version")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/api/runs", headers={"host": "evil.example:8321"}).status_code == 400  # DNS rebinding
    assert client.get("/api/runs", headers={"host": "localhost:8321"}).status_code == 200
    after = sqlite3.connect(store).execute("SELECT value FROM meta WHERE key='revision'").fetchone()
    assert before == after


def test_runs_without_a_store_or_with_a_broken_one_answer_clearly(tmp_path) -> None:
    waiting, broken = tmp_path / "waiting", tmp_path / "broken"
    write_config(waiting)
    broken.mkdir()
    (broken / "metrics.sqlite").write_bytes(b"this is not a database" * 100)
    (broken / "config.yaml").write_text(":: not yaml [")
    c = TestClient(create_app([waiting, broken]), base_url="http://127.0.0.1")
    assert c.get("/api/runs/waiting/version").json()["revision"] == 0
    assert c.get("/api/runs/waiting/tasks").json()["rows"] == []
    r = c.get("/api/runs/broken/tasks")
    assert r.status_code == 503 and "cannot be read" in r.json()["detail"]
    assert {x["id"]: x for x in c.get("/api/runs").json()}["broken"]["config"]["band_low"] == 0.3  # defaults


def test_practice_trajectories_of_older_tasks_join_their_task_and_go_on_truncate(tmp_path) -> None:
    run = tmp_path / "practice"
    write_config(run)
    from selfplay.telemetry.metrics import TrajectoryRecord

    with MetricsStore(run / "metrics.sqlite") as store:
        store.log_tasks(2, [TaskRecord("t2", 2, "q", "7", 0.5, accepted=True)])
        store.log_trajectories(2, [TrajectoryRecord("v1", "t2", 2, "executor", "verify sample", answer="7")])
        store.log_trajectories(5, [TrajectoryRecord("p1", "t2", 5, "executor", "practice", reward=1.0)])
        c = TestClient(create_app([run]), base_url="http://127.0.0.1")
        detail = c.get("/api/runs/practice/tasks/t2").json()
        assert [(t["traj_id"], t["iteration"]) for t in detail["trajectories"]] == [("v1", 2), ("p1", 5)]
        assert c.get("/api/runs/practice/tasks").json()["rows"][0]["n_trajectories"] == 2
        store.truncate_after(4)
        assert [t["traj_id"] for t in c.get("/api/runs/practice/tasks/t2").json()["trajectories"]] == ["v1"]


def test_events_are_the_last_readable_lines(tmp_path) -> None:
    """The newest readable events, oldest first, without the loop's per-stage progress markers."""
    run = tmp_path / "ev"
    write_config(run)
    lines = []
    for i in range(5):
        lines.append(f'{{"t": {i}, "event": "actor_restart", "actor": "rollout-{i}"}}')
        lines.append(f'{{"t": {i}, "event": "stage", "iteration": {i}, "stage": "propose", "phase": "start"}}')
    (run / "events.jsonl").write_text("\n".join(lines) + '\n{"t": 9, "event": "res')  # last line cut by a kill
    c = TestClient(create_app([run]), base_url="http://127.0.0.1")
    got = c.get("/api/runs/ev/events", params={"limit": 3}).json()
    assert [e["actor"] for e in got] == ["rollout-2", "rollout-3", "rollout-4"]


def test_new_iterations_and_nan_values_reach_the_api(tmp_path) -> None:
    run = tmp_path / "live"
    write_config(run)
    c = TestClient(create_app([run]), base_url="http://127.0.0.1")
    with MetricsStore(run / "metrics.sqlite") as store:
        store.log_scalars(0, {"learner/executor/loss": 0.5})
        v0 = c.get("/api/runs/live/version").json()
        store.log_scalars(1, {"learner/executor/loss": float("nan")})
        v1 = c.get("/api/runs/live/version").json()
    assert v1["revision"] > v0["revision"] and (v0["last_iteration"], v1["last_iteration"]) == (0, 1)
    assert c.get("/api/runs/live/scalars").json()["learner/executor/loss"]["y"] == [0.5, None]


# -- the served process ----------------------------------------------------------------------------------

def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as the kernel writes them) of the TCP sockets listening on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                out.append(local.rsplit(":", 1)[0])
    return out


def test_cli_dashboard_listens_on_loopback_only_by_default(tmp_path, runs) -> None:
    """`selfplay dashboard RUN` without --host: reachable on 127.0.0.1, bound to nothing else (the data is a
    run's prompts and outputs; docs/dashboard.md says to port-forward over SSH instead)."""
    import subprocess
    import sys
    import urllib.request

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "selfplay", "dashboard", str(runs["root"] / "alpha"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _listeners(port):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the dashboard never listened"
            time.sleep(0.2)
        assert _listeners(port) == ["0100007F"]  # 127.0.0.1, not 0.0.0.0 and no IPv6 socket
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- the page in a real browser ---------------------------------------------------------------------------

def _chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    pytest.skip("Debian chromium not installed (`make browser` installs it; needs root and apt)")


@pytest.fixture
def server(tmp_path, runs):
    """The dashboard over a copy of alpha (so the test can append to it) and beta, on a free local port."""
    import uvicorn

    live = tmp_path / "alpha"
    shutil.copytree(runs["root"] / "alpha", live)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(create_app([live, runs["root"] / "beta"]), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started and thread.is_alive():
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", live
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_page_renders_every_chart_filters_tasks_and_updates_live(server, runs) -> None:
    chromium = _chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    url, live = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        errors: list[str] = []
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        page.wait_for_selector("#task-table tbody tr[data-task-id]")
        expect(page.locator('[data-chart="faults"] svg')).to_have_count(1)
        expect(page.locator('[data-chart="difficulty-beta"] svg')).to_have_count(1)

        # every chart drew data (series paths, bars or heatmap cells), not just its frame
        counts = page.eval_on_selector_all(
            "[data-chart]", "els => els.map(e => [e.dataset.chart, e.querySelectorAll('.series').length])")
        assert {name for name, _ in counts} >= {"difficulty-alpha", "difficulty-beta", "skill", "accept", "sandbox",
                                                 "entropy", "kl", "time", "eval", "throughput"}
        assert all(n > 0 for _, n in counts), counts
        # rates logged with a 95% interval draw it as a band: eval pass@1, and label accuracy beside difficulty
        assert page.locator('[data-chart="eval"] path.ci-band').count() >= 2  # gsm8k + math500 pass@1, per run
        expect(page.locator('[data-chart="skill"] path.ci-band[data-label*="label accuracy"]')).not_to_have_count(0)
        # both runs selected: one accepted-rate line per run; deselecting beta leaves one
        assert page.locator('[data-chart="accept"] path.series').count() == 2
        page.click('.chip[data-run="beta"]')
        expect(page.locator('[data-chart="accept"] path.series')).to_have_count(1)
        assert page.locator('[data-chart="difficulty-beta"]').count() == 0

        # task table: status filter, search, click-through to trajectories
        tasks = runs["alpha"]["tasks"]
        page.click('#f-status button[data-v="accepted"]')
        n_acc = sum(t.accepted for t in tasks)
        expect(page.locator("#page-info")).to_have_text(re.compile(f" of {n_acc}$"))
        assert set(page.locator("#task-table tbody .badge").all_text_contents()) == {"accepted"}
        page.fill("#f-q", "geometry")
        n_geo = sum(t.accepted and "geometry" in t.question for t in tasks)
        expect(page.locator("#page-info")).to_have_text(re.compile(f" of {n_geo}$"))
        assert all("geometry" in q for q in page.locator("#task-table tbody div.q").all_text_contents())
        page.fill("#f-q", "onerror")
        expect(page.locator("#page-info")).to_have_text(re.compile(" of 1$"))
        assert page.locator("#task-table tbody div.q").first.text_content() == XSS  # shown as text
        assert page.evaluate("window.__xss") is None and page.locator("#task-table img").count() == 0
        page.fill("#f-q", "")
        page.click('#f-status button[data-v="all"]')
        expect(page.locator("#page-info")).to_have_text(re.compile(f" of {len(tasks)}$"))
        task_id = tasks[-1].task_id  # newest first: on the first page
        page.click(f'#task-table tbody tr[data-task-id="{task_id}"]')
        n_traj = sum(t.task_id == task_id for t in runs["alpha"]["trajs"])
        assert n_traj > 0
        expect(page.locator("#detail .traj")).to_have_count(n_traj)

        # live: a new iteration written by the loop's store shows up without reload
        assert page.locator('[data-kpi="iteration"] .kpi-value').text_content() == "7"
        cfg = RunConfig.model_validate(runs["alpha"]["cfg"].model_dump())
        with MetricsStore(live / "metrics.sqlite") as store:
            scalars, new_tasks, trajs = synthetic_iteration(8, cfg, random.Random(8))
            store.log_tasks(8, new_tasks)
            store.log_trajectories(8, trajs)
            store.log_scalars(8, scalars)
        expect(page.locator('[data-kpi="iteration"] .kpi-value')).to_have_text("8", timeout=20000)
        expect(page.locator('#f-iteration option[value="8"]')).to_have_count(1)
        assert page.locator('[data-chart="difficulty-alpha"] rect.cell[data-iteration="8"]').count() > 0
        assert page.locator("#live").get_attribute("data-state") == "live"

        shot = live.parent / "dashboard.png"  # in the test's tmp dir, never in the checkout
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not errors, errors
    assert shot.read_bytes().startswith(b"\x89PNG")
    # no request left the machine: the page loads nothing from a CDN, fonts or analytics host
    assert requests and all(u.startswith(f"{url}/") or u.split(":", 1)[0] in ("data", "blob") for u in requests), \
        sorted({u for u in requests if not u.startswith(url)})
