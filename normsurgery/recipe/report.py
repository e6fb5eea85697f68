"""A recipe run's report as JSON, JUnit XML (one test case per step) and Markdown (e.g. GitHub's step summary)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from normsurgery.recipe.runner import StepResult


def as_json(recipe_path: str, recipe_hash: str, output: str, results: list[StepResult], exit_code: int) -> dict[str, Any]:
    """The whole run as plain data."""
    return {"recipe": recipe_path, "recipe_sha256": recipe_hash, "output": output, "exit_code": exit_code,
            "passed": exit_code == 0, "steps": [asdict(r) for r in results]}


def _figures(figures: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k} {one(x)}" for k, x in v.items())
        return str(v)
    return "; ".join(f"{k}: {one(v)}" for k, v in figures.items())


def junit(recipe_path: str, results: list[StepResult]) -> str:
    """JUnit XML: one testsuite for the recipe, one testcase per step (failure, error or skipped)."""
    failures = sum(r.status == "failed" for r in results)
    errors = sum(r.status == "error" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    total = sum(r.seconds for r in results)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuites name="normsurgery run" tests="{len(results)}" failures="{failures}" errors="{errors}" '
             f'skipped="{skipped}" time="{total:.3f}">',
             f'  <testsuite name={quoteattr(recipe_path)} tests="{len(results)}" failures="{failures}" '
             f'errors="{errors}" skipped="{skipped}" time="{total:.3f}">']
    for r in results:
        name = quoteattr(f"{r.index:02d} {r.label}")
        lines.append(f'    <testcase classname={quoteattr(recipe_path)} name={name} time="{r.seconds:.3f}">')
        if r.status == "failed":
            message = "; ".join(r.failures)
            lines.append(f"      <failure message={quoteattr(message)}>{escape(message)}</failure>")
        elif r.status == "error":
            lines.append(f"      <error message={quoteattr(r.error or '')}>{escape(r.error or '')}</error>")
        elif r.status == "skipped":
            lines.append('      <skipped message="an earlier step did not pass"/>')
        if r.figures:
            lines.append(f"      <system-out>{escape(_figures(r.figures))}</system-out>")
        lines.append("    </testcase>")
    lines += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(lines)


MARK = {"passed": "✅ passed", "failed": "❌ failed", "error": "⛔ error", "skipped": "⏭ skipped"}


def markdown(recipe_path: str, recipe_hash: str, output: str, results: list[StepResult], exit_code: int) -> str:
    """A Markdown table of the steps with their status, time, peak memory and figures."""
    verdict = "passed" if exit_code == 0 else ("failed" if exit_code == 1 else "could not run")
    lines = [f"## normsurgery run `{recipe_path}`: {verdict}", "",
             f"Recipe sha256 `{recipe_hash[:16]}…`, output `{output}`.", "",
             "| # | step | status | seconds | peak RSS GB | figures |", "|---|---|---|---|---|---|"]
    for r in results:
        rss = f"{r.peak_rss_gb:.2f}" if r.peak_rss_gb is not None else ""
        detail = _figures(r.figures) + ("; " if r.figures and (r.failures or r.error) else "")
        detail = (detail + "; ".join(r.failures) + (r.error or "")).replace("|", "\\|")
        lines.append(f"| {r.index} | {r.label} | {MARK[r.status]} | {r.seconds:.1f} | {rss} | {detail} |")
    return "\n".join(lines) + "\n"
