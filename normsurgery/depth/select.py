"""Which blocks (or blocks' sub-layers) to remove: candidates proposed by a metric, then (by default) re-measured
by calibration loss.

Cosine metrics are weak proxies for what removal costs, so the top candidates are rerun with their blocks
skipped and the one with the lowest calibration cross-entropy is kept (SLEB's remedy, applied to few sets).
"""

from __future__ import annotations

from dataclasses import dataclass

from normsurgery.errors import NormSurgeryError
from normsurgery.depth.stats import LayerStats

METHODS = ("auto", "bi", "angular", "angular-all", "skip-cost", "last")


@dataclass
class Candidate:
    """A set of blocks to remove, the metric that proposed it with its score, and its calibration loss."""

    blocks: tuple[int, ...]
    method: str
    score: float
    loss: float | None = None


def _individual(values: list[float], allowed: list[int], k: int, method: str, top: int) -> list[Candidate]:
    """The k lowest-scoring blocks, then the sets that swap the k-th for the next ones in rank."""
    ranked = sorted(allowed, key=lambda i: (values[i], i))
    sets = [ranked[:k]] + [ranked[: k - 1] + [extra] for extra in ranked[k:k + top - 1]]
    return [Candidate(tuple(sorted(s)), method, sum(values[i] for i in s)) for s in sets]


def _spans(distances: list[float], allowed: list[int], k: int, method: str, top: int) -> list[Candidate]:
    """The `top` contiguous spans of k allowed blocks with the smallest angular distance across them."""
    starts = [l for l in range(len(distances)) if all(b in allowed for b in range(l, l + k))]
    ranked = sorted(starts, key=lambda l: (distances[l], l))[:top]
    return [Candidate(tuple(range(l, l + k)), method, distances[l]) for l in ranked]


def candidates(stats: LayerStats, k: int, method: str, *, keep_first: int = 1, keep_last: int = 1,
               top: int = 3, what: str = "block") -> list[Candidate]:
    """Up to `top` candidate sets of k blocks by `method` (auto: the best of every measured metric, then runners-up),
    never touching the first `keep_first` or last `keep_last` blocks. `what`: remove whole blocks, or only their
    attention or MLP sub-layers (ranked by the sub-layers' own influence and skip costs)."""
    L = stats.num_layers
    allowed = list(range(keep_first, L - keep_last))
    noun = "blocks" if what == "block" else f"{what} sub-layers"
    if k < 1:
        raise NormSurgeryError(f"--remove must be at least 1 (got {k}).")
    if k >= L:
        raise NormSurgeryError(f"cannot remove {k} of {L} {noun}: at least one must stay.")
    if k > len(allowed):
        raise NormSurgeryError(f"only {len(allowed)} blocks are allowed by --keep-first {keep_first} and --keep-last "
                               f"{keep_last}; cannot remove {k} {noun}. Lower the guards or --remove.")
    if method not in METHODS:
        raise NormSurgeryError(f"--by must be one of {', '.join(METHODS)} (got {method!r}).")
    if what != "block":
        return _sublayer_candidates(stats, k, method, allowed, top, what)
    if method == "skip-cost" and stats.skip_cost is None:
        raise NormSurgeryError("--by skip-cost needs the skip costs measured (--skip-cost).")
    proposals = {
        "bi": lambda: _individual(stats.block_influence, allowed, k, "bi", top),
        "angular": lambda: _spans(stats.angular(k, last_token=True), allowed, k, "angular", top),
        "angular-all": lambda: _spans(stats.angular(k, last_token=False), allowed, k, "angular-all", top),
        "skip-cost": lambda: _individual(stats.skip_cost or [], allowed, k, "skip-cost", top),
        "last": lambda: [Candidate(tuple(allowed[-k:]), "last", 0.0)],
    }
    if method != "auto":
        return proposals[method]()
    names = ["bi", "angular", "angular-all"] + (["skip-cost"] if stats.skip_cost is not None else [])
    return _merged([proposals[n]() for n in names], top)


def _sublayer_candidates(stats: LayerStats, k: int, method: str, allowed: list[int], top: int,
                         what: str) -> list[Candidate]:
    """Candidate sets of k blocks whose `what` sub-layer goes: by its influence (bi), its skip cost, or the last."""
    influence: list[float] | None = getattr(stats, f"{what}_influence")
    skip_cost: list[float] | None = getattr(stats, f"{what}_skip_cost")
    if influence is None:
        raise NormSurgeryError(f"these statistics have no per-sub-layer measurements (a {stats.family} model of "
                               "this config has no separate attention and MLP sub-layers); use --what block.")
    if method in ("angular", "angular-all"):
        raise NormSurgeryError(f"--by {method} measures spans of whole blocks; with --what {what} choose by bi, "
                               "skip-cost, last or auto.")
    if method == "skip-cost" and skip_cost is None:
        raise NormSurgeryError("--by skip-cost needs the skip costs measured (--skip-cost).")
    proposals = {
        "bi": lambda: _individual(influence, allowed, k, "bi", top),
        "skip-cost": lambda: _individual(skip_cost or [], allowed, k, "skip-cost", top),
        "last": lambda: [Candidate(tuple(allowed[-k:]), "last", 0.0)],
    }
    if method != "auto":
        return proposals[method]()
    return _merged([proposals[n]() for n in ["bi"] + (["skip-cost"] if skip_cost is not None else [])], top)


def _merged(lists: list[list[Candidate]], top: int) -> list[Candidate]:
    """Up to `top` distinct candidates, taking each list's best first, then each one's runner-up, and so on."""
    chosen: list[Candidate] = []
    for rank in range(top):
        for found in lists:
            if rank < len(found) and all(found[rank].blocks != c.blocks for c in chosen) and len(chosen) < top:
                chosen.append(found[rank])
    return chosen
