"""The runtime policy of every pass over images: device, threads, workers, memory layout, precision.

One place decides where and how the backbone runs, so that the three passes (the reference
feature pass, the target pass, image masking) cannot drift apart:

- :func:`resolve_device`: ``auto`` = CUDA, then MPS, else the CPU;
- :func:`default_workers`: DataLoader worker processes for a device and this machine's cores;
- :func:`one_thread`: one intra-op thread for many small tensor operations;
- :func:`backbone` / :func:`backbone_input`: channels-last on every device but MPS;
- :func:`resolve_precision` / :func:`autocast`: ``auto`` = bf16 autocast on CUDA with bf16 and on
  CPUs with native bf16 (AVX512-BF16 or AMX), fp16 on other CUDA, fp32 otherwise.  The resolved
  name (``fp32``, ``bf16``, ``fp16``) goes into every cache key and result.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import LaviseError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags (as /proc/cpuinfo spells them) of native bf16 arithmetic: without them torch emulates
# bf16 on the CPU, several times slower than fp32 (measured on AVX2: 4x).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, then MPS, else CPU."""
    d = (device or "auto").lower()
    from .distributed import device_index

    pinned = device_index()  # a torchrun rank: its own GPU, cuda:LOCAL_RANK
    if pinned is not None and d in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", pinned % torch.cuda.device_count())
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise LaviseError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LaviseError(f"device {device} asked for but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LaviseError("device mps asked for but MPS is not available here; use --device cpu")
    return dev


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """DataLoader worker processes for a pass over images on ``device``.

    Decoding and resizing overlap the forward in worker processes.  On a CPU the workers take
    cores from the forward, so a quarter of them decode (none on two cores or fewer, at most
    four); with an accelerator the CPU only decodes, so up to eight.
    """
    cores = _cores()
    if device.type == "cpu":
        # With 2 cores a worker process only slows the forward (measured: benchmarks/feature_pass.py).
        return 0 if cores <= 2 else min(4, cores // 4)
    return max(1, min(8, cores - 1))


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread, restored afterwards (many small tensor ops only contend)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def backbone(module: nn.Module, device: torch.device) -> nn.Module:
    """The frozen backbone on ``device``, channels-last (faster for convolutions) except on MPS."""
    net = module.to(device)
    return net if device.type == "mps" else net.to(memory_format=torch.channels_last)


def backbone_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch for :func:`backbone`: on ``device``, in the same memory layout."""
    x = x.to(device, non_blocking=True)
    return x if device.type == "mps" else x.contiguous(memory_format=torch.channels_last)


# -- precision ----------------------------------------------------------------------------------


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; where there is none (e.g. macOS), what torch's
    CPU dispatch level tells (``amx_bf16`` when it names AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - a torch without it
        cap = ""
    return frozenset({"amx_bf16"}) if "AMX" in cap else frozenset()


def cpu_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), from ``flags`` or this CPU's."""
    return bool((frozenset(flags) if flags is not None else _cpu_flags()) & NATIVE_BF16_FLAGS)


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the autocast precision of a pass on ``device``.

    ``auto`` = bf16 on CUDA with bf16 support and on CPUs with native bf16, fp16 on other CUDA,
    fp32 otherwise (other CPUs, MPS).  An explicit choice is kept, unless the GPU lacks bf16.
    """
    p = (precision or "auto").strip().lower()
    if p not in PRECISIONS:
        raise LaviseError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if p == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if dev.type == "cpu" and cpu_native_bf16():
            return "bf16"
        return "fp32"
    if p == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LaviseError("this GPU has no bf16 support; use --precision fp16 or fp32")
    return p


@contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[str]:
    """The forward of a pass at ``precision`` (resolved for ``device``); yields the resolved name.

    fp32 runs without autocast; bf16 and fp16 run under ``torch.autocast`` (convolutions and
    matrix products in the low precision, reductions in fp32).
    """
    dev = torch.device(device)
    p = resolve_precision(precision, dev)
    if p == "fp32":
        yield p
        return
    with torch.autocast(dev.type, dtype=_DTYPES[p]):
        yield p


# -- the C allocator --------------------------------------------------------------------------

TRIM_EVERY = 8  # batches between two returns of freed memory to the system (see trim_memory)
_libc: object | None | bool = False  # False: not looked up yet; None: no glibc here


def trim_memory() -> bool:
    """Hand the C allocator's free memory back to the system (glibc's ``malloc_trim(0)``, through
    ctypes; nothing elsewhere).  Returns whether it ran.

    A long pass over images of varied sizes frees big buffers (decoded images, maps) into glibc's
    heaps and arenas, which keep them: measured on the target pass, ≈ 250 KB per image stayed
    resident (459 → 4,538 MiB over 16k images).  The runner calls this every :data:`TRIM_EVERY`
    batches, which keeps the resident memory flat in the number of images.
    """
    global _libc
    if _libc is False:
        _libc = None
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            lib = ctypes.CDLL(name or "libc.so.6")
            if hasattr(lib, "malloc_trim") and hasattr(lib, "gnu_get_libc_version"):
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
                _libc = lib
        except (OSError, AttributeError):
            _libc = None
    if _libc is None or os.environ.get("LAVISE_NO_TRIM"):
        return False
    _libc.malloc_trim(0)  # type: ignore[attr-defined]
    return True
