"""The config.json of a rewritten model: the stock config when the stock class can express the result,
else a `normsurgery` config that wraps it and registers the shipped modeling code through `auto_map`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normsurgery.rewrite.plan import Surgery

MODELING_FILE = Path(__file__).with_name("modeling_normsurgery.py")


def rewritten_config(raw: dict[str, Any], updates: dict[str, Any], surgery: Surgery | None,
                     shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The new config.json: `raw` with `updates`, wrapped with the surgery (and the written `shapes` of its resized
    tensors) when the stock class cannot load it."""
    base = {**raw, **updates}
    base.pop("auto_map", None)
    if surgery is None:
        return base
    from normsurgery.export.modeling_normsurgery import wrap_config  # torch and transformers: only for a surgery

    return wrap_config(base, surgery.exported(shapes))
