"""Where a model runs and how much memory it may take: `--device` and `--max-memory`, resolved once per command.

The default budget comes from the memory actually free (RAM for the CPU, free memory of each GPU), so a user
never has to know it. Exact checks keep float32 semantics on GPUs: TF32 and reduced-precision reductions off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from normsurgery.errors import NormSurgeryError

# Of the memory found free, what a run takes by default: the rest is left to the page cache and other work.
DEFAULT_SHARE = 0.8


@dataclass(frozen=True)
class Runtime:
    """The devices a model runs on (the first executes streamed modules) and the bytes it may hold on each."""

    devices: tuple[torch.device, ...]
    budgets: tuple[int, ...]
    explicit: bool = False  # the budget was given with --max-memory (else: from the free memory)

    @property
    def device(self) -> torch.device:
        """The execution device (streamed weights are brought here)."""
        return self.devices[0]

    @property
    def budget(self) -> int:
        """Bytes the run may hold on all its devices together."""
        return sum(self.budgets)


def human_bytes(size: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as --max-memory reads them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def _proc_kib(path: str, key: str) -> int | None:
    """A 'Key:   123 kB' field of a Linux /proc file, in bytes; None where there is no such file or field."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_ram() -> int:
    """Bytes of RAM the kernel says it can give without swapping (MemAvailable)."""
    found = _proc_kib("/proc/meminfo", "MemAvailable")
    return found if found is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def exact_float32() -> None:
    """Make GPU float32 maths float32: no TF32 matmuls or convolutions, no reduced-precision reductions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")


def _gpus(device: str) -> list[torch.device]:
    """The GPUs `device` names ('auto' and 'cuda': all of them; 'cuda:N': that one)."""
    if not torch.cuda.is_available():
        if device == "auto":
            return []
        raise NormSurgeryError(
            f"--device {device} was given, but torch sees no CUDA GPU here (torch {torch.__version__}"
            f"{', a CPU-only build' if torch.version.cuda is None else ''}). Use --device cpu (or auto, which takes "
            "the GPUs when there are any); nothing was written."
        )
    count = torch.cuda.device_count()
    if device in ("auto", "cuda"):
        return [torch.device("cuda", i) for i in range(count)]
    index = int(device.split(":", 1)[1])
    if index >= count:
        raise NormSurgeryError(f"--device {device} was given, but this machine has {count} GPU(s) (cuda:0 to "
                               f"cuda:{count - 1}); nothing was written.")
    return [torch.device("cuda", index)]


def resolve_runtime(device: str = "auto", max_memory: str | int | None = None) -> Runtime:
    """The Runtime for `--device auto|cpu|cuda|cuda:N` and `--max-memory SIZE` (None: from the free memory).

    With several GPUs the budget is per GPU; a model larger than one is spread over them.
    """
    from normsurgery.checkpoint.writer import parse_size

    return_freed_memory()
    device = device.strip().lower()
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise NormSurgeryError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N (e.g. cuda:0).")
    given = parse_size(max_memory) if max_memory is not None else None
    gpus = [] if device == "cpu" else _gpus(device)
    if gpus:
        exact_float32()
        budgets = tuple(given or int(torch.cuda.mem_get_info(g)[0] * DEFAULT_SHARE) for g in gpus)
        return Runtime(tuple(gpus), budgets, explicit=given is not None)
    return Runtime((torch.device("cpu"),), (given or int(available_ram() * DEFAULT_SHARE),), explicit=given is not None)


def return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the system at once.

    Streaming allocates and frees one module's float32 weights after another. glibc raises its mmap threshold
    to the largest block freed (up to 32 MB), after which such blocks come from the heap and freed ones are
    not returned: measured, the peak RSS of `check` on the 2.4 GB Llama shape doubled (0.97 -> 2.0 GB).
    A fixed 1 MiB threshold keeps every weight-sized block in its own mapping, unmapped when freed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux VmHWM), or None where it cannot be read."""
    return _proc_kib("/proc/self/status", "VmHWM")
