"""Bad input gives one clear paragraph, a non-zero exit code, no traceback, and writes nothing."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file


def _copy(tiny_model, tmp_path, name="gpt2"):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model(name), dst)
    return dst


def _rewrite_header(path, mutate):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _shard(folder):
    """Re-save a single-file checkpoint as two shards with an index."""
    weights = load_file(folder / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in parts.items():
        save_file({k: weights[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: s for s, keys in parts.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def _case_missing_path(m, t):
    return t / "nope", "does not exist"


def _case_file_not_folder(m, t):
    (t / "f.txt").write_text("x")
    return t / "f.txt", "is a file"


def _case_no_config(m, t):
    (m / "config.json").unlink()
    return m, "no config.json"


def _case_malformed_config(m, t):
    (m / "config.json").write_text("{not json")
    return m, "not valid JSON"


def _case_config_not_object(m, t):
    (m / "config.json").write_text("[1, 2]")
    return m, "JSON object"


def _case_unknown_model_type(m, t):
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "bert"  # no declaration; traced at run time, and refused: not a decoder
    (m / "config.json").write_text(json.dumps(cfg))
    return m, "encoder-only"


def _case_truncated(m, t):
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return m, "truncated or corrupt"


def _case_header_claims_terabytes(m, t):
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**42) + data[8:])
    return m, "header claims"


def _case_offsets_past_end(m, t):
    def mutate(h):
        k = next(k for k in h if k != "__metadata__")
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + 10**9, e + 10**9]
    _rewrite_header(m / "model.safetensors", mutate)
    return m, "past the end"


def _case_overlapping(m, t):
    def mutate(h):
        ks = [k for k in h if k != "__metadata__" and h[k]["dtype"] == "F32" and h[k]["shape"] == [32]][:2]
        h[ks[1]]["data_offsets"] = h[ks[0]]["data_offsets"]
    _rewrite_header(m / "model.safetensors", mutate)
    return m, "overlap"


def _case_unknown_dtype(m, t):
    def mutate(h):
        k = next(k for k in h if k != "__metadata__")
        h[k]["dtype"] = "F7"
    _rewrite_header(m / "model.safetensors", mutate)
    return m, "unknown dtype"


def _case_missing_shard(m, t):
    _shard(m)
    (m / "model-00002-of-00002.safetensors").unlink()
    return m, "missing"


def _case_tensor_in_two_shards(m, t):
    _shard(m)
    extra = load_file(m / "model-00001-of-00002.safetensors")
    first = load_file(m / "model-00002-of-00002.safetensors")
    name = sorted(extra)[0]
    first[name] = extra[name]
    save_file(first, m / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    return m, "two shards"


def _case_wrong_shape(m, t):
    w = load_file(m / "model.safetensors")
    w["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 64)
    save_file(w, m / "model.safetensors", metadata={"format": "pt"})
    return m, "shape"


def _case_missing_tensor(m, t):
    w = load_file(m / "model.safetensors")
    del w["transformer.h.1.ln_2.bias"]
    save_file(w, m / "model.safetensors", metadata={"format": "pt"})
    return m, "missing 1 tensor"


def _case_nan(m, t):
    w = load_file(m / "model.safetensors")
    w["transformer.h.0.attn.c_proj.weight"][0, 0] = float("nan")
    save_file(w, m / "model.safetensors", metadata={"format": "pt"})
    return m, "NaN"


def _case_pickle_only(m, t):
    w = load_file(m / "model.safetensors")
    torch.save(w, m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return m, "--allow-pickle"


def _case_remote_code(m, t):
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (m / "config.json").write_text(json.dumps(cfg))
    return m, "--trust-remote-code"


def _case_no_weights(m, t):
    (m / "model.safetensors").unlink()
    return m, "no weights"


CASES = {name[len("_case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["inspect", "check", "fold", "convert", "prune", "diagnose"])
def test_bad_model_is_refused_clearly(case, command, tiny_model, cli, tmp_path):
    model = _copy(tiny_model, tmp_path)
    bad, expected = CASES[case](model, tmp_path)
    out = tmp_path / "out"
    args = {"inspect": ("inspect", bad), "check": ("check", tiny_model("gpt2"), bad),
            "fold": ("fold", bad, "-o", out), "convert": ("convert", bad, "--to", "crmsnorm", "-o", out),
            "prune": ("prune", bad, "--layers", "0", "-o", out), "diagnose": ("diagnose", bad)}[command]
    if command == "check" and case == "unknown_model_type":
        pytest.skip("check compares any two loadable models; the family is not needed")
    code, stdout, stderr = cli(*args)
    assert code == 2, (stdout, stderr)
    assert expected in " ".join(stderr.split()), stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert len(stderr.strip().splitlines()) <= 8  # one paragraph (rich wraps long lines)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.normsurgery-tmp-*"))


def test_pickle_accepted_with_allow_pickle(tiny_model, cli, tmp_path):
    model = _copy(tiny_model, tmp_path)
    _case_pickle_only(model, tmp_path)
    code, out, err = cli("inspect", model, "--allow-pickle", "--json")
    assert code == 0, err
    assert json.loads(out)["family"] == "gpt2"


def test_existing_output_needs_force(tiny_model, cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = cli("fold", tiny_model("llama"), "-o", out, "--no-verify")
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = cli("fold", tiny_model("llama"), "-o", out, "--no-verify", "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_output_that_is_a_file_is_refused(tiny_model, cli, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    code, _, err = cli("fold", tiny_model("llama"), "-o", out, "--force")
    assert code == 2 and "file" in err
    assert out.read_text() == "a file"


def test_unknown_convert_target(tiny_model, cli, tmp_path):
    code, _, err = cli("convert", tiny_model("gpt2"), "--to", "batchnorm", "-o", tmp_path / "out")
    assert code == 2 and "batchnorm" in err
