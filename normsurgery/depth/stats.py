"""Per-block statistics of a model on calibration text: what `diagnose` shows and `prune` ranks blocks by.

Notation (research/pruning.md): h_l is the raw residual stream entering block l (h_0 the embeddings), h_{l+1}
its output; L blocks. Every statistic is taken on the raw residual, never on transformers' last
`hidden_states` entry (which has the final norm applied).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class NormGain:
    """Summary of one norm's effective gain (weight + offset) over its channels."""

    name: str
    layer: int | None  # block index, None for embedding/final norms
    role: str
    mean: float
    std: float
    min: float
    max: float


@dataclass
class LayerStats:
    """Everything measured about a model's depth, as plain lists indexed by block (0-based)."""

    model: str
    family: str
    num_layers: int
    norm_placement: str  # e.g. "Pre-LN (RMSNorm)", "sandwich (Pre + output norms)", "Post-LN"
    tokens: int  # calibration tokens measured
    sequences: int
    base_ce: float  # the model's cross-entropy on the calibration tokens, nats/token
    block_influence: list[float]  # BI_l = 1 - mean over tokens of cos(h_l, h_{l+1}), l = 0..L-1
    # angular distance arccos(cos(h_l, h_{l+n})) / pi of the span of n blocks starting at l:
    # angular_last[n - 1][l] at each sequence's last token, angular_all[n - 1][l] over all tokens; l = 0..L-n
    angular_last: list[list[float]]
    angular_all: list[list[float]]
    residual_rms: list[float]  # RMS over channels of h_l, mean over tokens, l = 0..L (L + 1 entries)
    relative_update: list[float]  # mean over tokens of ||h_{l+1} - h_l|| / ||h_l||, l = 0..L-1
    update_cosine: list[float]  # mean over tokens of cos(h_{l+1} - h_l, h_l), l = 0..L-1
    norm_gains: list[NormGain] = field(default_factory=list)
    skip_cost: list[float] | None = None  # CE with block l skipped minus base_ce (nats/token), when measured
    # blocks with separate attention and MLP sub-layers (else None): 1 - mean over tokens of the cosine between the
    # residual before and after block l's attention (h_l, m_l) and MLP (m_l, h_{l+1}), m_l the residual between them
    attention_influence: list[float] | None = None
    mlp_influence: list[float] | None = None
    # CE with block l's attention (MLP) output zeroed minus base_ce, when skip costs are measured
    attention_skip_cost: list[float] | None = None
    mlp_skip_cost: list[float] | None = None
    memory: dict[str, Any] | None = None  # where it ran, the budget, what stayed resident, the peak memory

    def angular(self, n: int, last_token: bool = True) -> list[float]:
        """Angular distance of every span of `n` blocks (index = first block of the span)."""
        return (self.angular_last if last_token else self.angular_all)[n - 1]

    def to_json(self) -> dict[str, Any]:
        """Plain data for --json and the report files."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerStats":
        """The inverse of `to_json`."""
        data = dict(data)
        data["norm_gains"] = [NormGain(**g) for g in data.get("norm_gains", [])]
        return cls(**data)

    def save(self, path: Path) -> None:
        """Write as JSON."""
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
