"""The trainable rewrites' schedule options (no torch: the CLI's and the recipe schema's defaults come from here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from normsurgery.errors import NormSurgeryError
from normsurgery.finetune.options import FinetuneOptions

ALPHA_INITS = ("linear", "scale", "least-squares", "best-mse")  # how a DyT/Derf swap starts (trainable/swap.py)
EXPORTS = ("stock", "native")  # how `--to none` writes its result (rewrite/inert.py, rewrite/remove.py)


@dataclass
class RemovalOptions:
    """The schedule: fine-tune steps between two freezes and after the last event, and how many units (reader
    paths) each freeze takes (more than one when the budget has fewer gaps than the model has paths)."""

    gap: int | None = None  # None (with heal): sized by the budget (budget.py)
    heal: int | None = None
    per_freeze: int = 1
    ramp: int | None = None  # steps over which a freeze or a release goes from live to fixed (1: at once; None: sized)
    calibration_batches: int = 1  # batches of CALIBRATION_SEQUENCES sequences per measurement
    aux_weight: float = 0.0  # weight of the spread of the final norm's per-token scale (Baroni et al.'s aux loss)
    # weight of every frozen path's per-token scale spread about its frozen scale: 10 held smollm2-135m's scales
    # through the freezes (weight 1 did not) and cost nothing on gpt2-shakespeare (README, "A penalty on every frozen path")
    spread_weight: float = 10.0
    alpha_init: str = "best-mse"  # DyT/Derf: how each swap's alpha and gain start (ALPHA_INITS)
    budget: str | None = None  # --budget: what sizes an unset gap and heal (DEFAULT_BUDGET when None)
    # --to none: "stock" (the family's own class, its norms inert), "native" (no norm, shipped modeling code), or
    # None: stock where the model allows it, else native with a note saying why
    export: str | None = None
    # learning rate, batch and sequence length None: sized by the model, the device and its context
    finetune: FinetuneOptions = field(default_factory=lambda: FinetuneOptions(lr=None, batch_size=None, seq_len=None))

    def validate(self) -> None:
        """One clear error for a schedule no run can follow."""
        self.finetune.validate()
        if (self.gap or 0) < 0 or (self.heal or 0) < 0 or self.aux_weight < 0 or self.spread_weight < 0:
            raise NormSurgeryError("--gap, --heal, --aux-weight and --spread-weight cannot be negative.")
        if self.alpha_init not in ALPHA_INITS:
            raise NormSurgeryError(f"--alpha-init must be linear, scale, least-squares or best-mse (got {self.alpha_init!r}).")
        if self.export is not None and self.export not in EXPORTS:
            raise NormSurgeryError(f"--export must be stock or native (got {self.export!r}).")
        if self.ramp is not None and self.ramp < 1:
            raise NormSurgeryError(f"--ramp must be at least 1 step (got {self.ramp}).")
        if self.budget is not None:
            from normsurgery.trainable.budget import parse_budget

            parse_budget(self.budget)
