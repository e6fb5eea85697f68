"""Turn a MODEL argument into a local folder: a path, a reference model name, or a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from normsurgery.errors import NormSurgeryError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template*"]


def _reference_path(name: str) -> Path | None:
    try:
        from normsurgery.reference import is_reference_name, reference_path
    except ImportError:
        return None
    return reference_path(name) if is_reference_name(name) else None


def resolve_model(spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The local folder for `spec`: an existing path, a built reference model, or a hub snapshot."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    reference = _reference_path(spec)
    if reference is not None:
        return reference
    looks_local = spec.startswith((".", "~", "/")) or spec.count("/") > 1
    if looks_local or not HUB_ID.match(spec):
        raise NormSurgeryError(f"{spec} does not exist. Give a model folder, a reference model name (see `normsurgery models`) or a hub id.")
    return _download(spec, allow_pickle=allow_pickle)


def _download(repo_id: str, *, allow_pickle: bool) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = (
        f"could not find a local folder, reference model or reachable hub repo named {repo_id!r}: {{why}}. Pass a "
        "local folder (config.json + *.safetensors) or one of the reference models (`normsurgery models`)."
    )
    if offline:
        raise NormSurgeryError(hint.format(why="the hub is off (HF_HUB_OFFLINE is set)"))
    try:
        from huggingface_hub import snapshot_download

        patterns = HUB_FILES + (["pytorch_model*.bin", "pytorch_model.bin.index.json"] if allow_pickle else [])
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        raise NormSurgeryError(hint.format(why=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")) from None
