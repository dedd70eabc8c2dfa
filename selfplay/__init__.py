"""selfplay: zero-data self-play RL for tool-using LLM agents."""
import os

# Spinning OpenMP threads make torch ~13x slower whenever two processes share a CPU core (an engine beside
# a learner, a test beside a Ray actor): docs/bench-rollout.md. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
