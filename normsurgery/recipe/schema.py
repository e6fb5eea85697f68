"""The recipe file: YAML read safely, variables substituted, validated with pydantic, errors with their line.

    model: gpt2-shakespeare            # folder, reference model name or hub id
    output: ${out}/gpt2-rms            # ${name}: from `vars`, --set name=value, or the environment
    vars: {out: runs}
    steps:
      - convert: {to: rmsnorm}
      - check: {against: original}

Each step is a one-key mapping, its kind to its options; `id` names a step for `check`/`eval` `against`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from normsurgery.depth.pipeline import HEAL_BATCH_SIZE, HEAL_LR, PruneSelection
from normsurgery.errors import NormSurgeryError
from normsurgery.finetune.options import FinetuneOptions
from normsurgery.trainable.options import RemovalOptions
from normsurgery.thresholds import (
    DEFAULT_MAX_KL,
    DEFAULT_MAX_REL_LOGIT_DIFF,
    DEFAULT_MIN_TOP1,
    DEFAULT_NUM_SEQS,
    DEFAULT_SEQ_LEN,
)

VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None


class FoldStep(_Options):
    """Fold every norm's gain/bias into its readers (exact)."""

    kind: Literal["fold"] = "fold"
    max_logit_diff: float = DEFAULT_MAX_REL_LOGIT_DIFF


class ConvertStep(_Options):
    """convert --to: rmsnorm/crmsnorm (exact) or none/dyt/derf (calibrate, fine-tune)."""

    kind: Literal["convert"] = "convert"
    to: Literal["rmsnorm", "crmsnorm", "none", "dyt", "derf"]
    max_logit_diff: float = DEFAULT_MAX_REL_LOGIT_DIFF
    budget: str | None = None  # a time (30min) or a token count (20M); sizes what is left unset (default 30min)
    gap: int | None = Field(None, ge=0)  # None: sized by the budget
    heal: int | None = Field(None, ge=0)
    ramp: int | None = Field(None, ge=1)  # None: 4 gaps with a sized schedule, else 1
    aux_weight: float = Field(RemovalOptions.aux_weight, ge=0)
    spread_weight: float = Field(RemovalOptions.spread_weight, ge=0)
    alpha_init: Literal["linear", "scale", "least-squares", "best-mse"] = RemovalOptions.alpha_init  # type: ignore[assignment]  # dyt/derf: how a swap starts
    lr: float | None = Field(None, gt=0)  # None: sized by the parameter count
    batch_size: int | None = Field(None, ge=1)  # None: about 1k tokens per step on a CPU, 8k on a GPU
    seq_len: int | None = Field(None, ge=2)  # None: the model's context, at most 1024
    text: str | None = None
    seed: int = FinetuneOptions.seed
    loss: Literal["kl", "lm", "kl+lm"] = FinetuneOptions.loss
    mixed_precision: Literal["auto", "no", "bf16"] = FinetuneOptions.mixed_precision  # bf16 autocast: auto on a GPU that supports it
    export: Literal["stock", "native"] | None = RemovalOptions.export  # type: ignore[assignment]  # none: None is stock where possible


class PruneStep(_Options):
    """Remove `remove` blocks (chosen on calibration text) or exactly `layers`; `what`: the whole blocks, or only
    their attention or MLP sub-layer."""

    kind: Literal["prune"] = "prune"
    what: Literal["block", "attention", "mlp"] = PruneSelection.what  # type: ignore[assignment]
    export: Literal["native", "stock"] = PruneSelection.export  # type: ignore[assignment]  # sub-layers: stock zeroes them in place
    remove: int | None = Field(None, ge=1)
    layers: list[int] | None = None
    by: Literal["auto", "bi", "angular", "angular-all", "skip-cost", "last"] = PruneSelection.by  # type: ignore[assignment]
    keep_first: int = Field(PruneSelection.keep_first, ge=0)
    keep_last: int = Field(PruneSelection.keep_last, ge=0)
    remeasure: int = Field(PruneSelection.remeasure, ge=0)
    samples: int = Field(PruneSelection.samples, ge=1)
    seq_len: int = Field(PruneSelection.seq_len, ge=2)
    text: str | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> "PruneStep":
        if (self.remove is None) == (self.layers is None):
            raise ValueError("give either remove (how many blocks) or layers (which), not both or neither")
        return self


class HealStep(_Options):
    """Distil the current (stock) model to the original for `steps` steps."""

    kind: Literal["heal"] = "heal"
    steps: int = Field(ge=1)
    lr: float = Field(HEAL_LR, gt=0)
    batch_size: int = Field(HEAL_BATCH_SIZE, ge=1)
    seq_len: int = Field(PruneSelection.seq_len, ge=2)
    text: str | None = None
    seed: int = FinetuneOptions.seed
    mixed_precision: Literal["auto", "no", "bf16"] = FinetuneOptions.mixed_precision


class CheckStep(_Options):
    """Compare the current model with the original or an earlier step; thresholds as in `normsurgery check`."""

    kind: Literal["check"] = "check"
    against: str = "original"
    max_logit_diff: float | None = DEFAULT_MAX_REL_LOGIT_DIFF
    min_top1: float | None = DEFAULT_MIN_TOP1
    max_kl: float | None = DEFAULT_MAX_KL
    num_seqs: int = Field(DEFAULT_NUM_SEQS, ge=1)
    seq_len: int = Field(DEFAULT_SEQ_LEN, ge=2)


class EvalStep(_Options):
    """lm-eval on the current model, optionally compared with the original or an earlier step."""

    kind: Literal["eval"] = "eval"
    tasks: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    against: str | None = None
    max_ppl_increase: float | None = Field(None, ge=0)
    max_acc_drop: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _thresholds_need_against(self) -> "EvalStep":
        if (self.max_ppl_increase is not None or self.max_acc_drop is not None) and self.against is None:
            raise ValueError("max_ppl_increase and max_acc_drop compare against a model: add against: original")
        return self


class ExportStep(_Options):
    """Write the current model to the recipe's output (the last step; added when a recipe has none)."""

    kind: Literal["export"] = "export"
    max_shard_size: str = "5GB"


Step = Annotated[Union[FoldStep, ConvertStep, PruneStep, HealStep, CheckStep, EvalStep, ExportStep],
                 Field(discriminator="kind")]
KINDS = ("fold", "convert", "prune", "heal", "check", "eval", "export")
WRITES = ("fold", "convert", "prune", "heal")  # steps that produce a new model


class Recipe(BaseModel):
    """A whole recipe: where the model comes from, where the result goes, what happens in between."""

    model_config = ConfigDict(extra="forbid")
    model: str
    output: str
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    vars: dict[str, str] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self) -> "Recipe":
        ids = {"original"}
        custom = ""  # why the current model cannot be rewritten or healed again (after convert, a sub-layer prune)
        for i, step in enumerate(self.steps):
            against = getattr(step, "against", None)
            if against is not None and against not in ids:
                raise ValueError(f"step {i + 1} ({step.kind}) compares against {against!r}, which is not 'original' or "
                                 "the id of an earlier step")
            if custom and step.kind in ("fold", "convert", "prune", "heal"):
                raise ValueError(f"step {i + 1} ({step.kind}) follows {custom}; only check, eval and export can follow "
                                 "it (convert heals with its own options)")
            if step.kind == "export" and i != len(self.steps) - 1:
                raise ValueError(f"step {i + 1} (export) must be the last step")
            if step.kind == "convert":
                custom = custom or "a convert step, whose output has its own modeling code"
            elif step.kind == "prune" and step.what != "block":
                custom = custom or ("a sub-layer prune, whose output has its own modeling code or (--export stock) "
                                    "zeroed projections that a later step would train back")
            if step.id:
                if step.id in ids:
                    raise ValueError(f"step id {step.id!r} is used twice")
                if step.kind not in WRITES:
                    raise ValueError(f"step {i + 1} ({step.kind}) writes no model, so it cannot have an id")
                ids.add(step.id)
        return self


class RecipeError(NormSurgeryError):
    """A recipe that cannot run: bad YAML, an unknown key or step, a wrong type, a missing variable."""


def _lines(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """The 1-based line of every mapping key and sequence item, by its path in the document."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines.update(_lines(value, path + (key.value,)))
            lines[path + (key.value,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_lines(item, path + (i,)))
    return lines


def _substitute(value: Any, variables: dict[str, str], where: str) -> Any:
    """Replace ${name} in every string, from `variables` then the environment."""
    if isinstance(value, str):
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return variables[name]
            if name in os.environ:
                return os.environ[name]
            raise RecipeError(f"{where}: ${{{name}}} is not defined; set it under vars:, with --set {name}=VALUE, "
                              "or in the environment.")
        return VARIABLE.sub(one, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


def _flatten_steps(data: dict[str, Any], where: str, lines: dict[tuple[Any, ...], int]) -> None:
    """Turn each `- kind: {options}` item into `{kind: ..., **options}` for the discriminated union."""
    steps = data.get("steps")
    if not isinstance(steps, list):
        return
    flat = []
    for i, item in enumerate(steps):
        line = lines.get(("steps", i), "?")
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}, line {line}: step {i + 1} must be one mapping of a step kind to its options, "
                              f"e.g. '- fold: {{}}' (kinds: {', '.join(KINDS)}).")
        (kind, options), = item.items()
        if kind not in KINDS:
            raise RecipeError(f"{where}, line {line}: unknown step {kind!r}; expected one of {', '.join(KINDS)}.")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}, line {line}: the options of step {i + 1} ({kind}) must be a mapping, e.g. "
                              f"'- {kind}: {{}}'.")
        flat.append({"kind": kind, **options})
    data["steps"] = flat


def _explain(err: ValidationError, where: str, lines: dict[tuple[Any, ...], int], data: dict[str, Any]) -> str:
    """One paragraph naming each problem with its line and key."""
    problems = []
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) >= 3 and loc[0] == "steps" and isinstance(loc[1], int):  # steps.i.<kind>.key
            kind = data["steps"][loc[1]]["kind"]
            key_path = ("steps", loc[1], kind) + tuple(loc[3:])
            label = f"steps[{loc[1] + 1}] {kind}" + (f".{'.'.join(map(str, loc[3:]))}" if loc[3:] else "")
        else:
            key_path = tuple(loc)
            label = ".".join(map(str, loc)) or "the recipe"
        line = next((lines[key_path[:n]] for n in range(len(key_path), -1, -1) if key_path[:n] in lines), "?")
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"] == "missing":
            message = "required key is missing"
        problems.append(f"line {line}: {label}: {message}")
    return f"{where} is not a valid recipe: " + "; ".join(problems) + "."


def load_recipe(path: Path, overrides: dict[str, str] | None = None) -> tuple[Recipe, str]:
    """Read, substitute and validate a recipe file; returns it with the sha256 of the file's bytes."""
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read the recipe {path}: {err.strerror or err}.") from None
    try:
        text = raw.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise RecipeError(f"{where} is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}{at}: not valid YAML ({getattr(err, 'problem', None) or err}).") from None
    if not isinstance(data, dict) or node is None:
        raise RecipeError(f"{where} must be a YAML mapping with model, output and steps.")
    lines = _lines(node)
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise RecipeError(f"{where}, line {lines.get(('vars',), '?')}: vars must be a mapping of names to values.")
    variables = {str(k): str(v) for k, v in variables.items()}
    variables.update(overrides or {})
    data = {k: (_substitute(v, variables, where) if k != "vars" else variables) for k, v in data.items()}
    _flatten_steps(data, where, lines)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_explain(err, where, lines, data)) from None
    if recipe.steps[-1].kind != "export":
        recipe.steps.append(ExportStep())
    return recipe, hashlib.sha256(raw).hexdigest()
