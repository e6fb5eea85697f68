"""Aggregates and bootstrap standard errors of lm-eval metrics from their per-document values.

lm-eval gives no stderr for the rolling perplexities, and none for a difference between two models on the
same documents; one bootstrap over documents (seeded, so reports are reproducible) gives both, the latter
paired, which is far tighter than the two stderrs combined.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

RESAMPLES = 1000
WEIGHTED = {"word_perplexity", "byte_perplexity", "bits_per_byte"}  # per document: (loglikelihood, words or bytes)
PERPLEXITIES = {"word_perplexity", "byte_perplexity", "perplexity"}
LOWER_IS_BETTER = PERPLEXITIES | {"bits_per_byte"}


def aggregate(metric: str, values: Sequence[Any]) -> float:
    """A metric over documents, aggregated as lm-eval does."""
    if metric in WEIGHTED:
        ll, n = sum(v[0] for v in values), sum(v[1] for v in values)
        return -ll / n / math.log(2) if metric == "bits_per_byte" else math.exp(-ll / n)
    if metric == "perplexity":  # per document: the target's loglikelihood
        return math.exp(-sum(values) / len(values))
    return sum(values) / len(values)


def _resamples(n: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(RESAMPLES)]


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def stderr(metric: str, values: Sequence[Any]) -> float | None:
    """Bootstrap standard error of the aggregate over documents."""
    if len(values) < 2:
        return None
    return _std([aggregate(metric, [values[i] for i in idx]) for idx in _resamples(len(values))])


def paired_delta_stderr(metric: str, original: Sequence[Any], candidate: Sequence[Any]) -> float | None:
    """Bootstrap standard error of candidate - original, resampling the same documents for both."""
    if len(original) != len(candidate) or len(original) < 2:
        return None
    return _std([
        aggregate(metric, [candidate[i] for i in idx]) - aggregate(metric, [original[i] for i in idx])
        for idx in _resamples(len(original))
    ])
