"""`selfplay eval` and in-training evaluation: benchmarks, pass@1 / maj@k, tool use."""
