"""Open a model folder for running: the remote-code gate, the tokenizer, and the model itself, either lazily over
its checkpoint (the engine's default, bounded memory) or whole in memory (what training needs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from normsurgery.checkpoint.reader import CheckpointReader
from normsurgery.engine.buffers import release_buffers
from normsurgery.engine.lazy_model import LazyModel, Rows, UnmatchedWeights, lazy_model, model_config
from normsurgery.engine.resources import Runtime
from normsurgery.engine.weights import CheckpointWeights, WeightMap
from normsurgery.errors import NormSurgeryError

if TYPE_CHECKING:
    from normsurgery.arch.spec import Family


def own_modeling_code(folder: Path) -> bool:
    """True when every Python file in `folder` is byte-identical to modeling code normsurgery ships."""
    from normsurgery.export.config import MODELING_FILE

    ours = {hashlib.sha256(MODELING_FILE.read_bytes()).hexdigest()}
    files = list(folder.glob("*.py"))
    return bool(files) and all(hashlib.sha256(p.read_bytes()).hexdigest() in ours for p in files)


def needs_remote_code(folder: Path) -> bool:
    """Whether the folder's config registers its own modeling code through `auto_map`."""
    try:
        return "auto_map" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def remote_code_allowed(folder: Path, trust_remote_code: bool) -> bool:
    """Whether loading `folder` runs its own code: refused unless it is normsurgery's own export or trusted."""
    remote = needs_remote_code(folder)
    if remote and not (trust_remote_code or own_modeling_code(folder)):
        raise NormSurgeryError(
            f"{folder} carries modeling code (auto_map in config.json) that normsurgery did not write. Loading it "
            "runs that code; pass --trust-remote-code if you trust it."
        )
    return remote


def load_model(folder: Path, dtype: torch.dtype, *, trust_remote_code: bool = False, allow_pickle: bool = False,
               device: torch.device | None = None) -> torch.nn.Module:
    """The whole model in memory (for training, where every weight must be there), in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    remote = remote_code_allowed(folder, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=remote,
                                                     use_safetensors=None if allow_pickle else True)
    except Exception as err:
        raise NormSurgeryError(f"transformers could not load {folder}: {err}. Check that the folder is complete.") from None
    if device is not None and device.type != "cpu":
        model = model.to(device)
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has no tokenizer files or they do not load.

    (transformers 5 builds an empty tokenizer for a folder without any, which would tokenize to nothing.)
    """
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception:
        return None


def _family_of(config: Any) -> tuple[Family | None, Any]:
    """A config's family and the config that resolves it: an export's stock base config (its modules keep the stock
    names), else the config itself; declared, or traced and proven; none for one normsurgery cannot know."""
    from normsurgery.arch import family_of

    if isinstance(getattr(config, "base_config", None), dict) and hasattr(config, "to_base"):
        config = config.to_base()
    try:
        return family_of(config), config
    except NormSurgeryError:  # a model normsurgery cannot picture still runs, with the engine's defaults
        return None, config


def stored_layout(raw_config: dict[str, Any], config: Any) -> tuple[dict[str, str], dict[str, Any], tuple[str, ...]]:
    """What the engine needs to know of how a checkpoint is stored, from its family (none for an unknown one):
    on-disk -> in-memory renames (an export's own, from its wrapped config's surgery, else its family's, e.g.
    GPT-NeoX); the parameters transformers builds at load from several stored tensors (stacked experts,
    Architecture.fused, and concatenations, Architecture.concatenated) or splits off one (Architecture.split, as
    Rows); and the modules whose parameters an
    ancestor's code reads (Family.streamed_by_parent)."""
    family, base = _family_of(config)
    if raw_config.get("model_type") == "normsurgery":
        renames = dict((raw_config.get("surgery") or {}).get("key_mapping") or {})
    else:
        renames = dict(family.key_renames) if family is not None else {}
    if family is None:
        return renames, {}, ()
    arch = family.resolve(base)
    split = {part: Rows(stored, parts=parts, index=i) for stored, parts in arch.split.items()
             for i, part in enumerate(parts)}
    return renames, {**arch.fused, **arch.concatenated, **split}, family.streamed_by_parent


class OpenModel:
    """A model folder opened for the engine: its reader (kept open while the model runs) and its lazy model."""

    def __init__(self, folder: Path, runtime: Runtime, *, dtype: torch.dtype = torch.float32, passes: int = 1,
                 trust_remote_code: bool = False, allow_pickle: bool = False, weights: WeightMap | None = None,
                 config_folder: Path | None = None) -> None:
        """`weights` replaces the folder's own tensors (e.g. a rewrite computed on the fly over another
        checkpoint); `config_folder` is where config and code are read from (default `folder`)."""
        config_folder = config_folder or folder
        remote = remote_code_allowed(config_folder, trust_remote_code)
        self.reader = None if weights is not None else CheckpointReader.open(
            folder, allow_pickle=allow_pickle, trust_remote_code=True)
        try:
            config = model_config(config_folder, trust_remote_code=remote)
            raw = json.loads((config_folder / "config.json").read_text())
            weights = weights if weights is not None else CheckpointWeights(self.reader)
            try:
                renames, fused, by_parent = stored_layout(raw, config)
                self.lazy = lazy_model(config, weights, runtime, dtype=dtype, passes=passes, trust_remote_code=remote,
                                       key_mapping=renames, fused=fused, by_parent=by_parent)
            except UnmatchedWeights as unmatched:
                if self.reader is None:
                    raise NormSurgeryError(f"the rewritten tensors do not match the model's names ({unmatched}); "
                                           "this is a bug in normsurgery, please report it.") from None
                model = load_model(folder, dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                   device=runtime.device)
                size = sum(p.numel() * p.element_size() for p in model.parameters())
                self.lazy = LazyModel(model, runtime, size, 0, 0, 0, 0,
                                      [f"loaded whole: its tensor names need transformers' own renaming ({unmatched})"])
        except BaseException:
            self.close()
            raise

    @property
    def model(self) -> torch.nn.Module:
        return self.lazy.model

    def close(self) -> None:
        """Release the checkpoint's file handles and the spare widening buffers."""
        release_buffers()
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def __enter__(self) -> "OpenModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
