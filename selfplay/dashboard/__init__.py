"""The curriculum dashboard: `create_app` / `serve` in app.py, read-only views of run directories."""
