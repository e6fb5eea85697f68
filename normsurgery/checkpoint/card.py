"""The model card (README.md) of a normsurgery output: where it came from, what was done, how well it was checked."""

from __future__ import annotations

from typing import Any

from normsurgery.checkpoint.resolve import HUB_ID

_CHECK_ROWS = (
    ("max_abs_logit_diff", "max \\|logit diff\\|", ".3g"),
    ("rel_logit_diff", "max \\|logit diff\\| / logit scale", ".3g"),
    ("mean_kl", "mean KL (nats)", ".3g"),
    ("top1_agreement", "top-1 agreement", ".4%"),
    ("ppl_original", "perplexity, original", ".4f"),
    ("ppl_candidate", "perplexity, this model", ".4f"),
)


def _versions() -> str:
    """The versions that made the output, from the installed packages' metadata (importing them takes seconds)."""
    from importlib.metadata import version

    import normsurgery

    return f"normsurgery {normsurgery.__version__}, torch {version('torch')}, transformers {version('transformers')}"


def render_model_card(source: str, operations: list[dict[str, Any]], checks: dict[str, Any] | None,
                      extra: dict[str, Any] | None = None) -> str:
    """Deterministic Markdown (no timestamps): identical runs give identical cards."""
    front = ["---", "library_name: transformers", "tags:", "- normsurgery"]
    if HUB_ID.match(source) and "/" in source:
        front.append(f"base_model: {source}")
    lines = front + ["---", "", f"# {source}, rewritten by normsurgery", "", f"Source: `{source}`", "",
                     "## Operations", ""]
    if operations:
        keys = list(dict.fromkeys(k for op in operations for k in op))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(op.get(k, "")) for k in keys) + " |" for op in operations]
    if checks:
        lines += ["", "## Measured check", "",
                  f"Against the source on {checks.get('num_sequences')} x {checks.get('sequence_length')} tokens "
                  f"({checks.get('tokens')}), computed in {checks.get('dtype')}: "
                  f"**{'passed' if checks.get('passed', True) else 'FAILED'}**.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {format(checks[key], fmt)} |" for key, label, fmt in _CHECK_ROWS if key in checks]
    for key, value in (extra or {}).items():
        lines += ["", f"## {key.replace('_', ' ').capitalize()}", ""]
        lines += [f"- {v}" for v in value] if isinstance(value, list) else [str(value)]
    lines += ["", f"Made with {_versions()}.", ""]
    return "\n".join(lines)
