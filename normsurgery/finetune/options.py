"""What a fine-tune does, as plain options (no torch: the CLI's and the recipe schema's defaults come from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from normsurgery.errors import NormSurgeryError

Loss = Literal["kl", "lm", "kl+lm"]
MixedPrecision = Literal["auto", "no", "bf16"]
AUTO_SEQ_LEN = 1024  # longest sequence an unset --seq-len becomes (the model's context, at most this)
TOKENS_PER_STEP = 1024  # tokens per step an unset --batch-size keeps


@dataclass
class FinetuneOptions:
    """What a fine-tune does; every field is a CLI/recipe option of the commands that heal."""

    steps: int = 100
    lr: float | None = 1e-3  # None: sized by the model (trainable/budget.py)
    batch_size: int | None = 8  # None: about `tokens_per_step` tokens per step (set by fit_context)
    seq_len: int | None = 128  # None: the model's context, at most AUTO_SEQ_LEN (set by fit_context)
    text: str | None = None  # .txt / .jsonl file, hub dataset name, or None: the Shakespeare training split
    seed: int = 0
    loss: Loss = "kl"
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    checkpoint_dir: Path | None = None  # resume from it when it holds a state; save to it every checkpoint_every
    checkpoint_every: int = 0
    device: str = "auto"  # --device: auto (accelerate's choice: the GPUs when there are any), cpu, cuda, cuda:N
    tokens_per_step: int = TOKENS_PER_STEP  # what an unset batch_size becomes (sized by the device, budget.py)
    mixed_precision: MixedPrecision = "auto"  # --mixed-precision: bf16 autocast on a GPU that has it (see bf16_autocast)

    def fit_context(self, config: Any) -> None:
        """Fit the sequences to the model's context (the report shows the values used): an unset `seq_len` becomes
        the whole context, at most AUTO_SEQ_LEN, since a rewrite fine-tuned on short sequences is left untrained at
        the later positions (measured: DyT on gpt2-shakespeare healed at 128 of its 256 positions, +0.0005 nats
        before position 128 and +0.29 after); a longer one is shortened to the context; an unset `batch_size`
        keeps about `tokens_per_step` tokens per step."""
        from normsurgery.engine.text import context_length

        limit = context_length(config)
        if self.seq_len is None:
            self.seq_len = min(limit or AUTO_SEQ_LEN, AUTO_SEQ_LEN)
        elif limit is not None and self.seq_len > limit:
            self.seq_len = limit
        if self.batch_size is None:
            self.batch_size = max(1, self.tokens_per_step // self.seq_len)

    def validate(self) -> None:
        """One clear error for an option no fine-tune can run with (here or under this launch's FSDP)."""
        from normsurgery.finetune.sharding import fsdp_wanted

        for name in ("steps", "batch_size", "seq_len"):  # None: set from the model by fit_context
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise NormSurgeryError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):  # None: sized by the command
            raise NormSurgeryError(f"--lr must be a positive number (got {self.lr}).")
        if self.loss not in ("kl", "lm", "kl+lm"):
            raise NormSurgeryError(f"--loss must be kl, lm or kl+lm (got {self.loss!r}).")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise NormSurgeryError(f"--mixed-precision must be auto, no or bf16 (got {self.mixed_precision!r}).")
        if self.warmup < 0 or self.checkpoint_every < 0 or self.grad_clip < 0:
            raise NormSurgeryError("--warmup, --checkpoint-every and --grad-clip cannot be negative.")
        if self.checkpoint_dir is not None and fsdp_wanted():
            raise NormSurgeryError(
                "--checkpoint-dir is not supported under FSDP: the sharded model and optimizer state would need a "
                "distributed checkpoint, which normsurgery does not write or read yet. Run without --checkpoint-dir "
                "(the fine-tune then starts afresh each time), or with data parallelism (no FSDP in `accelerate "
                "config`), which saves and resumes; nothing was written.")
