"""normsurgery's Python API: each command as a call, for notebooks and pipelines.

Every call returns what the command prints with `--json` (a result object or its plain data), raises
`NormSurgeryError` (or `CheckFailed`, a subclass) with the command's one-paragraph message, prints nothing, and
reports progress only to a `progress(what, done, total)` callback when one is given. Outputs are written
atomically, their missing parent folders created; an existing output is replaced only with `force=True`.
`fold_model` and `convert_model` rewrite a loaded transformers model in memory with the same plans.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

from normsurgery.depth.pipeline import HEAL_BATCH_SIZE, HEAL_LR, PruneSelection
from normsurgery.errors import NormSurgeryError
from normsurgery.thresholds import DEFAULT_MAX_KL, DEFAULT_MAX_REL_LOGIT_DIFF, DEFAULT_MIN_TOP1, DEFAULT_NUM_SEQS, \
    DEFAULT_SEQ_LEN, Thresholds

if TYPE_CHECKING:
    from torch import nn

    from normsurgery.comparison import CheckReport
    from normsurgery.depth.stats import LayerStats
    from normsurgery.surgery import SurgeryResult

Progress = Callable[[str, int, Optional[int]], None]  # (what is under way, units done, units in all or None)
Target = Literal["rmsnorm", "crmsnorm", "none", "dyt", "derf"]
PathLike = Union[str, Path]
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")


def _dtype(name: str | None) -> Any:
    """The torch dtype a dtype name stands for (None stays None)."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise NormSurgeryError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}.")
    import torch

    return getattr(torch, name)


def _limit(value: float) -> float | None:
    """A threshold as the CLI takes it: below zero switches it off."""
    return None if value < 0 else value


def _rewrite(model: str, output: PathLike, plan_for: Callable[[Any], Any], *, force: bool, dtype: str | None,
             verify: bool, max_logit_diff: float, max_shard_size: str, allow_pickle: bool, trust_remote_code: bool,
             device: str, max_memory: str | None, progress: Progress | None) -> SurgeryResult:
    """An exact rewrite from file to file: open, plan, stream into `output`, verify against the source."""
    from normsurgery.checkpoint.writer import parse_size
    from normsurgery.engine.resources import resolve_runtime
    from normsurgery.source import open_model
    from normsurgery.surgery import apply_plan

    out = Path(output)
    store = _dtype(dtype)
    runtime = resolve_runtime(device, max_memory)
    shard_bytes = parse_size(max_shard_size)
    if out.exists() and not force:
        raise NormSurgeryError(f"{out} already exists; choose another --output or pass --force to replace it.")
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=False,
                        shapes="background")
    try:
        plan = plan_for(source)
        total = len(plan.steps) + len(source.reader)
        done = [0, 0]

        def on_step(_: str) -> None:
            done[0] += 1
            if progress:
                progress("writing", done[0], total)

        def on_verify() -> None:
            done[1] += 1
            if progress:
                progress("verifying", done[1], None)

        return apply_plan(source, plan, out, force=force, max_shard_size=shard_bytes, dtype=store, verify=verify,
                          thresholds=Thresholds(max_rel_logit_diff=_limit(max_logit_diff)), on_step=on_step,
                          on_verify=on_verify, runtime=runtime)
    finally:
        source.close()


def fold(model: str, output: PathLike, *, force: bool = False, dtype: str | None = None, verify: bool = True,
         max_logit_diff: float = DEFAULT_MAX_REL_LOGIT_DIFF, max_shard_size: str = "5GB", allow_pickle: bool = False,
         trust_remote_code: bool = False, device: str = "auto", max_memory: str | None = None,
         progress: Progress | None = None) -> SurgeryResult:
    """Fold every norm's gain (and bias) into the linear layers that read it (exact; a stock model), write it to
    `output` and verify it against `model`; `.check` is the CheckReport."""
    from normsurgery.rewrite.fold import plan_fold

    return _rewrite(model, output, lambda s: plan_fold(s.arch), force=force, dtype=dtype, verify=verify,
                    max_logit_diff=max_logit_diff, max_shard_size=max_shard_size, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code, device=device, max_memory=max_memory, progress=progress)


def convert(model: str, output: PathLike, *, to: Target, force: bool = False, dtype: str | None = None,
            verify: bool = True, max_logit_diff: float = DEFAULT_MAX_REL_LOGIT_DIFF, max_shard_size: str = "5GB",
            allow_pickle: bool = False, trust_remote_code: bool = False, device: str = "auto",
            max_memory: str | None = None, progress: Progress | None = None,
            **finetune: Any) -> Union[SurgeryResult, dict[str, Any]]:
    """`to="rmsnorm"|"crmsnorm"`: the exact conversion of a Pre-LN LayerNorm model (a SurgeryResult, verified).
    `to="none"|"dyt"|"derf"`: remove or swap every norm while fine-tuning, sized by `budget="30min"` unless the
    schedule is given (`gap`, `heal`, `ramp`, `lr`, `batch_size`, `seq_len`, `text`, `seed`, `loss`,
    `aux_weight`, `spread_weight`, `alpha_init`, `mixed_precision`, ... as the CLI's options; for "none",
    `export="stock"|"native"`, default stock where the model allows it); its report as plain data."""
    if to in ("rmsnorm", "crmsnorm"):
        if finetune:
            raise NormSurgeryError(f"to={to!r} is exact and takes no fine-tune options (got {', '.join(finetune)}).")
        from normsurgery.rewrite.center import plan_center_swap

        return _rewrite(model, output, lambda s: plan_center_swap(s.arch, to), force=force, dtype=dtype,
                        verify=verify, max_logit_diff=max_logit_diff, max_shard_size=max_shard_size,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device,
                        max_memory=max_memory, progress=progress)
    if to not in ("none", "dyt", "derf"):
        raise NormSurgeryError(f"to must be rmsnorm, crmsnorm, none, dyt or derf (got {to!r}).")
    import inspect

    from normsurgery.engine.resources import resolve_runtime
    from normsurgery.trainable.pipeline import removal_options, run_remove, run_swap

    known = set(inspect.signature(removal_options).parameters)
    unknown = sorted(set(finetune) - known)
    if unknown:
        raise NormSurgeryError(f"convert(to={to!r}) has no option {', '.join(unknown)}; the fine-tune options are "
                               f"{', '.join(sorted(known))}.")
    options = removal_options(device=device, **finetune)
    steps: list[int] = [0]
    common = dict(force=force, max_shard_size=max_shard_size, removal=options, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code, runtime=resolve_runtime(device, max_memory),
                  on_plan=lambda plan: steps.__setitem__(0, plan.steps),
                  on_step=lambda step, _loss: progress("fine-tuning", step + 1, steps[0]) if progress else None)
    return run_remove(model, Path(output), **common) if to == "none" else run_swap(model, to, Path(output), **common)


def check(original: str, candidate: str, *, text: PathLike | None = None, seq_len: int = DEFAULT_SEQ_LEN,
          num_seqs: int = DEFAULT_NUM_SEQS, dtype: str = "float32", max_logit_diff: float = DEFAULT_MAX_REL_LOGIT_DIFF,
          min_top1: float = DEFAULT_MIN_TOP1, max_kl: float = DEFAULT_MAX_KL, allow_pickle: bool = False,
          trust_remote_code: bool = False, device: str = "auto", max_memory: str | None = None,
          progress: Progress | None = None) -> CheckReport:
    """Run both models on the same tokens (`text`: a text file, else the Shakespeare calibration text, else random
    tokens) and compare their logits; `.passed` says whether every threshold (below zero: off) holds."""
    from normsurgery.comparison import run_check
    from normsurgery.engine.resources import resolve_runtime
    from normsurgery.source import validated_path

    compute_dtype = _dtype(dtype)
    runtime = resolve_runtime(device, max_memory)
    text_value = None
    if text is not None:
        try:
            text_value = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise NormSurgeryError(f"cannot read --text {text}: {err}. Give a readable UTF-8 text file.") from None
    paths = [validated_path(spec, allow_pickle=allow_pickle) for spec in (original, candidate)]
    thresholds = Thresholds(max_rel_logit_diff=_limit(max_logit_diff), min_top1=_limit(min_top1), max_kl=_limit(max_kl))
    batches = [0]

    def on_batch() -> None:
        batches[0] += 1
        if progress:
            progress("comparing", batches[0], None)

    return run_check(paths[0], paths[1], thresholds=thresholds, text=text_value, seq_len=seq_len, num_seqs=num_seqs,
                     dtype=compute_dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                     on_batch=on_batch, labels=(original, candidate), runtime=runtime)


def diagnose(model: str, *, samples: int = PruneSelection.samples, seq_len: int = PruneSelection.seq_len, text: str | None = None, skip_cost: bool = True,
             sublayer_skip_cost: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False, device: str = "auto",
             max_memory: str | None = None) -> LayerStats:
    """Per-block statistics on calibration text (`text`: a .txt/.jsonl file; default the Shakespeare calibration
    split): Block Influence, angular distances, residual norms, norm gains, skip costs; each attention and MLP
    sub-layer's influence, and its skip cost with `sublayer_skip_cost`."""
    from normsurgery.engine.resources import resolve_runtime
    from normsurgery.depth.pipeline import diagnose_model

    return diagnose_model(model, samples=samples, seq_len=seq_len, text=text, skip_cost=skip_cost,
                          sublayer_skip_cost=sublayer_skip_cost,
                          allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                          runtime=resolve_runtime(device, max_memory))


def prune(model: str, output: PathLike | None = None, *, remove: int | None = None, layers: list[int] | None = None,
          what: str = PruneSelection.what, export: str = PruneSelection.export, by: str = PruneSelection.by, keep_first: int = PruneSelection.keep_first,
          keep_last: int = PruneSelection.keep_last, remeasure: int = PruneSelection.remeasure, skip_cost: bool = False,
          samples: int = PruneSelection.samples, seq_len: int = PruneSelection.seq_len, text: str | None = None,
          heal_steps: int = 0, lr: float = HEAL_LR, batch_size: int = HEAL_BATCH_SIZE, mixed_precision: str = "auto", dry_run: bool = False, force: bool = False,
          verify: bool = True, max_shard_size: str = "5GB", allow_pickle: bool = False,
          trust_remote_code: bool = False, device: str = "auto", max_memory: str | None = None) -> dict[str, Any]:
    """Remove `remove` blocks chosen on calibration text (or exactly `layers`, 0-based), write the pruned stock model
    to `output` verified against the original with those blocks skipped, optionally heal it; the report. `what`:
    "attention" or "mlp" removes only that sub-layer of the chosen blocks (the output carries its own modeling
    code and is verified against the original with those sub-layers' outputs zeroed; `export="stock"` writes a stock
    model instead, their output projections zeroed in place, with no speed or KV-cache saving)."""
    from normsurgery.depth.pipeline import run_prune

    if heal_steps < 0:
        raise NormSurgeryError(f"heal_steps cannot be negative (got {heal_steps}).")
    selection = PruneSelection(what=what, export=export, remove=remove, layers=list(layers) if layers is not None else None, by=by,
                               keep_first=keep_first, keep_last=keep_last, remeasure=remeasure, skip_cost=skip_cost,
                               samples=samples, seq_len=seq_len, text=text)
    runtime, heal = None, None
    if remove is not None or verify or heal_steps or device != "auto" or max_memory is not None:
        from normsurgery.engine.resources import resolve_runtime  # a --no-verify copy of named blocks needs no torch

        runtime = resolve_runtime(device, max_memory)
    if heal_steps:
        from normsurgery.finetune.engine import FinetuneOptions

        heal = FinetuneOptions(steps=heal_steps, lr=lr, batch_size=batch_size, seq_len=seq_len, text=text,
                               device=device, mixed_precision=mixed_precision)  # type: ignore[arg-type]
    return run_prune(model, Path(output) if output is not None else None, selection, heal=heal, dry_run=dry_run,
                     force=force, max_shard_size=max_shard_size, verify=verify, allow_pickle=allow_pickle,
                     trust_remote_code=trust_remote_code, runtime=runtime)


def evaluate(model: str, *, tasks: list[str] | None = None, compare: str | None = None, limit: int | None = None,
             batch_size: int = 8, device: str = "cpu", dtype: str = "float32", max_memory: str | None = None,
             max_ppl_increase: float | None = None, max_acc_drop: float | None = None,
             trust_remote_code: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """lm-eval tasks on `model` (default: the offline Shakespeare suite), and with `compare` on its original side by
    side, each metric's delta with its standard error; `failures` lists the thresholds that failed."""
    from normsurgery.evaluation.compare import evaluate_models

    evaluation = evaluate_models(model, tasks=tasks, compare=compare, limit=limit, batch_size=batch_size, device=device,
                                 dtype=_dtype(dtype), max_memory=max_memory, max_ppl_increase=max_ppl_increase,
                                 max_acc_drop=max_acc_drop, trust_remote_code=trust_remote_code,
                                 on_task=(lambda label, task: progress(f"{label}: {task}", 0, None)) if progress else None)
    return evaluation.as_dict()


def run_recipe(recipe: PathLike, *, overrides: dict[str, str] | None = None, model: str | None = None,
               output: PathLike | None = None, force: bool = False, trust_remote_code: bool = False,
               device: str = "auto", max_memory: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run a recipe file's steps in order (`overrides`: its variables, as `--set NAME=VALUE`); the run as plain
    data, `exit_code` 0 when every step passed, 1 when a check or threshold failed, 2 when a step could not run."""
    from normsurgery.recipe import report as reports
    from normsurgery.recipe.runner import RecipeRun
    from normsurgery.recipe.schema import load_recipe

    loaded, digest = load_recipe(Path(recipe), {k: str(v) for k, v in (overrides or {}).items()})
    if model is not None:
        loaded.model = model
    target = Path(output) if output is not None else Path(loaded.output)
    on_step = (lambda r: progress(r.label, r.index - 1, len(loaded.steps))) if progress else None
    results = RecipeRun(loaded, digest, target, force=force, trust_remote_code=trust_remote_code, on_step=on_step,
                        device=device, max_memory=max_memory).run()
    code = 2 if any(r.status == "error" for r in results) else 1 if any(r.status == "failed" for r in results) else 0
    return reports.as_json(str(recipe), digest, str(target), results, code)


def fold_model(model: nn.Module) -> nn.Module:
    """Fold the norms of a loaded transformers model in place, exactly, with the plan `fold` writes (a tied
    unembedding is untied when the final norm folds into it); returns the model, still its stock class."""
    from normsurgery.arch import architecture_of
    from normsurgery.rewrite.fold import plan_fold
    from normsurgery.rewrite.in_memory import apply_in_memory

    arch = architecture_of(model.config)
    return apply_in_memory(model, plan_fold(arch), arch)


def convert_model(model: nn.Module, *, to: Literal["rmsnorm", "crmsnorm"]) -> nn.Module:
    """Convert a loaded Pre-LN LayerNorm model to Pre-RMSNorm or Pre-CRMSNorm in place, exactly, with the plan
    `convert` writes; its `save_pretrained` writes a folder that loads as the CLI's output does (its own modeling
    code, trust_remote_code=True). Returns the model."""
    from normsurgery.arch import architecture_of
    from normsurgery.rewrite.center import plan_center_swap
    from normsurgery.rewrite.in_memory import apply_in_memory

    if to not in ("rmsnorm", "crmsnorm"):
        raise NormSurgeryError(f"convert_model does the exact conversions, to='rmsnorm' or 'crmsnorm' (got {to!r}); "
                               "the trainable ones (none, dyt, derf) run from a folder: convert(MODEL, OUT, to=...).")
    arch = architecture_of(model.config)
    return apply_in_memory(model, plan_center_swap(arch, to), arch)
