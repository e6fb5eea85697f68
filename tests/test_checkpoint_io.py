"""Reader and writer on real tensors: sharding, index, dtypes, atomicity, determinism."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from normsurgery.checkpoint.reader import CheckpointReader
from normsurgery.checkpoint.writer import CheckpointWriter, parse_size
from normsurgery.errors import NormSurgeryError


def _write_model(model, out, **kw):
    with CheckpointWriter(out, **kw) as w:
        for name, tensor in model.state_dict().items():
            if name != "lm_head.weight":  # tied to the embedding
                w.add(name, tensor)
        w.write_json("config.json", model.config.to_dict())
    return out


def test_sharded_write_loads_with_transformers(tiny_model, tmp_path):
    src = tiny_model("gpt2")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    out = _write_model(model, tmp_path / "out", max_shard_size=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    reader = CheckpointReader.open(out)
    assert set(index["weight_map"]) == set(reader.names())
    assert index["metadata"]["total_size"] == reader.total_bytes
    assert reader.info("transformer.wte.weight").file.name in shards
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reader_keeps_dtype(tmp_path, dtype):
    t = torch.randn(5, 3).to(dtype)
    with CheckpointWriter(tmp_path / "m") as w:
        w.add("a", t)
        w.write_json("config.json", {"model_type": "gpt2"})
    reader = CheckpointReader.open(tmp_path / "m")
    assert reader.info("a").dtype == dtype and reader.get("a").dtype == dtype
    assert torch.equal(reader.get("a"), t)


def test_metadata_format_pt(tmp_path):
    from safetensors import safe_open

    with CheckpointWriter(tmp_path / "m", metadata={"normsurgery_operation": "fold"}) as w:
        w.add("a", torch.ones(2))
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "normsurgery_operation": "fold"}


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out) as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_stale_temp_folders_are_removed(tmp_path):
    stale = tmp_path / ".out.normsurgery-tmp-999999999"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("a", torch.ones(1))
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_byte_identical_outputs(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    a = _write_model(model, tmp_path / "a", max_shard_size=30_000)
    b = _write_model(model, tmp_path / "b", max_shard_size=30_000)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_duplicate_tensor_refused(tmp_path):
    with pytest.raises(ValueError):
        with CheckpointWriter(tmp_path / "m") as w:
            w.add("a", torch.ones(1))
            w.add("a", torch.ones(1))


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "five GB", "-1GB", "3XB"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(NormSurgeryError, match="5GB"):
        parse_size(text)


def test_reader_reads_in_disk_order(tiny_model):
    reader = CheckpointReader.open(tiny_model("gpt2"))
    names = reader.names()
    assert names == sorted(names, key=lambda n: reader.info(n).begin)  # on-disk order
    assert torch.equal(reader.get(names[0]), reader.get(names[0]))


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    """Shards are written tensor by tensor; the stock safetensors loader reads them, including a header that
    outgrows the reserved space and tensors of mixed dtypes and odd sizes (kept aligned by starting a new shard)."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    many = {f"layer.{i:04d}.a_rather_long_parameter_name_to_fill_the_header.weight": torch.randn(3, generator=gen)
            for i in range(1200)}  # a header of ~100 KB > the 64 KiB reserved
    mixed = {"odd.bf16": torch.randn(3, generator=gen).to(torch.bfloat16), "after.f32": torch.randn(5, generator=gen),
             "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False])}
    with CheckpointWriter(tmp_path / "big-header") as writer:
        for name, tensor in many.items():
            writer.add(name, tensor)
    loaded = load_file(tmp_path / "big-header" / "model.safetensors")
    assert loaded.keys() == many.keys() and all(torch.equal(loaded[k], many[k]) for k in many)
    with CheckpointWriter(tmp_path / "mixed") as writer:
        for name, tensor in mixed.items():
            writer.add(name, tensor)
    index = json.loads((tmp_path / "mixed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # the f32 after an odd bf16 tensor opened a new shard
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / "mixed" / shard))
    assert all(torch.equal(loaded[k], mixed[k]) and loaded[k].dtype == mixed[k].dtype for k in mixed)


def test_reader_refuses_a_shard_cut_short_after_its_header(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("gpt2"), folder)
    reader = CheckpointReader.open(folder)
    name = reader.names()[-1]
    size = (folder / "model.safetensors").stat().st_size
    with open(folder / "model.safetensors", "r+b") as f:  # keep the header, lose the last bytes after opening
        f.truncate(size - 4)
    with pytest.raises(NormSurgeryError, match="truncated"):
        reader.get(name)


def test_bytes_changed_on_disk_after_writing_are_caught_before_the_rename(tmp_path, monkeypatch):
    """Every shard is re-read after fsync and each tensor's checksum compared with the one taken when written."""
    from normsurgery.checkpoint import shard_file
    from normsurgery.errors import NormSurgeryError

    real_fsync = shard_file._fsync

    def flip_a_byte(path):
        real_fsync(path)
        with open(path, "r+b") as f:
            f.seek(-3, 2)
            byte = f.read(1)
            f.seek(-3, 2)
            f.write(bytes([byte[0] ^ 0xFF]))

    monkeypatch.setattr(shard_file, "_fsync", flip_a_byte)
    out = tmp_path / "out"
    with pytest.raises(NormSurgeryError, match="checksum mismatch"):
        with CheckpointWriter(out) as writer:
            writer.add("a", torch.arange(1000, dtype=torch.float32))
            writer.add("b", torch.ones(10, dtype=torch.bfloat16))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tensors_re_read_at_a_periodic_flush_are_checked_too(tmp_path, monkeypatch):
    """Tensors are re-read after each periodic flush (not only at the shard's end): a byte changed in the first
    tensor after the first flush is caught, and an intact run re-reads every tensor exactly once."""
    from normsurgery.checkpoint import shard_file
    from normsurgery.errors import NormSurgeryError

    monkeypatch.setattr(shard_file, "FLUSH_EVERY", 4000)
    real_verify = shard_file.verify_spans
    seen: list[str] = []

    def record(path, spans):
        seen.extend(s.name for s in spans)
        real_verify(path, spans)

    monkeypatch.setattr(shard_file, "verify_spans", record)
    with CheckpointWriter(tmp_path / "ok") as writer:
        for i in range(4):
            writer.add(f"t{i}", torch.full((1000,), float(i)))
    assert sorted(seen) == ["t0", "t1", "t2", "t3"]

    real_fsync, flipped = shard_file._fsync, []

    def flip_the_first_tensor(path):
        real_fsync(path)
        if not flipped:
            with open(path, "r+b") as f:
                f.seek(shard_file.HEADER_RESERVE + 5)
                byte = f.read(1)
                f.seek(shard_file.HEADER_RESERVE + 5)
                f.write(bytes([byte[0] ^ 0xFF]))
            flipped.append(path)

    monkeypatch.setattr(shard_file, "_fsync", flip_the_first_tensor)
    with pytest.raises(NormSurgeryError, match="tensor t0 reads back .*checksum mismatch"):
        with CheckpointWriter(tmp_path / "bad") as writer:
            for i in range(4):
                writer.add(f"t{i}", torch.full((1000,), float(i)))
    assert not (tmp_path / "bad").exists()


def test_re_read_spans_many_mapping_windows_from_unaligned_offsets(tmp_path, monkeypatch):
    """The re-read maps a shard a window at a time: a tensor that starts mid-page and spans several windows
    verifies intact, and a byte changed in its last window, or a file cut short, is a checksum mismatch."""
    import mmap

    from normsurgery.checkpoint import shard_file
    from normsurgery.checkpoint.raw import as_raw
    from normsurgery.errors import NormSurgeryError

    monkeypatch.setattr(shard_file, "VERIFY_WINDOW", mmap.ALLOCATIONGRANULARITY)
    data = torch.arange(5 * mmap.ALLOCATIONGRANULARITY // 4 + 3, dtype=torch.float32)
    raw = as_raw(data).data
    path = tmp_path / "shard"
    path.write_bytes(b"x" * 13 + bytes(raw) + b"tail")
    span = shard_file.Span("t", 13, len(raw), shard_file.checksum(raw))
    shard_file.verify_spans(path, [span, shard_file.Span("empty", 13, 0, shard_file.checksum(b""))])

    with open(path, "r+b") as f:
        f.seek(13 + len(raw) - 2)
        f.write(b"\xff")
    with pytest.raises(NormSurgeryError, match="tensor t reads back .*checksum mismatch"):
        shard_file.verify_spans(path, [span])
    path.write_bytes(b"x" * 13 + bytes(raw)[:-1])
    with pytest.raises(NormSurgeryError, match="checksum mismatch"):
        shard_file.verify_spans(path, [span])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_nonfinite_values_are_found_in_stored_bytes_as_torch_finds_them(dtype, monkeypatch):
    """The torch-free check (exponent bits on the stored bytes) counts NaN and inf exactly as torch.isfinite does,
    in any chunk, and passes every finite value (largest, smallest subnormal, -0)."""
    from normsurgery.checkpoint import finite
    from normsurgery.checkpoint.raw import as_raw

    monkeypatch.setattr(finite, "CHUNK_ELEMENTS", 7)
    info = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, 1.0, -2.5], dtype=torch.float32).to(dtype).repeat(10)
    edges = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4], dtype=torch.float64).to(dtype)
    clean = torch.cat([values, edges])
    assert finite.nonfinite_count(as_raw(clean)) == 0
    for bad in (float("nan"), float("inf"), float("-inf")):
        rows = clean.view(torch.uint8).clone().view(len(clean), -1)  # set elements bytewise: no float8 indexing
        rows[[3, 30]] = torch.tensor([bad]).to(dtype).view(torch.uint8)
        dirty = rows.view(-1).view(dtype)
        expected = int((~torch.isfinite(dirty.float() if dirty.element_size() == 1 else dirty)).sum())
        assert expected == 2 or dtype == torch.float8_e4m3fn  # e4m3fn has no inf: it saturates or becomes NaN
        assert finite.nonfinite_count(as_raw(dirty)) == expected
