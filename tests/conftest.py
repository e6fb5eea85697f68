"""Shared pytest fixtures: tiny models of every family, built once per session, never downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from family_configs import FAMILY_CONFIGS  # noqa: E402
from fixtures import build_fixture  # noqa: E402

ALL_FIXTURES = sorted(FAMILY_CONFIGS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A function: fixture name (and dtype) -> path of its saved folder, built on first use."""
    import torch

    built: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def get(name: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (name, str(dtype))
        if key not in built:
            built[key] = build_fixture(name, root / f"{name}-{str(dtype).split('.')[-1]}", dtype=dtype)
        return built[key]

    return get


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in-process: args -> (exit code, stdout, stderr)."""
    from normsurgery.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["normsurgery", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory):
    """Call functions of tests/clean_worker.py in one long-lived interpreter where normsurgery is not importable."""
    import json
    import subprocess

    env = {**os.environ, "HF_HOME": str(tmp_path_factory.mktemp("hf-home")), "PYTHONPATH": ""}
    proc = subprocess.Popen([sys.executable, "-u", str(Path(__file__).parent / "clean_worker.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def call(name: str, *args: str) -> dict:
        proc.stdin.write(json.dumps({"call": name, "args": [str(a) for a in args]}) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        assert reply["ok"], reply["error"]
        return reply["result"]

    yield call
    proc.stdin.close()
    proc.wait(timeout=30)
