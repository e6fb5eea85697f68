"""`normsurgery run`: shipped recipes run on tiny fixtures; malformed recipes exit 2 with their line; failing
thresholds exit 1 and say which; dry runs touch nothing; outputs record the recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest

RECIPES = Path(__file__).parent.parent / "recipes"
# shipped recipe -> tiny fixture standing in for its model (the test-only override)
STAND_INS = {
    "gpt2-shakespeare-rmsnorm.yaml": "gpt2",
    "gpt2-shakespeare-fold-crmsnorm.yaml": "gpt2",
    "gpt2-shakespeare-remove-ln.yaml": "gpt2",
    "gpt2-shakespeare-dyt.yaml": "gpt2",
    "smollm2-prune-heal.yaml": "smollm3",
    "hub-qwen2.5-fold.yaml": "qwen2",
}


def test_every_shipped_recipe_has_a_stand_in():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(STAND_INS)


# recipes whose gates compare a rewrite that changes the function (fine-tunes, pruning) with its original: the
# thresholds are set for the real models, and a tiny random stand-in may miss them (exit 1, reported), but every
# step must run; the exact recipes must pass on any model
QUALITY_GATED = {"gpt2-shakespeare-remove-ln.yaml", "gpt2-shakespeare-dyt.yaml", "smollm2-prune-heal.yaml"}
# the fine-tune budgets are recipe variables; a few steps prove the recipe runs
SHORT = ("--set", "gap=1", "--set", "heal=3")


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_shipped_recipe_runs_on_a_tiny_fixture(name, tiny_model, cli, tmp_path):
    """Each shipped recipe runs as a fresh clone runs it: its output folder's parents (`runs/` by default) do not
    exist yet and are created."""
    runs = tmp_path / "fresh" / "runs"
    code, stdout, err = cli("run", RECIPES / name, "--model", tiny_model(STAND_INS[name]), "--set", f"out={runs}",
                            *SHORT, "--json", "--junit", tmp_path / "report.xml")
    report = json.loads(stdout)
    statuses = [s["status"] for s in report["steps"]]
    if name in QUALITY_GATED and code == 1:
        failed = next(s for s in report["steps"] if s["status"] == "failed")
        assert failed["kind"] in ("eval", "check") and failed["failures"], failed
        assert statuses[-1] == "skipped" and "error" not in statuses
        assert not list(runs.glob(".*recipe-work"))
        return
    assert code == 0, (err, [(s["label"], s["failures"], s["error"]) for s in report["steps"]])
    assert all(s == "passed" for s in statuses)
    out = Path(report["output"])
    assert out.parent == runs and (out / "config.json").exists()
    assert not list(runs.glob(".*recipe-work"))
    card = (out / "README.md").read_text()
    assert report["recipe_sha256"] in card and "## Recipe" in card
    assert json.loads((out / "normsurgery.json").read_text())["recipe"]["recipe_sha256"] == report["recipe_sha256"]
    suite = ElementTree.parse(tmp_path / "report.xml").getroot()
    assert suite.get("failures") == "0" and len(suite.findall(".//testcase")) == len(report["steps"])


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("model: m\noutput: o\nsteps:\n  - fold: {}\n  - convert: {to: rmsnorm\n", r"line \d+: not valid YAML"),
    ("model: m\noutput: o\nsteps:\n  - fold: {}\n  - squash: {}\n", "line 5: unknown step 'squash'"),
    ("model: m\noutput: o\nsteps:\n  - prune:\n      remove: many\n", r"line 5: steps\[1\] prune.remove: .*integer"),
    ("output: o\nsteps:\n  - fold: {}\n", "line 1: model: required key is missing"),
    ("model: m\noutput: o\nsteps:\n  - convert: {to: rmsnorm, colour: red}\n", r"line 4: steps\[1\] convert.colour: unknown key"),
    ("model: m\noutput: ${nowhere}/o\nsteps:\n  - fold: {}\n", r"\$\{nowhere\} is not defined"),
    ("model: m\noutput: o\nsteps:\n  - check: {against: folded}\n", "compares against 'folded'"),
    ("model: m\noutput: o\nsteps:\n  - convert: {to: dyt}\n  - fold: {}\n", "only check, eval and export can follow"),
    ("model: m\noutput: o\nsteps:\n  - prune: {what: attention, layers: [1], export: stock}\n  - heal: {steps: 3}\n",
     "follows a sub-layer prune"),
    ("model: m\noutput: o\nsteps:\n  - convert: {to: none, export: inert}\n", r"line 4: steps\[1\] convert.export: "),
    ("model: m\noutput: o\nsteps:\n  - prune: {what: mlp, layers: [0], export: inert}\n",
     r"line 4: steps\[1\] prune.export: "),
    ("model: m\noutput: o\nsteps: []\n", "steps"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_malformed_recipes_exit_2_with_the_line(text, message, cli, tmp_path):
    code, _, err = cli("run", _recipe(tmp_path, text))
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_a_failing_threshold_exits_1_and_says_which(tiny_model, cli, tmp_path):
    recipe = _recipe(tmp_path, "model: m\noutput: ${out}/o\nsteps:\n  - prune: {layers: [0]}\n"
                               "  - check: {against: original}\n  - fold: {}\n")
    code, stdout, _ = cli("run", recipe, "--model", tiny_model("llama"), "--set", f"out={tmp_path}", "--json",
                          "--markdown", tmp_path / "summary.md")
    report = json.loads(stdout)
    assert code == 1 and [s["status"] for s in report["steps"]] == ["passed", "failed", "skipped", "skipped"]
    assert "top-1 agreement" in "; ".join(report["steps"][1]["failures"])
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*recipe-work"))
    assert "❌ failed" in (tmp_path / "summary.md").read_text()


def test_dry_run_touches_nothing(tiny_model, cli, tmp_path):
    code, stdout, err = cli("run", RECIPES / "gpt2-shakespeare-fold-crmsnorm.yaml", "--model", tiny_model("gpt2"),
                            "--set", f"out={tmp_path}", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    assert [s["what"] for s in plan["steps"]] == ["fold", "check against original", "convert --to crmsnorm",
                                                  "check against folded", "check against original", "export"]
    assert plan["steps"][-1]["writes"] == str(tmp_path / "gpt2-shakespeare-fold-crmsnorm")
    assert list(tmp_path.iterdir()) == []
