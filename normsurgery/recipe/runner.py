"""Run a validated recipe: each step calls the same functions as its command, never the CLI.

Steps that make a model (fold, convert, prune, heal) stream the current model into a new folder inside a
working folder beside the output (`.OUT.recipe-work`); check and eval read the current model in place; export
renames the last model into OUT (no copy) and records the recipe's hash, the tool's version and every step's
figures in its model card and normsurgery.json. The working folder is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import normsurgery
from normsurgery.errors import CheckFailed, NormSurgeryError
from normsurgery.recipe.schema import CheckStep, ConvertStep, EvalStep, HealStep, PruneStep, Recipe

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class StepResult:
    """One step's outcome: passed, failed (a check or threshold) or skipped (an earlier step failed)."""

    index: int
    kind: str
    label: str
    status: str = "skipped"
    seconds: float = 0.0
    peak_rss_gb: float | None = None
    reads: str = ""
    writes: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: str | None = None


def _peak_rss_reset() -> None:
    """Reset the kernel's record of this process's peak RSS (Linux), so each step reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gb() -> float | None:
    """This process's peak RSS since the last reset, in GB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def describe(step: Any) -> str:
    """A short label for a step, e.g. 'convert --to crmsnorm' or 'check against original'."""
    if isinstance(step, ConvertStep):
        return f"convert --to {step.to}"
    if isinstance(step, PruneStep):
        which = "" if step.what == "block" else f"{step.what} of "
        if step.layers:
            return f"prune {which}layers {','.join(map(str, step.layers))}"
        return f"prune {which}{step.remove} blocks by {step.by}"
    if isinstance(step, HealStep):
        return f"heal {step.steps} steps"
    if isinstance(step, CheckStep):
        return f"check against {step.against}"
    if isinstance(step, EvalStep):
        return f"eval {','.join(step.tasks) if step.tasks else 'default tasks'}" + (f" against {step.against}" if step.against else "")
    return step.kind


def plan_lines(recipe: Recipe, output: Path) -> list[StepResult]:
    """What each step will read and write, without touching anything (for --dry-run and the report)."""
    results, current, models = [], recipe.model, {"original": recipe.model}
    work = work_folder(output)
    for i, step in enumerate(recipe.steps):
        r = StepResult(index=i + 1, kind=step.kind, label=describe(step), reads=current)
        if step.kind in ("fold", "convert", "prune", "heal"):
            current = str(work / f"{i + 1:02d}-{step.kind}")
            r.writes = current
            if step.id:
                models[step.id] = current
        elif step.kind in ("check", "eval") and getattr(step, "against", None):
            r.reads = f"{current} and {models[step.against]}"
        elif step.kind == "export":
            r.writes = str(output)
        results.append(r)
    return results


def work_folder(output: Path) -> Path:
    """Where intermediate models live: hidden, beside the output, on the same disk (so export is a rename)."""
    return output.parent / f".{output.name}.recipe-work"


class RecipeRun:
    """Executes a recipe step by step and collects a StepResult for each."""

    def __init__(self, recipe: Recipe, recipe_hash: str, output: Path, *, force: bool, trust_remote_code: bool,
                 on_step: Callable[[StepResult], None] | None = None, device: str = "auto",
                 max_memory: str | None = None) -> None:
        self.recipe, self.hash, self.output, self.force = recipe, recipe_hash, output, force
        self.trust_remote_code = trust_remote_code
        self.device, self.max_memory = device, max_memory  # where every step that runs a model runs
        self.on_step = on_step
        self.results = plan_lines(recipe, output)
        self.models: dict[str, str] = {"original": recipe.model}

    def run(self) -> list[StepResult]:
        """Run every step in order; the first failure or error skips the rest. Never leaves the work folder."""
        from normsurgery.checkpoint.writer import make_parent
        from normsurgery.engine.resources import resolve_runtime
        from normsurgery.source import validated_path

        self.runtime = resolve_runtime(self.device, self.max_memory)
        if self.output.exists() and not self.force:
            raise NormSurgeryError(f"{self.output} already exists; choose another output or pass --force to replace it.")
        make_parent(self.output)
        self.original = validated_path(self.recipe.model)
        self.current = self.original
        work = work_folder(self.output)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            for step, result in zip(self.recipe.steps, self.results):
                if self.on_step:
                    self.on_step(result)
                _peak_rss_reset()
                start = time.perf_counter()
                try:
                    getattr(self, f"_{step.kind}")(step, result)
                    result.status = "failed" if result.failures else "passed"
                except CheckFailed as err:
                    result.status, result.failures = "failed", result.failures or [str(err)]
                except NormSurgeryError as err:
                    result.status, result.error = "error", str(err)
                result.seconds = time.perf_counter() - start
                result.peak_rss_gb = _peak_rss_gb()
                if result.status != "passed":
                    break
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if self.on_step:
            self.on_step(StepResult(0, "done", "done"))
        return self.results

    # ------------------------------------------------------------------ one method per step kind

    def _next(self, result: StepResult) -> Path:
        return Path(result.writes)

    def _dtype(self) -> Any:
        import torch

        return getattr(torch, self.recipe.dtype) if self.recipe.dtype else None

    def _exact(self, plan_for: Callable[[Any], Any], step: Any, result: StepResult) -> None:
        from normsurgery.thresholds import Thresholds
        from normsurgery.source import open_model
        from normsurgery.surgery import apply_plan

        source = open_model(str(self.current), trust_remote_code=self.trust_remote_code, scan_finite=False,
                            shapes="background")
        try:
            out = self._next(result)
            applied = apply_plan(source, plan_for(source), out, dtype=self._dtype(),
                                 thresholds=Thresholds(max_rel_logit_diff=step.max_logit_diff), runtime=self.runtime)
        finally:
            source.close()
        result.figures = ({k: getattr(applied.check, k) for k in ("rel_logit_diff", "mean_kl", "top1_agreement")}
                          if applied.check else {})
        result.figures["folded"] = len(applied.folded)
        self._advance(step, out)

    def _advance(self, step: Any, out: Path) -> None:
        self.current = out
        if step.id:
            self.models[step.id] = str(out)

    def _fold(self, step: Any, result: StepResult) -> None:
        from normsurgery.rewrite.fold import plan_fold

        self._exact(lambda s: plan_fold(s.arch), step, result)

    def _convert(self, step: ConvertStep, result: StepResult) -> None:
        if step.to in ("rmsnorm", "crmsnorm"):
            from normsurgery.rewrite.center import plan_center_swap

            self._exact(lambda s: plan_center_swap(s.arch, step.to), step, result)
            return
        from normsurgery.trainable.pipeline import removal_options, run_remove, run_swap

        options = removal_options(gap=step.gap, heal=step.heal, aux_weight=step.aux_weight,
                                  spread_weight=step.spread_weight, lr=step.lr,
                                  batch_size=step.batch_size, seq_len=step.seq_len, text=step.text, seed=step.seed,
                                  loss=step.loss, gradient_checkpointing=False, checkpoint_dir=None, checkpoint_every=0,
                                  device=self.device, budget=step.budget, ramp=step.ramp,
                                  mixed_precision=step.mixed_precision, alpha_init=step.alpha_init,
                                  export=step.export)
        out = self._next(result)
        common = dict(force=True, removal=options, trust_remote_code=self.trust_remote_code, runtime=self.runtime)
        report = (run_remove(str(self.current), out, **common) if step.to == "none"
                  else run_swap(str(self.current), step.to, out, **common))
        result.figures = {k: report[k] for k in ("heldout_ce_before", "heldout_ce_after", "heldout_ce_change")}
        self._advance(step, out)

    def _prune(self, step: PruneStep, result: StepResult) -> None:
        from normsurgery.depth.pipeline import PruneSelection, run_prune

        selection = PruneSelection(what=step.what, export=step.export, remove=step.remove, layers=step.layers, by=step.by,
                                   keep_first=step.keep_first, keep_last=step.keep_last, remeasure=step.remeasure,
                                   samples=step.samples, seq_len=step.seq_len, text=step.text)
        out = self._next(result)
        report = run_prune(str(self.current), out, selection, force=True,
                           trust_remote_code=self.trust_remote_code, runtime=self.runtime)
        change = report.get("change") or {}
        removed = "removed_blocks" if step.what == "block" else f"removed_{step.what}_of_blocks"
        result.figures = {removed: report["selection"]["blocks"], "kept_blocks": report["kept_blocks"],
                          "ppl_before": change.get("ppl_original"), "ppl_after": change.get("ppl_candidate")}
        self._advance(step, out)

    def _heal(self, step: HealStep, result: StepResult) -> None:
        from normsurgery.finetune.engine import FinetuneOptions
        from normsurgery.finetune.heal import heal_folder

        options = FinetuneOptions(steps=step.steps, lr=step.lr, batch_size=step.batch_size, seq_len=step.seq_len,
                                  text=step.text, seed=step.seed, device=self.device,
                                  mixed_precision=step.mixed_precision)
        out = self._next(result)
        summary = heal_folder(Path(self.current), Path(self.original), out, options, operation="heal", force=True,
                              max_shard_size=5_000_000_000, runtime=self.runtime)
        result.figures = {k: summary[k] for k in ("heldout_ce_before", "heldout_ce_unhealed", "heldout_ce_after")}
        self._advance(step, out)

    def _check(self, step: CheckStep, result: StepResult) -> None:
        from normsurgery.comparison import run_check
        from normsurgery.thresholds import Thresholds

        against = Path(self.models[step.against]) if step.against != "original" else Path(self.original)
        report = run_check(against, Path(self.current), trust_remote_code=self.trust_remote_code,
                           thresholds=Thresholds(max_rel_logit_diff=step.max_logit_diff, min_top1=step.min_top1,
                                                 max_kl=step.max_kl),
                           seq_len=step.seq_len, num_seqs=step.num_seqs, labels=(step.against, "current"),
                           runtime=self.runtime)
        result.figures = {k: getattr(report, k) for k in ("rel_logit_diff", "mean_kl", "top1_agreement",
                                                         "ppl_original", "ppl_candidate")}
        result.failures = list(report.failures)

    def _eval(self, step: EvalStep, result: StepResult) -> None:
        from normsurgery.evaluation import compare as cmp
        from normsurgery.evaluation.runner import DEFAULT_TASKS, evaluate_path, task_manager

        names = step.tasks or list(DEFAULT_TASKS)
        manager = task_manager(names)
        options = dict(limit=step.limit, batch_size=step.batch_size, trust_remote_code=self.trust_remote_code,
                       manager=manager)
        candidate = evaluate_path(Path(self.current), names, label="current", **options)
        original = None
        if step.against:
            against = Path(self.original) if step.against == "original" else Path(self.models[step.against])
            original = evaluate_path(against, names, label=step.against, **options)
        rows = cmp.rows_of(candidate, original)
        result.failures = cmp.apply_thresholds(rows, step.max_ppl_increase, step.max_acc_drop)
        result.figures = {f"{r.task} {r.metric}": ({"value": r.candidate, "delta": r.delta} if original else r.candidate)
                          for r in rows}

    def _export(self, step: Any, result: StepResult) -> None:
        if Path(self.current) == Path(self.original):
            raise NormSurgeryError("the recipe has no step that makes a model, so there is nothing to export.")
        _record(Path(self.current), self)
        if self.output.exists():
            shutil.rmtree(self.output)
        Path(self.current).rename(self.output)
        self.current = self.output
        result.figures = {"output": str(self.output)}


def _record(folder: Path, run: RecipeRun) -> None:
    """Add the recipe (hash, version, every step's figures) to the folder's model card and normsurgery.json."""
    steps = [{"step": r.index, "label": r.label, "status": r.status, "seconds": round(r.seconds, 2), **r.figures}
             for r in run.results if r.kind != "export"]
    record = {"recipe_sha256": run.hash, "normsurgery_version": normsurgery.__version__, "model": run.recipe.model,
              "steps": steps}
    meta = folder / "normsurgery.json"
    data = json.loads(meta.read_text()) if meta.exists() else {}
    data["recipe"] = record
    meta.write_text(json.dumps(data, indent=2, default=str) + "\n")
    card = folder / "README.md"
    lines = ["", "## Recipe", "", f"Made by `normsurgery run` (normsurgery {normsurgery.__version__}) from a recipe "
             f"with sha256 `{run.hash}`, starting from `{run.recipe.model}`:", "",
             "| step | what | status | seconds | figures |", "|---|---|---|---|---|"]
    for s in steps:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in s.items() if k not in ("step", "label", "status", "seconds"))
        lines.append(f"| {s['step']} | {s['label']} | {s['status']} | {s['seconds']} | {figures} |")
    with card.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "/".join(_fmt(v) for v in value.values())
    return str(value)
