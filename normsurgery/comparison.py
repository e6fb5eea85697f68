"""Compare a candidate model with its original on the same tokens: logit error, KL, top-1 agreement, perplexity.

`check` answers "is it the same function?". The defaults are the thresholds an exact rewrite must
meet in float32; a rewrite that changes the function on purpose sets looser ones.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgery.engine import forward
from normsurgery.engine.loading import OpenModel
from normsurgery.engine.resources import Runtime, peak_rss, resolve_runtime
from normsurgery.engine.text import check_sample
from normsurgery.errors import NormSurgeryError
from normsurgery.thresholds import DEFAULT_MAX_REL_LOGIT_DIFF, DEFAULT_NUM_SEQS, DEFAULT_SEQ_LEN, Thresholds


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
    first_differing_block: int | None = None  # rewrites that keep the residual basis: where the outputs part
    memory: dict[str, Any] | None = None  # where the models ran, the budget, and the peak memory used

    @property
    def passed(self) -> bool:
        """True when every threshold holds."""
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output and model cards."""
        return {**asdict(self), "passed": self.passed}


class LogitComparison:
    """Running comparison of two models' logits on the same token chunks, in float64 per sequence."""

    def __init__(self) -> None:
        self.max_diff = self.scale = self.max_kl = self.kl_sum = self.nll_o = self.nll_c = 0.0
        self.agree = self.positions = self.predicted = 0

    def add(self, original: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> None:
        """Fold one chunk [sequences, positions, vocab] into the running figures."""
        if original.shape != candidate.shape:
            raise NormSurgeryError(
                f"the two models have different vocabularies ({original.shape[-1]} vs {candidate.shape[-1]} tokens), "
                "so their logits cannot be compared. Check that CANDIDATE was made from ORIGINAL."
            )
        for lo, lc, seq in zip(original, candidate, tokens):
            lo, lc = lo.double(), lc.double()
            self.max_diff = max(self.max_diff, (lo - lc).abs().max().item())
            self.scale = max(self.scale, lo.abs().max().item())
            lpo, lpc = torch.log_softmax(lo, -1), torch.log_softmax(lc, -1)
            kl = (lpo.exp() * (lpo - lpc)).sum(-1).clamp_min(0.0)
            self.kl_sum += kl.sum().item()
            self.max_kl = max(self.max_kl, kl.max().item())
            self.agree += (lo.argmax(-1) == lc.argmax(-1)).sum().item()
            self.positions += lo.shape[0]
            target = seq[1:]
            self.nll_o -= lpo[:-1].gather(-1, target[:, None]).sum().item()
            self.nll_c -= lpc[:-1].gather(-1, target[:, None]).sum().item()
            self.predicted += int(target.numel())

    def metrics(self) -> dict[str, float]:
        """The figures a CheckReport carries."""
        return {
            "max_abs_logit_diff": self.max_diff,
            "logit_scale": self.scale,
            "rel_logit_diff": self.max_diff / self.scale if self.scale > 0 else math.inf,
            "mean_kl": self.kl_sum / self.positions,
            "max_kl": self.max_kl,
            "top1_agreement": self.agree / self.positions,
            "ppl_original": math.exp(self.nll_o / self.predicted),
            "ppl_candidate": math.exp(self.nll_c / self.predicted),
        }


class BlockComparison:
    """Largest difference of two models' block outputs, block by block, relative to the original's largest value."""

    def __init__(self, blocks: int) -> None:
        self.diff = [0.0] * blocks
        self.scale = [0.0] * blocks

    def add(self, original: list[torch.Tensor | None], candidate: list[torch.Tensor | None]) -> None:
        for i, (a, b) in enumerate(zip(original, candidate)):
            if a is None or b is None or a.shape != b.shape:
                continue
            self.diff[i] = max(self.diff[i], (a.double() - b.double()).abs().max().item())
            self.scale[i] = max(self.scale[i], a.abs().max().item())

    def relative(self) -> list[float]:
        """Per block: max |difference| / max |original|."""
        return [d / s if s > 0 else (0.0 if d == 0 else math.inf) for d, s in zip(self.diff, self.scale)]

    def first_differing(self, limit: float) -> int | None:
        """The first block whose relative difference exceeds `limit` (None: none does)."""
        return next((i for i, r in enumerate(self.relative()) if not r <= limit), None)


def report_from_metrics(metrics: dict[str, float], tokens: torch.Tensor, *, labels: tuple[str, str],
                        tokens_label: str, dtype: torch.dtype, thresholds: Thresholds) -> CheckReport:
    """The judged report for measured figures."""
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


@dataclass
class Run:
    """One model's run over the sample: the opened model, hooks to run it under (e.g. blocks skipped), and the
    blocks whose outputs are kept for a block-by-block comparison."""

    model: OpenModel
    context: Callable[[], AbstractContextManager[Any]] = nullcontext
    blocks: list[str] | None = None


@dataclass
class Pairing:
    """One comparison between two runs (indices into the run list), judged against `thresholds`."""

    original: int
    candidate: int
    labels: tuple[str, str]
    thresholds: Thresholds = Thresholds()
    by_block: bool = False  # the residual basis is the same: name the first block whose output differs


def compare_runs(runs: list[Run], pairings: list[Pairing], tokens: torch.Tensor, *, tokens_label: str,
                 dtype: torch.dtype, on_batch: Callable[[], None] | None = None) -> list[CheckReport]:
    """Run every model on the same token chunks (each chunk in one forward per model, so a streamed weight is
    read once per chunk) and judge each pairing; the chunk size follows the memory budget."""
    per = min(run.model.lazy.tokens_per_pass(int(tokens.shape[1])) for run in runs)
    logit_cmp = [LogitComparison() for _ in pairings]
    block_cmp = [BlockComparison(len(runs[p.original].blocks or [])) for p in pairings]
    for chunk in tokens.split(per):
        outs = []
        for run in runs:
            with run.context():
                outs.append(forward.logits(run.model.lazy, chunk, blocks=run.blocks))
            if on_batch:
                on_batch()
        for pairing, lc, bc in zip(pairings, logit_cmp, block_cmp):
            lc.add(outs[pairing.original][0], outs[pairing.candidate][0], chunk)
            if pairing.by_block:
                bc.add(outs[pairing.original][1], outs[pairing.candidate][1])
        del outs
    memory = {**runs[0].model.lazy.describe(), "peak_rss_bytes": peak_rss(), "chunks": math.ceil(len(tokens) / per),
              "streamed": any(r.model.lazy.streaming for r in runs)}
    reports = []
    for pairing, lc, bc in zip(pairings, logit_cmp, block_cmp):
        report = report_from_metrics(lc.metrics(), tokens, labels=pairing.labels, tokens_label=tokens_label,
                                     dtype=dtype, thresholds=pairing.thresholds)
        report.memory = memory
        if pairing.by_block and report.failures:
            limit = pairing.thresholds.max_rel_logit_diff or DEFAULT_MAX_REL_LOGIT_DIFF
            report.first_differing_block = bc.first_differing(limit)
            if report.first_differing_block is not None:
                rel = bc.relative()[report.first_differing_block]
                report.failures.append(f"the first block whose output differs is block {report.first_differing_block} "
                                       f"(0-based; max |difference| / max |output| = {rel:.3g})")
        reports.append(report)
    return reports


def run_check(
    original: Path,
    candidate: Path,
    *,
    thresholds: Thresholds = Thresholds(),
    text: str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_seqs: int = DEFAULT_NUM_SEQS,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    on_batch: Callable[[], None] | None = None,
    labels: tuple[str, str] | None = None,
    runtime: Runtime | None = None,
) -> CheckReport:
    """Run both models on the same tokens, in bounded memory on `runtime`, and judge the result."""
    runtime = runtime or resolve_runtime()
    options = dict(dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    with OpenModel(original, runtime, **options) as orig, OpenModel(candidate, runtime, **options) as cand:
        tokens, source = check_sample(original, orig.model, text=text, seq_len=seq_len, num_seqs=num_seqs)
        pairing = Pairing(0, 1, labels or (str(original), str(candidate)), thresholds)
        return compare_runs([Run(orig), Run(cand)], [pairing], tokens, tokens_label=source, dtype=dtype,
                            on_batch=on_batch)[0]
