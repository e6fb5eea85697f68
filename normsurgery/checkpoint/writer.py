"""Write a Hugging Face model folder atomically: shards fill as tensors arrive, and the folder appears only
when everything is written and re-read, by renaming a temporary folder beside OUT."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from normsurgery.checkpoint.raw import AnyTensor, RawTensor
from normsurgery.checkpoint.shard_file import ShardPipeline
from normsurgery.errors import NormSurgeryError

SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
TMP_MARK = ".normsurgery-tmp-"
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_parent(out: Path) -> None:
    """Create the missing parent folders of an output (a folder or a file), or say clearly why they cannot be."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NormSurgeryError(f"cannot create the output's parent folder {out.parent}: {err.strerror or err}. "
                               "Choose another output.") from None


class CheckpointWriter:
    """Context manager: `add` tensors, write side files, then commit OUT atomically on a clean exit."""

    def __init__(self, out: Path, *, force: bool = False, max_shard_size: int = 5_000_000_000,
                 metadata: dict[str, str] | None = None) -> None:
        self.out = Path(out)
        self.force = force
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"
        self._pipeline: ShardPipeline | None = None
        self._names: set[str] = set()
        self._synced: set[str] = set()
        self._staged = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "CheckpointWriter":
        parent = self.out.parent
        if self.out.exists() and (self.out.is_file() or not self.force):
            what = "a file" if self.out.is_file() else "a folder"
            raise NormSurgeryError(
                f"{self.out} already exists ({what}). Choose another output, or pass --force to replace a folder."
            )
        make_parent(self.out)
        if not os.access(parent, os.W_OK):
            raise NormSurgeryError(f"cannot write into {parent} (read-only or no permission); choose another output.")
        self.clean_stale(self.out)
        try:
            self.tmp.mkdir()
            self._pipeline = ShardPipeline(self.tmp, self.metadata, self.max_shard_size)
        except BaseException:  # e.g. Ctrl-C while the pipeline starts: __exit__ will not run
            if self._pipeline is not None:
                self._pipeline.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._pipeline is not None:
                self._pipeline.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._raise_if_disk_full(exc)
            return
        try:
            self.stage()
            self._commit()
        except BaseException as err:
            if self._pipeline is not None:
                self._pipeline.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._raise_if_disk_full(err)
            raise

    def _raise_if_disk_full(self, err: BaseException | None) -> None:
        """A full disk (from any thread) as one clear error."""
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise NormSurgeryError(
                f"the disk holding {self.out.parent} is full; nothing was written. Free space (the output needs "
                f"about {self.bytes_added / 1e9:.2f} GB) or write elsewhere."
            ) from None

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
        return self._pipeline.bytes if self._pipeline else 0

    def add(self, name: str, tensor: AnyTensor) -> None:
        """Queue a tensor (torch, or stored bytes) for the current shard (written in the background; a new shard
        starts when it is full)."""
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        self._pipeline.add(name, tensor if isinstance(tensor, RawTensor) else tensor.detach().to("cpu").contiguous())

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
        """Finish the shards (each header re-read and checked as it completes), name them, and write the index.

        Returns the temporary folder, now a complete model folder that can be loaded and checked before
        `__exit__` renames it to OUT.
        """
        if self._staged:
            return self.tmp
        shards = self._pipeline.finish()
        count = len(shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map: dict[str, str] = {}
        for i, (tensors, final) in enumerate(zip(shards, names)):
            self._pipeline.shard_path(i).rename(self.tmp / final)
            weight_map.update({t: final for t in tensors})
        if count > 1:
            self.write_json("model.safetensors.index.json", {"metadata": {"total_size": self._pipeline.bytes},
                                                             "weight_map": dict(sorted(weight_map.items()))})
        self._synced = set(names)
        self._staged = True
        return self.tmp

    def _commit(self) -> None:
        for path in self.tmp.iterdir():
            if path.name not in self._synced:  # shards were synced by the writer thread
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}{TMP_MARK}old-{os.getpid()}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
