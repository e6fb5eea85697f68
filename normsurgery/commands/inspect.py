"""`normsurgery inspect MODEL`: what the model is and which rewrites apply to it."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from normsurgery.arch.facts import applicability, has_qk_norm, norm_label, placement
from normsurgery.commands.common import AllowPickle, JsonOutput, TrustRemoteCode, console, print_json

if TYPE_CHECKING:
    from normsurgery.source import ModelSource


def describe(source: ModelSource) -> dict[str, Any]:
    """The facts `inspect` reports, as plain data."""
    from normsurgery.source import IGNORED_TENSORS

    arch = source.arch
    dtypes = Counter(str(source.reader.info(n).dtype).replace("torch.", "") for n in source.reader.names()
                     if not IGNORED_TENSORS.search(n))
    return {
        "model": source.spec,
        "path": str(source.path),
        "family": arch.family,
        "declaration": "declared" if arch.origin == "declared" else "traced and proven",
        "model_type": arch.model_type,
        "parameters": source.parameter_count,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "dtypes": dict(dtypes),
        "layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "vocab_size": arch.vocab_size,
        "norm": norm_label(arch),
        "norm_eps": arch.all_norms()[0].eps if arch.all_norms() else None,
        "placement": placement(arch),
        "tied_embeddings": arch.tied,
        "qk_norm": has_qk_norm(arch),
        "experts": max((b.experts for b in arch.blocks), default=0),
        "sparse_blocks": sum(1 for b in arch.blocks if b.experts),
        "position_embedding": arch.position_embedding is not None,
        "computed_positions": arch.computed_positions is not None,
        "embedding_norm": arch.embedding_norm is not None,
        "weights_finite": True,
        "operations": [a.as_dict() for a in applicability(arch)],
    }


def inspect(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    json_output: JsonOutput = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Show a model's family, size, norm type and placement, and which operations apply (and why not).

    Every weight is read once to check it is finite.

    Examples:

      normsurgery inspect smollm2-135m

      normsurgery inspect ./my-model --json
    """
    with Progress(TextColumn("reading weights"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, transient=True, disable=json_output) as progress:
        task = progress.add_task("scan", total=None)
        from normsurgery.source import open_model

        source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                            on_tensor=lambda _: progress.advance(task))
    try:
        facts = describe(source)
    finally:
        source.close()
    if json_output:
        print_json(facts)
        return
    table = Table(title=f"{model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key in ("path", "family", "declaration", "parameters", "dtype", "layers", "hidden_size", "vocab_size", "norm", "norm_eps",
                "placement", "tied_embeddings", "qk_norm", "experts", "sparse_blocks", "computed_positions",
                "embedding_norm", "weights_finite"):
        value = facts[key]
        table.add_row(key.replace("_", " "), f"{value:,}" if key == "parameters" else str(value))
    console.print(table)
    ops = Table(title="operations", title_justify="left")
    ops.add_column("operation", style="bold")
    ops.add_column("applies")
    ops.add_column("why")
    for op in facts["operations"]:
        ops.add_row(op["operation"], "[green]yes[/green]" if op["applies"] else "[red]no[/red]", op["reason"])
    console.print(ops)
