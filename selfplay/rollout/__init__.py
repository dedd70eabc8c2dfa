"""Generation for both roles: the rollout worker (engine + proposer + executor)."""
