"""Faults during a write: SIGKILL or Ctrl-C at any moment leave no OUT (at most a clearly named temporary
folder, removed by the next run), and a full disk is reported as such."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normsurgery.checkpoint.writer import TMP_MARK, CheckpointWriter
from normsurgery.errors import NormSurgeryError


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory) -> Path:
    """A GPT-2 of about 50 MB in 5 MB shards, big enough that a write can be interrupted part-way."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from fixtures import tokenizer

    folder = tmp_path_factory.mktemp("medium") / "gpt2-medium-ish"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=64, vocab_size=320))
    model.save_pretrained(folder, max_shard_size="5MB")
    tokenizer().save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder) is not None
    return folder


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "normsurgery", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _temps(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}{TMP_MARK}*"))


@pytest.mark.parametrize("moment", ["temporary folder created", "first shard written", "last shard written"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_or_interrupted_write_leaves_no_output(sig, moment, medium_model, tmp_path):
    out = tmp_path / "out"
    proc = _start(["fold", str(medium_model), "-o", str(out), "--max-shard-size", "5MB"])
    conditions = {
        "temporary folder created": lambda: bool(_temps(out)),
        "first shard written": lambda: any(t.glob("*.safetensors") for t in _temps(out)),
        "last shard written": lambda: any((t / "config.json").exists() for t in _temps(out)),
    }
    reached = _wait_for(lambda: conditions[moment]() or proc.poll() is not None)
    if proc.poll() is not None:  # finished before the moment came: nothing to interrupt, and that is fine
        assert proc.returncode == 0 and out.exists()
        return
    assert reached
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if out.exists():  # the signal arrived after the rename: then the output is whole
        assert (out / "normsurgery.json").exists()
        return
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert _temps(out) == []  # Ctrl-C cleans up at once
    # SIGKILL leaves at most the temporary folder, which the next run removes before writing
    code = _start(["fold", str(medium_model), "-o", str(out), "--max-shard-size", "5MB", "--no-verify"]).wait(300)
    assert code == 0 and out.exists() and _temps(out) == []


def test_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    from normsurgery.checkpoint import shard_file

    def no_space(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_file.ShardFile, "write", no_space)
    out = tmp_path / "out"
    with pytest.raises(NormSurgeryError, match="is full; nothing was written"):
        with CheckpointWriter(out) as writer:
            writer.add("a", torch.ones(1000))
            writer.add("b", torch.ones(1000))
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_parent_is_refused_before_any_work(tiny_model, cli, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # running as root: permissions do not bind
            pytest.skip("the test user can write into read-only folders (root)")
        code, _, err = cli("fold", tiny_model("gpt2"), "-o", parent / "out")
        assert code == 2 and "read-only or no permission" in err
    finally:
        parent.chmod(0o755)
