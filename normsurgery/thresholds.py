"""The check's pass/fail limits and default sample, importable without torch (the CLI's options use them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_REL_LOGIT_DIFF = 2e-5
DEFAULT_MIN_TOP1 = 1.0
DEFAULT_MAX_KL = 1e-6
# The sample every check runs by default: 4 x 32 tokens. tests/test_check_sensitivity.py shows it still catches
# one changed element in every kind of tensor the sample reaches (a change in an embedding row of a token, or a
# position, that the sample never uses cannot show in any forward).
DEFAULT_NUM_SEQS = 4
DEFAULT_SEQ_LEN = 32


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits; None disables a limit."""

    max_rel_logit_diff: float | None = DEFAULT_MAX_REL_LOGIT_DIFF
    min_top1: float | None = DEFAULT_MIN_TOP1
    max_kl: float | None = DEFAULT_MAX_KL


