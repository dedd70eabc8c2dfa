"""The curriculum dashboard: a read-only web page over one or more runs' metrics stores.

FastAPI serves a JSON API and the page's own static files (no CDN: clusters have no internet). The page
polls `/api/runs/{id}/version` and refetches only when a run's revision moves, so a live run's new
iterations appear without reload. Bound to 127.0.0.1 by default (reach it over an SSH port-forward);
requests must name localhost as their Host while bound to loopback, which stops DNS-rebinding pages from
reading the API; every response forbids framing and scripts from elsewhere (CSP).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from selfplay.dashboard import queries
from selfplay.dashboard.runs import Run, RunNotFound, RunRegistry

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(run_dirs: list[Path], allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app for these run dirs. `allowed_hosts`: Host headers accepted (default: loopback names only)."""
    registry = RunRegistry([Path(d) for d in run_dirs])
    app = FastAPI(title="selfplay dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.exception_handler(PermissionError)
    async def outside_run_dir(request: Request, exc: PermissionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(sqlite3.DatabaseError)
    async def store_unreadable(request: Request, exc: sqlite3.DatabaseError) -> JSONResponse:
        # e.g. a store created a moment ago, before its tables exist; the page retries on its next poll
        return JSONResponse({"detail": f"metrics store cannot be read yet: {exc}"}, status_code=503)

    def lookup(run_id: str) -> Run:
        try:
            return registry.get(run_id)
        except RunNotFound:
            raise HTTPException(404, f"no run {run_id!r}") from None

    @contextmanager
    def store(run: Run) -> Iterator[sqlite3.Connection | None]:
        conn = run.connect()
        try:
            yield conn
        finally:
            if conn is not None:
                conn.close()

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        out = []
        for run in registry.runs.values():
            try:
                out.append({"id": run.id, "dir_name": run.root.name, "config": run.config(), "state": run.state()})
            except PermissionError as e:  # one bad run dir must not hide the others
                out.append({"id": run.id, "dir_name": run.root.name, "error": str(e)})
        return out

    @app.get("/api/runs/{run_id}/version")
    def run_version(run_id: str) -> dict[str, Any]:
        run = lookup(run_id)
        with store(run) as conn:
            if conn is None:
                return {"revision": 0, "last_iteration": None, "updated_at": None, "state": run.state()}
            return {**queries.version(conn), "state": run.state()}

    @app.get("/api/runs/{run_id}/scalars")
    def run_scalars(run_id: str, prefix: str = Query("", max_length=200)) -> dict[str, Any]:
        with store(lookup(run_id)) as conn:
            return {} if conn is None else queries.scalars(conn, prefix)

    @app.get("/api/runs/{run_id}/difficulty")
    def run_difficulty(run_id: str, bins: int | None = Query(None, ge=2, le=100)) -> dict[str, Any]:
        run = lookup(run_id)
        cfg = run.config()
        with store(run) as conn:
            if conn is None:
                return {"bins": bins or 10, "band": [cfg["band_low"], cfg["band_high"]], "cells": [], "per_iteration": []}
            k = cfg["samples_per_task"] if isinstance(cfg["samples_per_task"], int) else None
            return queries.difficulty(conn, cfg["band_low"], cfg["band_high"], bins, k)

    @app.get("/api/runs/{run_id}/iterations")
    def run_iterations(run_id: str) -> list[int]:
        with store(lookup(run_id)) as conn:
            return [] if conn is None else queries.iterations(conn)

    @app.get("/api/runs/{run_id}/tasks")
    def run_tasks(
        run_id: str,
        iteration: int | None = Query(None, ge=0),
        status: str = Query("all", pattern="^(all|accepted|rejected)$"),
        q: str = Query("", max_length=200),
        sort: str = Query("newest", pattern="^(" + "|".join(queries.SORTS) + ")$"),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        with store(lookup(run_id)) as conn:
            if conn is None:
                return {"total": 0, "offset": offset, "limit": limit, "rows": []}
            return queries.tasks(conn, iteration, status, q, sort, limit, offset)

    @app.get("/api/runs/{run_id}/tasks/{task_id}")
    def run_task(run_id: str, task_id: str) -> dict[str, Any]:
        with store(lookup(run_id)) as conn:
            detail = None if conn is None else queries.task_detail(conn, task_id)
        if detail is None:
            raise HTTPException(404, f"no task {task_id!r} in run {run_id!r}")
        return detail

    @app.get("/api/runs/{run_id}/events")
    def run_events(run_id: str, limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
        return _json_safe(lookup(run_id).events(limit))

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.registry = registry
    return app


def _json_safe(value: Any) -> Any:
    """events.jsonl is written by other code; keep only what JSON can carry (no NaN/inf)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return queries.finite(value)
    return value


def port_in_use(host: str, port: int) -> str | None:
    """Why the dashboard cannot listen on host:port (in words, with a free port to use instead), or None.
    Checked before the URL is printed: uvicorn's own bind error comes after it, as a log line."""
    import socket

    def bind_error(p: int) -> OSError | None:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            try:
                s.bind((host, p))
            except OSError as e:
                return e
        return None

    err = bind_error(port)
    if err is None:
        return None
    free = next((p for p in range(port + 1, port + 50) if bind_error(p) is None), None)
    why = "is in use (another dashboard?)" if err.errno == errno.EADDRINUSE else f"cannot be used: {err.strerror}"
    return (f"port {port} on {host} {why}; " + (f"pass --port {free} (free)" if free else "pass another --port")
            + (" or open the dashboard already there" if err.errno == errno.EADDRINUSE else ""))


def serve(run_dirs: list[Path], host: str = "127.0.0.1", port: int = 8321) -> None:
    """Run the dashboard until interrupted. A non-loopback host is allowed but warned about: the API has
    no login, so anyone who can reach the port can read the runs (use an SSH port-forward instead)."""
    import uvicorn

    allowed = None
    if not is_loopback(host):
        log.warning("dashboard bound to %s: anyone who can reach port %d can read these runs", host, port)
        allowed = ["*"]
    uvicorn.run(create_app(run_dirs, allowed_hosts=allowed), host=host, port=port, log_level="warning")
