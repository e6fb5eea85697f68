"""Side-by-side results of a candidate and its original on the same documents, and the thresholds that gate CI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from normsurgery.evaluation import stats
from normsurgery.evaluation.runner import EvalRun

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


@dataclass
class Evaluation:
    """A model's lm-eval results, with its original's side by side when compared, and the failed thresholds."""

    candidate: EvalRun
    original: EvalRun | None
    rows: list[MetricRow]
    failures: list[str]
    thresholds: dict[str, float | None]

    def as_dict(self) -> dict[str, Any]:
        """The `--json` output."""
        return report(self.candidate, self.original, self.rows, self.failures, self.thresholds)

    def markdown(self) -> str:
        """The Markdown report (CI summaries, model cards)."""
        return markdown(self.candidate, self.original, self.rows, self.failures)


def check_fits(folder: Any, dtype: Any, max_memory: str | None) -> None:
    """lm-eval holds the whole model: refuse one whose weights exceed the memory budget before loading it."""
    from normsurgery.checkpoint.reader import CheckpointReader
    from normsurgery.checkpoint.writer import parse_size
    from normsurgery.engine.resources import available_ram, human_bytes
    from normsurgery.errors import NormSurgeryError

    budget = parse_size(max_memory) if max_memory else available_ram()
    with CheckpointReader.open(folder, trust_remote_code=True) as reader:  # headers only; pickle was refused
        need = sum(reader.info(n).numel for n in reader.names()) * dtype.itemsize
    if need > budget:
        raise NormSurgeryError(
            f"{folder} takes {human_bytes(need)} in {str(dtype).replace('torch.', '')}, more than the "
            f"{human_bytes(budget)} available (--max-memory or the free memory), and lm-eval holds the whole model. "
            "Evaluate it in bfloat16 (--dtype bfloat16), on a GPU (--device cuda), or with lm-eval's own multi-GPU "
            "backends; `normsurgery check` compares two models of any size in bounded memory."
        )


def evaluate_models(model: str, *, tasks: list[str] | None, compare: str | None, limit: int | None,
                    batch_size: int, device: str, dtype: Any, max_memory: str | None,
                    max_ppl_increase: float | None, max_acc_drop: float | None, trust_remote_code: bool,
                    on_task: Any = None) -> Evaluation:
    """Evaluate `model` (and `compare`, its original, on the same tasks) and apply the thresholds; `on_task(label,
    task)` is told as each task starts."""
    from normsurgery.errors import NormSurgeryError
    from normsurgery.evaluation.runner import DEFAULT_TASKS, evaluate_path, task_manager
    from normsurgery.source import validated_path

    if (max_ppl_increase is not None or max_acc_drop is not None) and compare is None:
        raise NormSurgeryError("--max-ppl-increase and --max-acc-drop compare against an original: add --compare ORIGINAL.")
    names = [t.strip() for t in tasks if t.strip()] if tasks else list(DEFAULT_TASKS)
    manager = task_manager(names)  # unknown or unreachable tasks fail here, before any model loads
    folder = validated_path(model)
    reference = validated_path(compare) if compare else None
    for path in (folder, reference):
        if path is not None:
            check_fits(path, dtype, max_memory)
    options = dict(limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                   trust_remote_code=trust_remote_code, manager=manager)

    def told(label: str) -> Any:
        return (lambda task: on_task(label, task)) if on_task else None

    candidate = evaluate_path(folder, names, label=model, on_task=told(model), **options)
    original = evaluate_path(reference, names, label=compare, on_task=told(compare), **options) if reference else None
    rows = rows_of(candidate, original)
    thresholds = {"max_ppl_increase": max_ppl_increase, "max_acc_drop": max_acc_drop}
    return Evaluation(candidate, original, rows, apply_thresholds(rows, max_ppl_increase, max_acc_drop), thresholds)
