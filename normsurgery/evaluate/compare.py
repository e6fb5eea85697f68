"""Side-by-side results of a candidate and its original on the same documents, and the thresholds that gate CI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from normsurgery.evaluate import stats
from normsurgery.evaluate.runner import EvalRun

ACCURACIES = {"acc", "acc_norm"}


@dataclass
class MetricRow:
    """One metric of one task: its value per model, the difference and the difference's (paired) stderr."""

    task: str
    metric: str
    original: float | None
    candidate: float
    delta: float | None
    delta_stderr: float | None
    stderr: float | None  # of the candidate's value
    lower_is_better: bool
    failure: str | None = None


def rows_of(candidate: EvalRun, original: EvalRun | None = None) -> list[MetricRow]:
    """Every metric of every task, paired with the original's when there is one."""
    before = {t.task: t for t in original.tasks} if original else {}
    rows = []
    for task in candidate.tasks:
        ref = before.get(task.task)
        for metric, value in task.metrics.items():
            old = ref.metrics.get(metric) if ref else None
            rows.append(MetricRow(
                task=task.task, metric=metric, original=old, candidate=value,
                delta=None if old is None else value - old,
                delta_stderr=stats.paired_delta_stderr(metric, ref.per_doc[metric], task.per_doc[metric]) if ref else None,
                stderr=task.stderr.get(metric), lower_is_better=metric in stats.LOWER_IS_BETTER,
            ))
    return rows


def apply_thresholds(rows: list[MetricRow], max_ppl_increase: float | None, max_acc_drop: float | None) -> list[str]:
    """Mark and list the rows that break a threshold: a perplexity up by more than `max_ppl_increase` (relative),
    an accuracy down by more than `max_acc_drop` (absolute)."""
    failures = []
    for row in rows:
        if row.original is None:
            continue
        if max_ppl_increase is not None and row.metric in stats.PERPLEXITIES:
            increase = row.candidate / row.original - 1
            if increase > max_ppl_increase:
                row.failure = f"{row.task} {row.metric} rose {increase:+.2%} (limit {max_ppl_increase:+.2%})"
        if max_acc_drop is not None and row.metric in ACCURACIES:
            drop = row.original - row.candidate
            if drop > max_acc_drop:
                row.failure = f"{row.task} {row.metric} fell {drop:.4f} (limit {max_acc_drop:.4f})"
        if row.failure:
            failures.append(row.failure)
    return failures


def report(candidate: EvalRun, original: EvalRun | None, rows: list[MetricRow], failures: list[str],
           thresholds: dict[str, float | None]) -> dict[str, Any]:
    """The whole comparison as plain data (the `--json` output)."""
    return {
        "candidate": candidate.as_dict(),
        "original": original.as_dict() if original else None,
        "metrics": [asdict(r) for r in rows],
        "thresholds": thresholds,
        "failures": failures,
        "passed": not failures,
    }


def markdown(candidate: EvalRun, original: EvalRun | None, rows: list[MetricRow], failures: list[str]) -> str:
    """The comparison as a Markdown table, for CI step summaries and model cards."""
    title = f"**normsurgery eval**: `{candidate.model}`" + (f" vs `{original.model}`" if original else "")
    if original:
        title += " — " + ("PASSED" if not failures else "FAILED")
    head = "| task | metric | original | candidate | delta ± stderr |" if original else "| task | metric | value ± stderr |"
    lines = [title, "", head, "|---|---|---|---|---|" if original else "|---|---|---|"]
    for r in rows:
        value = _pm(r.candidate, r.stderr)
        if original:
            lines.append(f"| {r.task} | {r.metric} | {_num(r.original)} | {value} | {_pm(r.delta, r.delta_stderr, sign=True)} |")
        else:
            lines.append(f"| {r.task} | {r.metric} | {value} |")
    speed = ", ".join(f"{t.task} {t.seconds:.1f} s ({t.tokens_per_second:.0f} tok/s)" for t in candidate.tasks)
    lines += ["", f"{candidate.dtype} on {candidate.device}, batch {candidate.batch_size}; {speed}"]
    lines += [f"- failed: {f}" for f in failures]
    return "\n".join(lines) + "\n"


def _num(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return format(x, "+.4g" if sign else ".4g")


def _pm(x: float | None, err: float | None, sign: bool = False) -> str:
    return _num(x, sign) + ("" if err is None or x is None else f" ± {err:.2g}")
