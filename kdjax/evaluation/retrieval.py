"""Retrieval by embedding: recall@k and mean average precision, queries against a gallery.

Each query ranks the gallery by cosine similarity of the embeddings; a gallery item is relevant when it has
the query's label. Recall@k (as metric-learning papers report it) is the fraction of queries with at least one
relevant item among their k nearest; AP is the mean of precision@r over the ranks r of the relevant items
(`sklearn.metrics.average_precision_score` of the similarities, which the tests compare against); mAP the
mean over queries. Ranking is by numpy's stable sort of -similarity (ties keep gallery order).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def relevance_by_rank(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                      gallery_labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(Q, G) bool: is the gallery item at rank r of query q's ranking relevant?"""
    g = normalize(gallery)
    out = []
    for start in range(0, len(queries), chunk):
        sims = normalize(queries[start:start + chunk]) @ g.T
        order = np.argsort(-sims, axis=1, kind="stable")
        out.append(gallery_labels[order] == query_labels[start:start + chunk, None])
    return np.concatenate(out)


def retrieval_report(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"recall@k" for each k, "map"} of embedding retrieval (see the module docstring). Queries without any
    relevant gallery item are left out of mAP (their AP is undefined)."""
    rel = relevance_by_rank(queries, np.asarray(query_labels), gallery, np.asarray(gallery_labels))
    out = {f"recall@{k}": float(np.mean(rel[:, :k].any(axis=1))) for k in ks}
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    num_rel = rel.sum(axis=1)
    has = num_rel > 0
    ap = (rel * hits / ranks).sum(axis=1)[has] / num_rel[has]
    out["map"] = float(ap.mean())
    return out
