"""`normsurgery eval`: lm-eval really runs (not mocked) on tiny fixtures with the shipped offline tasks."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from normsurgery.evaluation.tasks import OFFLINE_TASKS
from normsurgery.evaluation.tasks import shakespeare as docs
from normsurgery.reference.text import shakespeare_text


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))


def test_items_come_from_the_heldout_plays_only():
    heldout = shakespeare_text("heldout")
    ppl, last, nxt = docs.ppl_rows(), docs.lastword_rows(), docs.nextline_rows()
    assert (len(ppl), len(last), len(nxt)) == (docs.PPL_DOCS, docs.LASTWORD_DOCS, docs.NEXTLINE_DOCS)
    speeches = lambda text: text.split("\n\n")  # noqa: E731 (stage directions between speeches are left out)
    assert all(s in heldout for r in ppl for s in speeches(r["text"]))
    assert all(s in heldout for r in last for s in speeches(r["context"]))
    assert all(any(speeches(r["context"])[-1] + sep + r["target"] in heldout for sep in " \n") for r in last)
    assert all(x in heldout for r in nxt for x in r["context"].split("\n") + r["choices"])
    assert all(len(set(r["choices"])) == 4 and r["choices"][r["label"]] for r in nxt)
    assert docs.nextline_rows() == nxt  # deterministic


def test_every_offline_task_gives_finite_metrics(tiny_model, cli):
    code, out, err = cli("eval", tiny_model("gpt2"), "--limit", "3", "--json")
    assert code == 0, err
    tasks = json.loads(out)["candidate"]["tasks"]
    assert [t["task"] for t in tasks] == list(OFFLINE_TASKS)
    for t in tasks:
        assert t["samples"] == 3 and t["tokens"] > 0 and t["tokens_per_second"] > 0
        assert t["metrics"] and all(math.isfinite(v) for v in t["metrics"].values())


def test_model_compared_with_itself_has_zero_deltas(tiny_model, cli, tmp_path):
    summary = tmp_path / "summary.md"
    code, out, err = cli("eval", tiny_model("llama"), "--compare", tiny_model("llama"), "--limit", "3", "--json",
                         "--max-ppl-increase", "0", "--max-acc-drop", "0", "--markdown", summary)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["failures"] == []
    assert all(m["delta"] == 0 for m in report["metrics"])
    assert "PASSED" in summary.read_text() and "delta" in summary.read_text()


def test_perturbed_model_fails_a_tight_threshold(tiny_model, cli, tmp_path):
    original = tiny_model("llama")
    worse = tmp_path / "worse"
    shutil.copytree(original, worse)
    weights = load_file(worse / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    weights = {k: v + 0.5 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v for k, v in weights.items()}
    save_file(weights, worse / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli("eval", worse, "--compare", original, "--tasks", "shakespeare_ppl", "--limit", "3",
                       "--max-ppl-increase", "0.0001")
    assert code == 1 and "Traceback" not in err
    assert "shakespeare_ppl word_perplexity rose" in err or "shakespeare_ppl byte_perplexity rose" in err


def test_record_adds_the_results_to_a_normsurgery_output(tiny_model, cli, tmp_path):
    out = tmp_path / "folded"
    assert cli("fold", tiny_model("gpt2"), "-o", out)[0] == 0
    code, _, err = cli("eval", out, "--tasks", "shakespeare_nextline", "--limit", "2", "--record")
    assert code == 0, err
    assert "## Evaluation" in (out / "README.md").read_text()
    assert json.loads((out / "normsurgery.json").read_text())["evaluations"][0]["candidate"]["tasks"][0]["samples"] == 2
    code, _, err = cli("eval", tiny_model("gpt2"), "--tasks", "shakespeare_nextline", "--limit", "1", "--record")
    assert code == 2 and "no normsurgery.json" in err


@pytest.mark.parametrize("tasks, message", [
    ("no_such_task", "unknown lm-eval task(s): no_such_task"),
    ("hellaswag", "out of reach"),
])
def test_bad_tasks_fail_before_loading(tiny_model, cli, tasks, message):
    code, _, err = cli("eval", tiny_model("gpt2"), "--tasks", tasks)
    assert code == 2 and message in err and "shakespeare_ppl" in err and "Traceback" not in err


def test_missing_eval_extra_is_explained(tiny_model, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = cli("eval", tiny_model("gpt2"))
    assert code == 2 and "pip install 'normsurgery[eval]'" in err


def test_unavailable_device_is_explained(tiny_model, cli):
    code, _, err = cli("eval", tiny_model("gpt2"), "--device", "cuda:7", "--limit", "1")
    assert code == 2 and "--device cuda:7" in err and "Traceback" not in err


def test_thresholds_need_an_original(tiny_model, cli):
    code, _, err = cli("eval", tiny_model("gpt2"), "--max-acc-drop", "0.01")
    assert code == 2 and "--compare" in err


@pytest.mark.parametrize("task, separator", [("shakespeare_lastword", " "), ("shakespeare_nextline", "\n")])
def test_requests_score_the_intended_continuation(task, separator):
    """What lm-eval scores is the context, then the separator and the target: no word glued to the context."""
    from normsurgery.evaluation.runner import task_manager

    loaded = task_manager([task]).load([task])["tasks"][task]
    loaded.build_all_requests(rank=0, world_size=1, limit=5)
    rows = docs.lastword_rows() if task == "shakespeare_lastword" else docs.nextline_rows()
    for inst in loaded.instances:
        context, continuation = inst.args
        row = rows[inst.doc_id]
        assert context == row["context"] and continuation.startswith(separator) and not continuation.startswith(separator * 2)
        assert continuation[1:] in ([row["target"]] if "target" in row else row["choices"])


def test_eval_outside_a_git_repository_prints_no_git_error(tiny_model, tmp_path):
    """lm-eval asks git for the working folder's commit; outside a repository git's "fatal: not a git repository"
    must not reach the user's terminal (it did, twice per recipe eval step)."""
    import os
    import subprocess

    work = tmp_path / "not-a-repo"
    work.mkdir()
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # git stops looking above tmp_path
    proc = subprocess.run([sys.executable, "-m", "normsurgery", "eval", str(tiny_model("gpt2")), "--tasks",
                           "shakespeare_ppl", "--limit", "2"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "not a git repository" not in proc.stderr + proc.stdout
