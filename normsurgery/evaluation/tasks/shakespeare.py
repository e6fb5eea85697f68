"""Documents of the offline tasks, built deterministically from the held-out plays (never read by calibration
or fine-tuning; see normsurgery/data/shakespeare_splits.json).

Each task picks its items at evenly spaced positions through the five held-out plays, so that every play
contributes and a `--limit` keeps the spread of the first items small but still diverse:

- `ppl_docs`: passages of whole speeches (at least 1,600 characters) for rolling perplexity;
- `lastword_docs`: LAMBADA-style items, a passage of whole speeches whose last word (3+ letters) is to be
  predicted from the (at most 350) characters before it;
- `nextline_docs`: four lines of a verse speech, then the true next line among four candidates whose three
  distractors are lines of similar length from elsewhere in the held-out plays (a seeded choice). Telling
  the true line needs syntax, sense and metre across the line break; chance is 25%.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

PPL_DOCS = 20
LASTWORD_DOCS = 128
NEXTLINE_DOCS = 64
LASTWORD_CONTEXT = 350  # characters at most, cut at a line start: the default suite must run in minutes on a CPU
CONTEXT_LINES = 4


@lru_cache(maxsize=1)
def speeches() -> tuple[tuple[str, ...], ...]:
    """Every speech of the held-out text as its lines, the first being 'SPEAKER:'."""
    from normsurgery.reference.text import shakespeare_text

    blocks = [b.strip("\n").split("\n") for b in shakespeare_text("heldout").split("\n\n")]
    return tuple(tuple(b) for b in blocks if len(b) > 1 and b[0].endswith(":") and not b[0].startswith("["))


def evenly(items: list[Any], n: int) -> list[Any]:
    """`n` items at evenly spaced positions (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def passages(min_chars: int) -> list[str]:
    """Consecutive whole speeches joined until each passage has at least `min_chars` characters."""
    out, current = [], []
    for speech in speeches():
        current.append("\n".join(speech))
        if sum(len(s) for s in current) >= min_chars:
            out.append("\n\n".join(current))
            current = []
    return out


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def ppl_rows() -> list[dict[str, Any]]:
    """Rolling-perplexity documents."""
    return [{"text": p} for p in evenly(passages(1600), PPL_DOCS)]


LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z][A-Za-z']{2,})[^A-Za-z']*$", re.DOTALL)


def tail(text: str, limit: int) -> str:
    """At most the last `limit` characters of `text`, starting at a line start (or, failing that, a word)."""
    if len(text) <= limit:
        return text
    window = text[-limit:]
    for sep in ("\n", " "):
        cut = window.find(sep)
        if 0 <= cut < limit // 2:
            return window[cut + 1 :]
    return window


def lastword_rows() -> list[dict[str, Any]]:
    """LAMBADA-style items: the context and the passage's last word."""
    rows = []
    for passage in passages(300):
        match = LAST_WORD.match(passage)
        if match:
            rows.append({"context": tail(match["context"], LASTWORD_CONTEXT), "target": match["word"]})
    return evenly(rows, LASTWORD_DOCS)


def nextline_rows() -> list[dict[str, Any]]:
    """Next-line choices: context, four candidate lines, the index of the true one."""
    lines = [line for speech in speeches() for line in speech[1:] if not line.startswith("[")]
    candidates = []
    for speech in speeches():
        verse = [line for line in speech[1:] if not line.startswith("[")]
        if len(verse) > CONTEXT_LINES and all(len(line) >= 20 for line in verse[: CONTEXT_LINES + 1]):
            candidates.append((speech[0], verse[:CONTEXT_LINES], verse[CONTEXT_LINES]))
    rows = []
    for i, (speaker, context, true_line) in enumerate(evenly(candidates, NEXTLINE_DOCS)):
        rng = random.Random(i)
        similar = [x for x in lines if abs(len(x) - len(true_line)) <= 0.3 * len(true_line) and x != true_line]
        choices = rng.sample(similar, 3) + [true_line]
        rng.shuffle(choices)
        rows.append({"context": "\n".join([speaker, *context]), "choices": choices, "label": choices.index(true_line)})
    return rows


def ppl_docs(**_: Any) -> Any:
    """lm-eval `custom_dataset` for shakespeare_ppl."""
    return _dataset(ppl_rows())


def lastword_docs(**_: Any) -> Any:
    """lm-eval `custom_dataset` for shakespeare_lastword."""
    return _dataset(lastword_rows())


def nextline_docs(**_: Any) -> Any:
    """lm-eval `custom_dataset` for shakespeare_nextline."""
    return _dataset(nextline_rows())
