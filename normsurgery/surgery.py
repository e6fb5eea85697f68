"""Run an exact rewrite end to end: plan, stream tensors through it, export, verify, and commit atomically.

A plan of copies only (pruning) streams stored bytes and imports torch only to verify: its start-up is that of a
file copy.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import normsurgery
from normsurgery.checkpoint.card import render_model_card
from normsurgery.checkpoint.raw import RawTensor
from normsurgery.checkpoint.safetensors_header import dtype_name, torch_dtype
from normsurgery.checkpoint.writer import CheckpointWriter
from normsurgery.errors import CheckFailed
from normsurgery.export.config import MODELING_FILE, rewritten_config
from normsurgery.rewrite.plan import Plan, Step, execute
from normsurgery.source import ModelSource
from normsurgery.thresholds import DEFAULT_NUM_SEQS, DEFAULT_SEQ_LEN, Thresholds

if TYPE_CHECKING:
    import torch

    from normsurgery.comparison import CheckReport

    from normsurgery.engine.resources import Runtime
    from normsurgery.engine.weights import PlanWeights

    Tensor = torch.Tensor


@dataclass
class SurgeryResult:
    """What a rewrite did and how well it was verified."""

    operation: str
    source: str
    output: str
    tensors_written: int
    folded: list[str]
    kept: list[str]
    remote_code: bool
    dtype: str
    check: CheckReport | None = None  # the output against the source (None: not verified)
    maths_check: CheckReport | None = None  # bf16/fp16 outputs: a float32 twin of the rewrite vs the source
    storage_check: CheckReport | None = None  # bf16/fp16 outputs: the stored result vs its float32 twin
    change: CheckReport | None = None  # pruning: the output against the unpruned source (what it costs)
    config_updates: dict[str, Any] | None = None  # what changed in config.json

    def as_dict(self) -> dict[str, Any]:
        """Plain data for normsurgery.json and --json."""
        return {k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in self.__dict__.items()}


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Streaming already keeps two threads busy (read and rewrite; write); torch's own worker threads would
    only spin against them (measured: 5.2-5.8 s instead of 5.8-7.1 s for the 2.4 GB fold on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _FiniteSource:
    """Reads tensors lazily from a checkpoint (as torch tensors, or as stored bytes when `raw`) and refuses NaN/inf
    as it goes."""

    def __init__(self, source: ModelSource, raw: bool = False) -> None:
        self._reader = source.reader
        self._raw = raw

    def names(self) -> list[str]:
        return self._reader.names()

    def get(self, name: str) -> Tensor | RawTensor:
        tensor = self._reader.raw(name) if self._raw else self._reader.get(name)
        self._reader.check_finite(name, tensor)
        return tensor

    def prefetch(self, names: list[str]) -> None:
        self._reader.prefetch(names)


class _ShapeRecorder:
    """Passes tensors to the writer and remembers each one's shape."""

    def __init__(self, writer: CheckpointWriter) -> None:
        self.writer = writer
        self.shapes: dict[str, list[int]] = {}

    def add(self, name: str, tensor: Tensor | RawTensor) -> None:
        self.shapes[name] = list(tensor.shape)
        self.writer.add(name, tensor)


def main_dtype_code(source: ModelSource) -> str:
    """The safetensors dtype code (e.g. "BF16") most of the model's floating tensors are stored in."""
    counts: Counter[str] = Counter()
    for name in source.reader.names():
        info = source.reader.info(name)
        if info.is_floating_point:
            counts[info.code] += math.prod(info.shape)
    return counts.most_common(1)[0][0] if counts else "F32"


def main_dtype(source: ModelSource) -> torch.dtype:
    """The dtype most of the model's floating tensors are stored in."""
    return torch_dtype(main_dtype_code(source))


def apply_plan(
    source: ModelSource,
    plan: Plan,
    out: Path,
    *,
    force: bool = False,
    max_shard_size: int = 5_000_000_000,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    thresholds: Thresholds = Thresholds(),
    on_step: Callable[[str], None] | None = None,
    on_verify: Callable[[], None] | None = None,
    runtime: Runtime | None = None,
) -> SurgeryResult:
    """Stream `source` through `plan` into `out`; verify against the source (in bounded memory on `runtime`)
    before the folder appears. A plan of copies only streams stored bytes (no torch unless it verifies)."""
    copies_only = not plan.steps and dtype is None
    stored = main_dtype_code(source)

    def dtype_for(name: str) -> torch.dtype:
        if dtype is not None:
            return dtype
        return source.reader.info(name).dtype if name in source.reader else torch_dtype(stored)

    result = SurgeryResult(
        operation=plan.operation,
        source=source.spec,
        output=str(out),
        tensors_written=0,
        folded=plan.folded,
        kept=plan.kept,
        remote_code=plan.surgery is not None,
        dtype=str(dtype).replace("torch.", "") if dtype is not None else dtype_name(stored),
    )
    metadata = {"normsurgery_version": normsurgery.__version__, "normsurgery_operation": plan.operation}
    with CheckpointWriter(out, force=force, max_shard_size=max_shard_size, metadata=metadata) as writer:
        sink = _ShapeRecorder(writer)
        produced: dict[str, Step] = {}
        try:
            with nullcontext() if copies_only else _one_torch_thread():
                written = execute(plan, _FiniteSource(source, raw=copies_only), sink, dtype_for=dtype_for,
                                  on_step=on_step, produced=produced)
        except Exception:
            source.confirm()  # a wrong-shaped checkpoint fails here with the clear error
            raise
        source.confirm()
        result.tensors_written = len(written)
        resized = plan.surgery.resized if plan.surgery else []
        result.config_updates = plan.all_config_updates(source.settings)
        config = rewritten_config(
            source.reader.config,
            {**result.config_updates, **({"torch_dtype": result.dtype} if dtype else {})},
            plan.surgery,
            {n: sink.shapes[n] for n in resized},
        )
        writer.write_json("config.json", config)
        writer.copy_side_files(source.path)
        if plan.surgery is not None:
            writer.copy_file(MODELING_FILE)
        if "auto_map" in config.get("base_config", config) and source.trust_remote_code:
            for code in sorted(source.path.glob("*.py")):  # a model whose code ships in its folder: the output keeps it
                writer.copy_file(code)
        staged = writer.stage()
        if verify:
            from normsurgery.engine.resources import resolve_runtime
            from normsurgery.engine.weights import PlanWeights

            twin = PlanWeights(source.reader, produced, sink.shapes, plan.renames)
            _verify(source, plan, staged, out, dtype or torch_dtype(stored), thresholds, result, on_verify, twin,
                    runtime or resolve_runtime())
        card = render_model_card(
            source.spec,
            [{"operation": plan.operation, "folded": len(plan.folded), "kept": len(plan.kept),
              "remote_code": result.remote_code, "dtype": result.dtype}],
            result.check.as_dict() if result.check else None,
            _card_extra(plan, result),
        )
        writer.write_text("README.md", card)
        writer.write_text("normsurgery.json", json.dumps(result.as_dict(), indent=2) + "\n")
    return result


def _card_extra(plan: Plan, result: SurgeryResult) -> dict[str, Any] | None:
    """The model card's sections beyond the check: norms kept, blocks removed and what removing them changed."""
    extra: dict[str, Any] = {"kept": plan.kept} if plan.kept else {}
    if plan.skipped_blocks:
        extra["removed_blocks"] = f"0-based indices of the source: {', '.join(map(str, plan.skipped_blocks))}"
    if plan.skipped_sublayers:
        extra["removed_sublayers"] = f"{sublayer_label(plan.skipped_sublayers)} (0-based block indices, kept in place)"
    if plan.skipped_blocks or plan.skipped_sublayers:
        if result.change:
            c = result.change
            extra["change_against_the_source"] = [
                f"perplexity {c.ppl_original:.4g} -> {c.ppl_candidate:.4g} on {c.tokens}",
                f"top-1 agreement {c.top1_agreement:.2%}, mean KL {c.mean_kl:.4g} nats"]
    return extra or None


def sublayer_label(sublayers: dict[str, tuple[int, ...]]) -> str:
    """E.g. "the attention of blocks 3, 5": which sub-layers a prune removed."""
    return "; ".join(f"the {'MLP' if kind == 'mlp' else kind} of block{'s' if len(blocks) > 1 else ''} "
                     f"{', '.join(map(str, blocks))}" for kind, blocks in sublayers.items())


NO_LIMITS = Thresholds(max_rel_logit_diff=None, min_top1=None, max_kl=None)


def _verify(
    source: ModelSource,
    plan: Plan,
    staged: Path,
    out: Path,
    target: torch.dtype,
    thresholds: Thresholds,
    result: SurgeryResult,
    on_verify: Callable[[], None] | None,
    twin: PlanWeights,
    runtime: Runtime,
) -> None:
    """Check the staged output against the source, all models streamed from their checkpoints in bounded memory.

    - Pruning: the output must equal the source run with the removed blocks skipped (or the removed sub-layers'
      outputs zeroed); its change against the intact source is measured and reported.
    - A bf16/fp16 output cannot match its original to float32 precision, so its gate is the rewrite's float32
      twin (the maths, computed from the source tensors as the forward reaches them, never written), while
      the rounding of storing it is measured and reported.
    - Rewrites that keep the residual basis (fold, prune) name the first block whose output differs.
    """
    import torch

    from normsurgery.comparison import Pairing, Run, compare_runs
    from normsurgery.engine.loading import OpenModel
    from normsurgery.engine.text import check_sample
    from normsurgery.engine.weights import CheckpointWeights

    f32 = torch.float32
    blocks = [source.arch.block_path(b.index) for b in source.arch.blocks]
    label = (source.spec, str(out))
    remote = source.trust_remote_code  # a traced model whose code ships in its folder: the user opted in
    with OpenModel(source.path, runtime, weights=CheckpointWeights(source.reader), trust_remote_code=remote) as original, \
            OpenModel(staged, runtime, trust_remote_code=remote) as stored:
        tokens, tokens_label = check_sample(source.path, original.model, text=None, seq_len=DEFAULT_SEQ_LEN,
                                             num_seqs=DEFAULT_NUM_SEQS)
        common = dict(tokens_label=tokens_label, dtype=f32, on_batch=on_verify)
        if plan.skipped_blocks:
            from normsurgery.depth.skip import skipping

            kept = [b for i, b in enumerate(blocks) if i not in plan.skipped_blocks]
            runs = [Run(original, lambda: skipping(original.model, source.arch, plan.skipped_blocks), kept),
                    Run(stored, blocks=blocks[:len(kept)]), Run(original)]
            skipped = ", ".join(map(str, plan.skipped_blocks))
            report, change = compare_runs(runs, [
                Pairing(0, 1, (f"{source.spec} with blocks {skipped} skipped", str(out)), thresholds, by_block=True),
                Pairing(2, 1, label, NO_LIMITS)], tokens, **common)
            result.check, result.change = report, change
        elif plan.skipped_sublayers:
            from normsurgery.depth.skip import zeroing

            runs = [Run(original, lambda: zeroing(original.model, source.arch, plan.skipped_sublayers), blocks),
                    Run(stored, blocks=blocks), Run(original)]
            report, change = compare_runs(runs, [
                Pairing(0, 1, (f"{source.spec} with {sublayer_label(plan.skipped_sublayers)} zeroed", str(out)),
                        thresholds, by_block=True),
                Pairing(2, 1, label, NO_LIMITS)], tokens, **common)
            result.check, result.change = report, change
        elif target not in (torch.bfloat16, torch.float16):
            runs = [Run(original, blocks=blocks), Run(stored, blocks=blocks)]
            report, = compare_runs(runs, [Pairing(0, 1, label, thresholds, by_block=plan.operation == "fold")],
                                   tokens, **common)
            result.check = report
        else:
            with OpenModel(staged, runtime, weights=twin, trust_remote_code=remote) as exact:
                twin_label = f"{out} (float32 twin)"
                runs = [Run(original, blocks=blocks), Run(exact, blocks=blocks), Run(stored)]
                report, storage, overall = compare_runs(runs, [
                    Pairing(0, 1, (source.spec, twin_label), thresholds, by_block=plan.operation == "fold"),
                    Pairing(1, 2, (twin_label, str(out)), NO_LIMITS),
                    Pairing(0, 2, label, NO_LIMITS)], tokens, **common)
            result.maths_check, result.storage_check, result.check = report, storage, overall
    if not report.passed:
        raise CheckFailed(
            f"verification failed, so {out} was not written: {'; '.join(report.failures)}. This is a bug in "
            "normsurgery or a model it does not handle exactly; please report it (or pass --no-verify to keep "
            "the output anyway)."
        )
