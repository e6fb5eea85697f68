"""Architectures known by tracing at run time: a model type that no family declares (or whose code ships in its own
folder) gets its declaration from a tiny random instance of its own config, traced and proven the way the test suite
proves a declared family, then cached per model type, layout and transformers version in the user's cache folder.

Nothing is guessed: a trace that finds something it cannot express, or whose proof fails its structural checks,
is a refusal that names the module and the reason; an operation whose own proof fails (e.g. crmsnorm) is refused
on its own, the others apply."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from normsurgery.adapt.draft import Draft, draft_from_json, draft_to_json
from normsurgery.arch.composite import text_view
from normsurgery.arch.spec import Family
from normsurgery.errors import NormSurgeryError

TRACER_VERSION = 13  # raise when a change to the tracer or the proof makes cached declarations stale
# config entries that say nothing about the layout of the residual stream
IGNORED = frozenset({"architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                     "output_attentions", "output_hidden_states", "return_dict", "bos_token_id", "eos_token_id",
                     "pad_token_id", "auto_map", "_attn_implementation", "num_hidden_layers", "n_layer",
                     "num_layers", "max_position_embeddings", "initializer_range"})
# the checks every operation needs, and the operations whose own proof is a named check
STRUCTURAL = ("resolve", "tensor names", "config.json alone", "norm facts")
PROVEN_BY = {"fold": "fold", "rmsnorm": "convert to rmsnorm", "crmsnorm": "convert to crmsnorm",
             "prune": "prune block 0"}

# why a model whose code ships in its folder is folded and pruned (stock outputs keep that code) but not converted
REMOTE_CONVERSION = ("its modeling code ships in its own folder, which the trainable rewrites and sub-layer pruning do "
                     "not bind yet; fold, prune, rmsnorm and crmsnorm apply (their outputs keep the folder's code)")

# why a model whose checkpoint holds tensors that transformers splits at load is folded, pruned and converted only
SPLIT_AT_LOAD = ("its checkpoint stores fused tensors that transformers splits at load into several layers (e.g. one "
                 "query_key_value for q_proj, k_proj and v_proj), which the trainable rewrites and sub-layer pruning "
                 "do not bind yet; fold, prune, rmsnorm and crmsnorm apply")

_TRACED: dict[str, Family] = {}  # cache key -> family, this process


def cache_key(config: Any) -> str:
    """What a traced declaration depends on: the model type, the config's layout entries (not its depth, and of the
    per-block lists only the values they hold: blocks of the kinds a trace saw resolve at any depth by signature,
    but a config with another kind of block needs its own trace), and the transformers and tracer versions."""
    import transformers

    from normsurgery.adapt.tiny import layer_lists

    view = text_view(config)
    raw = config.to_dict()
    per_block = view.to_dict()
    lists = set(layer_lists(per_block, int(view.num_hidden_layers)))
    layout = {k: v for k, v in raw.items() if k not in IGNORED and k not in lists and not k.startswith("_")}
    layout.update({f"{k} holds": sorted({str(v) for v in per_block[k]}) for k in lists})
    text = json.dumps([config.model_type, transformers.__version__, TRACER_VERSION, layout], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def traced_folder() -> Path:
    """Where proven traced declarations are cached."""
    from normsurgery.cache import cache_root

    return cache_root() / "traced"


def traced_family(config: Any) -> Family:
    """The proven traced declaration of `config`'s architecture: from this process, the cache, or traced now. A
    config whose class comes from its folder's code (auto_map) was read with the user's --trust-remote-code."""
    trust_remote_code = bool(getattr(config, "auto_map", None))
    key = cache_key(config)
    family = _TRACED.get(key)
    path = traced_folder() / f"{config.model_type}-{key}.json"
    if family is None and path.is_file():
        try:
            data = json.loads(path.read_text())
            draft = draft_from_json(data["draft"], config)
            _attach_kinds(draft, trust_remote_code)
            family = _family(draft, data["refused"])
        except (OSError, ValueError, KeyError, TypeError):  # stale or damaged: trace again
            family = None
    if family is not None:
        try:
            family.resolve(config)
        except ValueError:  # a kind of block that the cached trace did not see (another layout of the same type)
            family = None
    if family is None:
        draft, refused, seconds = trace(config, trust_remote_code=trust_remote_code)
        family = _family(draft, refused)
        _write(path, {"draft": draft_to_json(draft), "refused": refused, "seconds": round(seconds, 2)})
    _TRACED[key] = family
    return family


def _family(draft: Draft, refused: dict[str, str]) -> Family:
    """The draft's family with its refused operations."""
    return replace(draft.family(), refused=tuple(sorted(refused.items())))


def _attach_kinds(draft: Draft, trust_remote_code: bool) -> None:
    """Give a draft with blocks of several kinds the function that finds each block's kind from its signature."""
    from normsurgery.adapt.signature import config_signatures

    if len(draft.layouts) <= 1:
        return
    index = {sig: k for k, sig in enumerate(draft.signatures)}

    def kinds(config: Any) -> list[int]:
        try:
            return [index[sig] for sig in config_signatures(config, trust_remote_code)]
        except KeyError:
            raise ValueError(f"a block of this {draft.model_type} config has modules no traced block has") from None

    draft.kinds = kinds


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write the cache entry atomically (a concurrent run may write the same entry)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: trace again next time
        pass


def _refuse(config: Any, reason: str) -> NormSurgeryError:
    """The one-paragraph refusal of a model type that could not be traced and proven."""
    return NormSurgeryError(
        f"model_type {config.model_type!r} has no declared family, and normsurgery could not derive one by tracing a "
        f"tiny random instance of its config: {reason}. Nothing was written. A family can be declared by hand in "
        "normsurgery/arch/families.py (`normsurgery adapt MODEL_TYPE` drafts one; see docs/architectures.md).")


def _covering_depth(signatures: list[str]) -> int:
    """The fewest leading blocks that hold one block of every kind (two at least, where there are two)."""
    first = {}
    for i, sig in enumerate(signatures):
        first.setdefault(sig, i)
    return max(max(first.values()) + 1, min(2, len(signatures)))


def _per_layer_keys(config: Any, depth: int) -> tuple[str, ...]:
    """The config keys prune re-indexes: every list with one value per block, every setting by block index, every
    list of block indices, and the keys whose format normsurgery knows (arch/layer_config.py)."""
    from normsurgery.adapt.tiny import layer_dicts, layer_lists
    from normsurgery.arch.layer_config import REINDEX, REINDEX_WITH_CONFIG, block_index_lists

    raw = text_view(config).to_dict()
    known = {k for k in (*REINDEX, *REINDEX_WITH_CONFIG) if raw.get(k) is not None}
    return tuple(sorted({*layer_lists(raw, depth), *layer_dicts(raw, depth), *block_index_lists(raw, depth), *known}))


def _per_block_slices(config: Any, draft: Draft, depth: int, trust_remote_code: bool) -> tuple[tuple[str, int], ...]:
    """The model-level tensors whose size along one axis is the depth times a fixed width (Gemma 4's per-block input
    embeddings), found by building the model on the meta device with `depth` blocks (a depth its config builds at)
    and with one block more or less. That block i reads the i-th slice only is what the prune's verification then
    checks on the real model."""
    from normsurgery.adapt.tiny import meta_shapes, tiny_like

    real = int(text_view(config).num_hidden_layers)
    other = depth + 1 if depth < real else depth - 1
    if not draft.model_others or other < 1:
        return ()
    try:
        a_shapes, b_shapes = (meta_shapes(tiny_like(config, d, shrink=False), trust_remote_code) for d in (depth, other))
    except Exception:  # noqa: BLE001 - a config that does not build at another depth: nothing is sliced
        return ()
    arch = draft.family().resolve(draft.config)
    found = []
    for name in draft.model_others:
        a, b = a_shapes.get(arch.module_path(name)), b_shapes.get(arch.module_path(name))
        if a is None or b is None or len(a) != len(b):
            continue
        axes = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(axes) == 1 and a[axes[0]] % depth == 0 and a[axes[0]] // depth * other == b[axes[0]]:
            found.append((name, axes[0]))
    return tuple(found)


def _refused(checks: list[Any]) -> dict[str, str]:
    """The operations whose own proof failed (fold, rmsnorm, crmsnorm, prune), each with the failing check's detail."""
    out = {}
    for op, check in PROVEN_BY.items():
        failed = [c for c in checks if c.name.startswith(check) and not c.passed]
        if failed:
            out[op] = f"its traced declaration failed the proof of {check}: {failed[0].detail.rstrip('.')}"
            if op == "prune" and "logit diff" in failed[0].detail:
                out[op] = ("removing a block changes what the blocks kept after it compute (their code uses their "
                           "own block index or the model's depth, e.g. a residual scaled by it), so no pruned model "
                           "equals the original with that block skipped; on a tiny instance, removing block 0 gave "
                           f"{failed[0].detail.rstrip('.')}")
    return out


def trace(config: Any, *, trust_remote_code: bool = False) -> tuple[Any, dict[str, str], float]:
    """Trace and prove `config`'s architecture: the draft (with its kinds of block), the operations its proof
    refused with why, and the seconds it took; a NormSurgeryError when nothing can be proven."""
    from normsurgery.adapt.discover import draft_config
    from normsurgery.adapt.prove import prove
    from normsurgery.adapt.signature import config_signatures
    from normsurgery.adapt.tiny import MAX_PARAMETERS, parameter_count, tiny_like
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES as ENCODERS,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as ENCODER_DECODERS,
    )

    start = time.perf_counter()
    if getattr(config, "is_encoder_decoder", False) or config.model_type in ENCODER_DECODERS:
        raise _refuse(config, "it is an encoder-decoder model type (its causal-LM class is the decoder alone); "
                              "normsurgery rewrites decoder-only language models")
    if config.model_type in ENCODERS:
        raise _refuse(config, "it is an encoder-only (masked language model) type; normsurgery rewrites decoder-only "
                              "language models")
    if not hasattr(text_view(config), "num_hidden_layers"):
        raise _refuse(config, "its config is a composite without a language model's config (text_config) that "
                              "normsurgery knows where to find")
    try:
        signatures = config_signatures(config, trust_remote_code)
    except Exception as err:  # model constructors fail in many ways on odd configs
        raise _refuse(config, f"transformers could not build it ({type(err).__name__}: {err})") from None
    depth = _covering_depth(signatures)
    problems: list[str] = []
    # the first blocks at the real widths, else with small widths, else (a config whose cut the model class refuses,
    # e.g. a rule tying blocks to the depth) the whole model where it is small enough
    attempts = [(depth, False), (depth, True)] + ([(len(signatures), False)] if len(signatures) > depth else [])
    for cut, shrink in attempts:
        try:
            tiny = tiny_like(config, cut, shrink=shrink, trust_remote_code=trust_remote_code)
            if not shrink and parameter_count(tiny, trust_remote_code) > MAX_PARAMETERS:
                continue
            if config_signatures(tiny, trust_remote_code) != signatures[:cut]:
                problems.append("a tiny instance's blocks differ from the real model's first blocks")
                continue
            draft = draft_config(tiny, trust_remote_code=trust_remote_code)
        except NormSurgeryError as err:
            problems.append(str(err))
            continue
        except Exception as err:  # a config the model class refuses at this size
            problems.append(f"{type(err).__name__}: {err}")
            continue
        if draft.problems:
            problems.append(draft.problems[0])
            continue
        draft.per_layer = _per_layer_keys(config, len(signatures))
        draft.per_block_slices = _per_block_slices(config, draft, cut, trust_remote_code)
        family = draft.family()
        try:
            checks = prove(family, tiny)
        except Exception as err:  # the proof's own set-up failed on this instance
            problems.append(f"its proof could not run ({type(err).__name__}: {err})")
            continue
        failed = [c for c in checks if not c.passed and c.name in STRUCTURAL]
        if failed:
            problems.append(f"its proof failed: {failed[0].name}: {failed[0].detail}")
            continue
        refused = _refused(checks)
        if getattr(config, "auto_map", None):
            refused.update({op: REMOTE_CONVERSION for op in ("dyt", "none", "prune-sublayers")})
        if any(layout.split for layout in (draft.layout, *draft.layouts)):
            refused.update({op: SPLIT_AT_LOAD for op in ("dyt", "none", "prune-sublayers") if op not in refused})
        _attach_kinds(draft, trust_remote_code)
        return draft, refused, time.perf_counter() - start
    raise _refuse(config, problems[-1] if problems else "no tiny instance could be built")
