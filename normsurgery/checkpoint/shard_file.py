"""Output shards: each written tensor by tensor on a background thread, then its header re-read and checked,
the file synced, and every tensor's bytes re-read from it and compared with the checksum (XXH3-64) taken as it was
written.

Streaming keeps memory at a few tensors whatever the shard size; the background threads let disk writes,
fsync and the re-read overlap the reading and rewriting of the next tensors. The re-read catches what a
disk, a filesystem or a bug did to the bytes between memory and file, before anything is renamed into place,
even with --no-verify (which skips only the logits check).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

import xxhash

from normsurgery.checkpoint.raw import AnyTensor, RawTensor, as_raw
from normsurgery.checkpoint.safetensors_header import ITEMSIZE, read_header
from normsurgery.errors import NormSurgeryError

HEADER_RESERVE = 64 * 1024  # bytes kept for a shard's header; the data follows, written as tensors arrive
CHUNK = 64 * 2**20  # copy size when a header outgrows its reserved space
VERIFY_WINDOW = 64 * 2**20  # bytes of a written shard mapped at a time when it is re-read against its checksums
QUEUED_LIMIT = 256 * 2**20  # tensor bytes that may wait for the writer thread
FLUSH_EVERY = 256 * 2**20  # bytes after which an open shard is flushed, so the disk works from the start
Layout = tuple[str, tuple[int, ...]]  # a written tensor's dtype code and shape


class ShardFile:
    """One safetensors file written as tensors arrive: data after a reserved header, filled in at close."""

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        self.file = path.open("wb", buffering=0)  # unbuffered: kernel-side copies and writes share one position
        self.file.seek(HEADER_RESERVE)
        self._sources: dict[Path, int] = {}  # read handles of the files copied from
        self.entries: dict[str, dict[str, Any]] = {}
        self.checksums: dict[str, int] = {}
        self.unchecked: list[str] = []  # written, not yet handed to a re-read against their checksums
        self.size = 0

    def write(self, name: str, tensor: RawTensor) -> None:
        """Append the tensor's bytes, and remember their checksum."""
        data = tensor.data
        if not (tensor.origin and self._copy_range(*tensor.origin, len(data))):
            _write_all(self.file, data)
        self.checksums[name] = checksum(data)  # of the source's bytes: the re-read proves the copy too
        self.unchecked.append(name)
        self.entries[name] = {"dtype": tensor.code, "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + len(data)]}
        self.size += len(data)

    def _copy_range(self, source: Path, offset: int, count: int) -> bool:
        """Copy bytes of a stored tensor from its file in the kernel (copy_file_range: no pass through this process,
        half the time of a write on this machine's ext4). False, with nothing written, where the system cannot."""
        if not hasattr(os, "copy_file_range") or not count:
            return False
        if source not in self._sources:
            self._sources[source] = os.open(source, os.O_RDONLY)
        out = self.file.fileno()
        done = 0
        try:
            while done < count:
                moved = os.copy_file_range(self._sources[source], out, count - done, offset + done)
                if moved == 0:
                    break
                done += moved
        except OSError as err:
            if done or err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            return False
        if done < count:  # the source file was cut short under us
            raise NormSurgeryError(f"{source} ended while its tensor bytes were copied; the file changed during the "
                                   "run. Run again on a checkpoint that nothing else writes to.")
        return True

    def _close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

    def discard(self) -> None:
        """Close the file and the handles of its sources (the run was aborted)."""
        self._close_sources()
        self.file.close()

    def take_unchecked(self) -> list[Span]:
        """Where the tensors written since the last call lie in the file, with their checksums (to re-read once the
        file is synced)."""
        spans = [Span(name, HEADER_RESERVE + self.entries[name]["data_offsets"][0],
                      self.entries[name]["data_offsets"][1] - self.entries[name]["data_offsets"][0], self.checksums[name])
                 for name in self.unchecked]
        self.unchecked = []
        return spans

    def close(self) -> bool:
        """Write the header into the reserved space (space-padded, as the format allows), or move the data
        along when the header does not fit (returns True: every offset changed)."""
        self._close_sources()
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        room = HEADER_RESERVE - 8
        if len(header) <= room:
            self.file.seek(0)
            _write_all(self.file, struct.pack("<Q", room) + header + b" " * (room - len(header)))
            self.file.close()
            return False
        self.file.close()
        header += b" " * (-len(header) % 8)
        moved = self.path.with_name(self.path.name + ".moving")
        with self.path.open("rb") as src, moved.open("wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(HEADER_RESERVE)
            shutil.copyfileobj(src, dst, CHUNK)
        moved.replace(self.path)
        return True


def _write_all(file: Any, data: bytes | memoryview) -> None:
    """Write every byte to an unbuffered file (a raw write may take fewer)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[file.write(view):]


def verify_shard(path: Path, expected: dict[str, Layout]) -> dict[str, Any]:
    """Re-read a closed shard's header (bounds-checked like any input): it must describe exactly the tensors
    written, with their dtypes and shapes, inside the file. Returns where each tensor lies."""
    infos, _ = read_header(path)
    found = {name: (info.code, info.shape) for name, info in infos.items()}
    if found != expected:
        name = sorted(set(found.items()) ^ set(expected.items()))[0][0]
        raise NormSurgeryError(
            f"the header of {path.name} does not describe tensor {name} as written (a bug in normsurgery, or a "
            "disk error); nothing was written. Please report it."
        )
    return infos


def checksum(data: bytes | memoryview) -> int:
    """XXH3-64 of a buffer: about 9 GB/s on one core (CRC-32 in zlib: 3), and it releases the GIL while it runs."""
    return xxhash.xxh3_64_intdigest(data)


class Span(NamedTuple):
    """One written tensor's bytes in a shard file, and their checksum when written."""

    name: str
    start: int
    nbytes: int
    digest: int


def verify_spans(path: Path, spans: list[Span]) -> None:
    """Re-read written tensors from a synced shard and compare their checksums with those taken when they were
    written. Read through read-only mappings of at most VERIFY_WINDOW bytes, unmapped as soon as they are hashed:
    no copy out of the page cache (six times cheaper than reading into a buffer), and resident memory grows by one
    window at most, whatever the size of the shard."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        bad = [span.name for span in spans if _digest(fd, size, span) != span.digest]
    finally:
        os.close(fd)
    if bad:
        raise NormSurgeryError(
            f"tensor {bad[0]} reads back from {path.name} with other bytes than were written (checksum mismatch: "
            "a disk or filesystem error); nothing was written. Check the disk and try again."
        )


def _digest(fd: int, size: int, span: Span) -> int | None:
    """Checksum of one span of an open file of `size` bytes, mapped window by window; None if the file is cut
    short."""
    end = span.start + span.nbytes
    if end > size:
        return None
    state, pos = xxhash.xxh3_64(), span.start
    while pos < end:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        length = min(end, base + VERIFY_WINDOW) - base
        with mmap.mmap(fd, length, offset=base, access=mmap.ACCESS_READ) as window:
            state.update(memoryview(window)[pos - base:])
        pos = base + length
    return state.intdigest()


class ShardPipeline:
    """Splits tensors into shards of at most `max_shard_size` bytes and writes them on one background thread.

    Jobs run in the order they are given; at most QUEUED_LIMIT bytes of tensors wait, so memory stays
    bounded. Each shard's header is re-read and checked as soon as it is complete, and the file fsynced and its
    tensors re-read against their checksums on a second thread, so that this never holds up writing the next. An open shard is also flushed
    every FLUSH_EVERY bytes: the disk then writes while we compute, instead of all at the end.
    """

    def __init__(self, folder: Path, metadata: dict[str, str], max_shard_size: int) -> None:
        self.folder = folder
        self.metadata = metadata
        self.max_shard_size = max_shard_size
        self._written: list[dict[str, Layout]] = []  # per shard: name -> (dtype code, shape)
        self.bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="normsurgery-writer")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="normsurgery-fsync")  # flushes never stall writes
        self._syncs: list[Future] = []
        self._queue: deque[tuple[Future, int]] = deque()
        self._queued = 0
        self._open_size: int | None = None  # bytes in the open shard (main thread's view); None: no shard open
        self._file: ShardFile | None = None  # the open shard (writer thread only)
        self._unflushed = 0  # bytes of the open shard written since its last flush (writer thread only)

    def add(self, name: str, tensor: AnyTensor) -> None:
        """Queue a contiguous CPU tensor (torch or stored bytes); a new shard starts when it would overflow the
        current one, or when the tensor would start at an offset that is not a multiple of its element size
        (loaders need that)."""
        tensor = as_raw(tensor)
        size = tensor.nbytes
        if self._open_size and (self._open_size + size > self.max_shard_size or self._open_size % ITEMSIZE[tensor.code]):
            self._close()
        if self._open_size is None:
            self._submit(self._open_job, len(self._written))
            self._written.append({})
            self._open_size = 0
        self._submit(self._write_job, name, tensor, size=size)
        self._written[-1][name] = (tensor.code, tuple(tensor.shape))
        self._open_size += size
        self.bytes += size

    def finish(self) -> list[list[str]]:
        """Close the last shard and wait for every job; raises the first error a job met."""
        self._close()
        while self._queue:
            self._pop()
        self._pool.shutdown()
        for future in self._syncs:
            future.result()
        self._syncer.shutdown()
        return [list(shard) for shard in self._written]

    def abort(self) -> None:
        """Drop what is queued and stop the thread (the caller removes the folder)."""
        for future, _ in self._queue:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._syncer.shutdown(wait=True)
        if self._file is not None:
            self._file.discard()

    def shard_path(self, index: int) -> Path:
        """Where shard `index` is written (renamed to its final name when the writer stages)."""
        return self.folder / f"shard-{index:05d}.safetensors"

    # ------------------------------------------------------------ main thread

    def _submit(self, job: Callable[..., None], *args: Any, size: int = 0) -> None:
        self._queue.append((self._pool.submit(job, *args), size))
        self._queued += size
        while self._queue and (self._queued > QUEUED_LIMIT or self._queue[0][0].done()):
            self._pop()

    def _pop(self) -> None:
        future, size = self._queue.popleft()
        self._queued -= size
        future.result()

    def _close(self) -> None:
        if self._open_size is not None:
            self._submit(self._finish_job, len(self._written) - 1, dict(self._written[-1]))
            self._open_size = None

    # ------------------------------------------------------------ writer thread

    def _open_job(self, index: int) -> None:
        self._file = ShardFile(self.shard_path(index), self.metadata)

    def _write_job(self, name: str, tensor: RawTensor) -> None:
        self._file.write(name, tensor)
        self._unflushed += tensor.nbytes
        if self._unflushed >= FLUSH_EVERY and (not self._syncs or self._syncs[-1].done()):
            self._file.file.flush()
            self._syncs.append(self._syncer.submit(_sync_and_verify, self._file.path, self._file.take_unchecked()))
            self._unflushed = 0

    def _finish_job(self, index: int, expected: dict[str, Layout]) -> None:
        file, self._file = self._file, None
        moved = file.close()
        self._unflushed = 0
        path = self.shard_path(index)
        infos = verify_shard(path, expected)
        # the tensors not yet re-read; all of them when the data moved to make room for the header
        names = list(file.checksums) if moved else [span.name for span in file.take_unchecked()]
        spans = [Span(n, infos[n].data_start + infos[n].begin, infos[n].nbytes, file.checksums[n]) for n in names]
        self._syncs.append(self._syncer.submit(_sync_and_verify, path, spans))


def _sync_and_verify(path: Path, spans: list[Span]) -> None:
    """Flush a shard to disk, then re-read the given tensors and compare their checksums (the tensors re-read
    at each periodic flush, so that the end of a run waits only for the last ones)."""
    _fsync(path)
    verify_spans(path, spans)


def _fsync(path: Path) -> None:
    """Flush one file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
