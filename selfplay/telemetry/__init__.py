"""Metrics: the SQLite store the dashboard reads, and exporters (console, TensorBoard, W&B, MLflow)."""
