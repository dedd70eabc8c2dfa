"""Repetition penalty for the proposer: cluster a batch of tasks by BLEU distance, penalise big clusters.

Agent0 (arXiv 2511.16043, Eq. 4) and R-Zero (arXiv 2508.05004) use d_ij = 1 - BLEU(x_i, x_j), average-linkage
agglomerative clustering that merges while the linkage distance is below tau_BLEU = 0.5 (sklearn's
`distance_threshold` semantics), and R_rep(x_i) = lambda_rep * |C_k| / B for the cluster C_k holding x_i.
Without it proposers collapse onto near-duplicate questions (R-Zero issue #8).

Differences from their code (which uses nltk's whitespace-token BLEU with smoothing method1 and only the
(i, j) direction): we use sacrebleu's sentence BLEU (13a tokenisation, exp smoothing, effective order) and
average both directions, so the matrix is symmetric and the result does not depend on batch order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sacrebleu.metrics import BLEU

_BLEU = BLEU(effective_order=True)


def bleu_similarity(a: str, b: str) -> float:
    """Symmetric sentence BLEU in [0, 1]: the mean of BLEU(a | ref b) and BLEU(b | ref a)."""
    if a == b:
        return 1.0
    if not a.strip() or not b.strip():
        return 0.0
    return (_BLEU.sentence_score(a, [b]).score + _BLEU.sentence_score(b, [a]).score) / 200.0


def bleu_distance_matrix(texts: Sequence[str]) -> np.ndarray:
    n = len(texts)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = 1.0 - bleu_similarity(texts[i], texts[j])
    return dist


def average_linkage(dist: np.ndarray, threshold: float) -> list[int]:
    """Cluster labels (0..m-1, numbered by first member) from agglomerative average-linkage clustering that
    merges the closest pair of clusters while their mean pairwise distance is < threshold."""
    d = np.array(dist, dtype=float)
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"distance matrix must be square, got shape {d.shape}")
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    np.fill_diagonal(d, np.inf)
    while len(members) > 1:
        i, j = divmod(int(np.argmin(d)), n)
        if not d[i, j] < threshold:
            break
        ni, nj = len(members[i]), len(members[j])
        # Lance-Williams update for average linkage: d(k, i+j) = (ni d(k,i) + nj d(k,j)) / (ni + nj)
        merged = (ni * d[i] + nj * d[j]) / (ni + nj)
        d[i, :] = d[:, i] = merged
        d[i, i] = np.inf
        d[j, :] = d[:, j] = np.inf
        members[i] += members.pop(j)
    labels = [0] * n
    for label, group in enumerate(sorted(members.values(), key=min)):
        for m in group:
            labels[m] = label
    return labels


def repetition_penalties(texts: Sequence[str], lambda_rep: float = 1.0, tau: float = 0.5) -> tuple[list[float], list[int]]:
    """(R_rep per text, cluster label per text) for one batch; B = len(texts)."""
    if not texts:
        return [], []
    labels = average_linkage(bleu_distance_matrix(texts), tau)
    sizes = np.bincount(labels)
    return [float(lambda_rep * sizes[c] / len(texts)) for c in labels], labels
