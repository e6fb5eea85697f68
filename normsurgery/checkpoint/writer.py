"""Write a Hugging Face model folder atomically: shards fill as tensors arrive, and the folder appears only
when everything is written and re-read, by renaming a temporary folder beside OUT."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from normsurgery.checkpoint.safetensors_header import DTYPES, read_header
from normsurgery.errors import NormSurgeryError

SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
TMP_MARK = ".normsurgery-tmp-"
HEADER_RESERVE = 64 * 1024  # bytes kept for a shard's header; data follows, written as tensors arrive
CHUNK = 64 * 2**20  # read size when re-reading shards to verify them
_DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB binary)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise NormSurgeryError(f"cannot read the size {value!r}; write it like 5GB, 500MB or 1.5GiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class _ShardFile:
    """One output shard written as tensors arrive: data goes after a reserved header, filled in at close.

    Nothing of a shard is held in memory, so peak memory is one tensor, not one shard.
    """

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        self.file = path.open("wb")
        self.file.seek(HEADER_RESERVE)
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0

    def aligned_for(self, tensor: torch.Tensor) -> bool:
        """True when the next tensor would start on a multiple of its element size (loaders need that)."""
        return self.size % tensor.element_size() == 0

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append the tensor's bytes; returns their SHA-256 for the read-back check."""
        data = _tensor_bytes(tensor)
        self.file.write(data)
        self.entries[name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + len(data)]}
        self.size += len(data)
        return hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        """Write the header into the reserved space (space-padded, as the format allows), or move the data if it is too big."""
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        room = HEADER_RESERVE - 8
        if len(header) <= room:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", room) + header + b" " * (room - len(header)))
            self.file.close()
            return
        self.file.close()
        header += b" " * (-len(header) % 8)
        moved = self.path.with_name(self.path.name + ".moving")
        with self.path.open("rb") as src, moved.open("wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(HEADER_RESERVE)
            shutil.copyfileobj(src, dst, CHUNK)
        moved.replace(self.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointWriter:
    """Context manager: `add` tensors, write side files, then commit OUT atomically on a clean exit."""

    def __init__(self, out: Path, *, force: bool = False, max_shard_size: int = 5_000_000_000,
                 metadata: dict[str, str] | None = None) -> None:
        self.out = Path(out)
        self.force = force
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"
        self._shard: _ShardFile | None = None
        self._written_bytes = 0
        self._shards: list[list[str]] = []
        self._digests: dict[str, str] = {}
        self._staged = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "CheckpointWriter":
        parent = self.out.parent
        if self.out.exists() and (self.out.is_file() or not self.force):
            what = "a file" if self.out.is_file() else "a folder"
            raise NormSurgeryError(
                f"{self.out} already exists ({what}). Choose another output, or pass --force to replace a folder."
            )
        if not parent.is_dir():
            raise NormSurgeryError(f"the output's parent folder {parent} does not exist; create it first.")
        if not os.access(parent, os.W_OK):
            raise NormSurgeryError(f"cannot write into {parent} (read-only or no permission); choose another output.")
        self.clean_stale(self.out)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._shard is not None:
                self._shard.file.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise NormSurgeryError(
                    f"the disk holding {self.out.parent} is full; nothing was written. Free space (the output needs "
                    f"about {self.bytes_added / 1e9:.2f} GB) or write elsewhere."
                ) from None
            return
        try:
            self.stage()
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    @staticmethod
    def clean_stale(out: Path) -> None:
        """Remove temporary folders of earlier runs for the same OUT whose process is gone."""
        for path in out.parent.glob(f".{out.name}{TMP_MARK}*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- tensors

    @property
    def bytes_added(self) -> int:
        """Bytes of tensor data handed to the writer so far."""
        return self._written_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a tensor into the current shard, starting a new shard when it would overflow."""
        if name in self._digests:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        shard = self._shard
        if shard is not None and shard.size and (shard.size + size > self.max_shard_size or not shard.aligned_for(tensor)):
            self._close_shard()
        if self._shard is None:
            self._shard = _ShardFile(self.tmp / f"shard-{len(self._shards):05d}.safetensors", self.metadata)
            self._shards.append([])
        self._digests[name] = self._shard.write(name, tensor)
        self._shards[-1].append(name)
        self._written_bytes += size

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    # ---------------------------------------------------------------- side files

    def write_json(self, relpath: str, obj: Any) -> None:
        """Write a JSON file into the output (sorted keys off: configs keep their order)."""
        self.write_text(relpath, json.dumps(obj, indent=2) + "\n")

    def write_text(self, relpath: str, text: str) -> None:
        """Write a text file into the output."""
        (self.tmp / relpath).write_text(text, encoding="utf-8")

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        """Copy a file's bytes into the output."""
        shutil.copyfile(src, self.tmp / (relpath or Path(src).name))

    def copy_side_files(self, src_root: Path) -> None:
        """Copy the generation config and tokenizer files that exist in `src_root` (as bytes; nothing is run)."""
        for name in SIDE_FILES:
            if (Path(src_root) / name).is_file():
                self.copy_file(Path(src_root) / name)

    # ---------------------------------------------------------------- commit

    def stage(self) -> Path:
        """Write the last shard, name the shards, write the index, and re-read every tensor's checksum.

        Returns the temporary folder, now a complete model folder that can be loaded and checked before
        `__exit__` renames it to OUT.
        """
        if self._staged:
            return self.tmp
        self._close_shard()
        count = len(self._shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map: dict[str, str] = {}
        for i, (tensors, final) in enumerate(zip(self._shards, names)):
            (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / final)
            weight_map.update({t: final for t in tensors})
        if count > 1:
            self.write_json("model.safetensors.index.json",
                            {"metadata": {"total_size": self._written_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        self._verify_shards(weight_map)
        self._staged = True
        return self.tmp

    def _verify_shards(self, weight_map: dict[str, str]) -> None:
        """Re-read every shard (its header, then each tensor's bytes in chunks) and compare with what was written."""
        buffer = memoryview(bytearray(CHUNK))
        for shard in sorted(set(weight_map.values())):
            infos, _ = read_header(self.tmp / shard)
            expected = {n for n, s in weight_map.items() if s == shard}
            bad = sorted(expected ^ set(infos))
            with (self.tmp / shard).open("rb", buffering=0) as f:
                for name, info in infos.items():
                    f.seek(info.file_offset)
                    digest, left = hashlib.sha256(), info.nbytes
                    while left:
                        got = f.readinto(buffer[: min(left, CHUNK)])
                        if not got:
                            break
                        digest.update(buffer[:got])
                        left -= got
                    if left or digest.hexdigest() != self._digests.get(name):
                        bad.append(name)
            if bad:
                raise NormSurgeryError(
                    f"tensor {bad[0]} read back from {shard} differs from what was written (disk or memory error); "
                    "nothing was written. Try again, or write to another disk."
                )

    def _commit(self) -> None:
        for path in self.tmp.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}{TMP_MARK}old-{os.getpid()}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
