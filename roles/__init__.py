"""The three self-play roles as plain classes: Proposer (curriculum), Executor (tool use), Verifier (votes).

No Ray and no model of their own: they take an engine (selfplay.engines) and, for the executor, a sandbox.
Prompts are Jinja templates in roles/prompts/; rewards are pure functions (roles/proposer_reward.py,
roles/verifier.py). See docs/roles.md.
"""
from roles.executor import Executor, Rollout
from roles.proposer import ParsedTask, Proposal, Proposer, parse_task
from roles.proposer_reward import ProposerReward, score_batch
from roles.verifier import Verifier, Vote, executor_rewards

__all__ = [
    "Executor", "Rollout", "Proposer", "Proposal", "ParsedTask", "parse_task", "ProposerReward", "score_batch",
    "Verifier", "Vote", "executor_rewards",
]
