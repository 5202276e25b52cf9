"""Device selection, mixed precision and giving freed host memory back, in one place."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from mt.errors import MTError
from mt.ops import CPU_PRODUCTS, cpu_products

Item, Result = TypeVar("Item"), TypeVar("Result")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "fastest")  # int8, fastest: decoding only


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def _cpu_has(*probes: str) -> bool:
    """Whether any of torch.cpu's (private) instruction probes answers yes; a torch without one says no."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX). Without them oneDNN
    emulates bf16 products, no faster than fp32 ones."""
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_multiplies_int8() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI or AMX). Without them oneDNN's
    int8 products run on 16-bit multiply-adds: int8 beam search then ran at fp32's speed (1.03x) with
    the CPU limited to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2` on a Xeon with AMX), against 1.75x on AMD Zen 4."""
    return _cpu_has("_is_vnni_supported", "_is_amx_tile_supported")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids)."""
    return _cpu_has("_is_amx_tile_supported")


def fastest_precision(device: torch.device) -> str:
    """Decoding's `fastest` on `device`: what decoded beam 5 fastest on its kind of CPU, at fp32's BLEU
    (validation within 0.2; README): bf16 with AMX (1.21x fp32 on a Xeon, int8 1.02x), int8 with
    AVX-512 VNNI but no AMX (1.75x on AMD Zen 4, bf16 1.47x), fp32 elsewhere (AVX2: int8 1.03x,
    bf16 0.23x). On a GPU, `auto`'s choice."""
    if device.type != "cpu":
        return "auto"
    if cpu_has_amx():
        return "bf16"
    return "int8" if cpu_multiplies_int8() else "fp32"


def resolve_precision(device: torch.device, precision: str) -> str:
    """`precision` with `fastest` made concrete for `device`."""
    return fastest_precision(device) if precision == "fastest" else precision


def slow_precision(device: torch.device, precision: str) -> str | None:
    """Why decoding in `precision` on `device` would run no faster than fp32 (or slower), or None."""
    if device.type != "cpu":
        return None
    if precision == "bf16" and not cpu_multiplies_bf16():
        return (
            "precision bf16: this CPU has no bf16 matrix instructions (AVX-512 BF16, AMX), so its bf16 products "
            "are emulated: beam search ran at 0.23x fp32's speed (README); fp32 or int8 decode faster"
        )
    if precision == "int8" and not cpu_multiplies_int8():
        return "precision int8: this CPU has no int8 dot-product instructions (AVX-512 VNNI, AMX): expect fp32's speed"
    return None


def training_precision(device: torch.device, precision: str) -> str:
    """`train.precision` made concrete: `auto` is decoding's `auto` (bf16 on CUDA devices that support
    it), and bf16 on CPUs with bf16 matrix instructions too (the Multi30k preset trains 1.3-1.75x
    faster there than in fp32, with the same loss per update: README)."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_multiplies_bf16() else "fp32"
    return "fp32" if autocast_dtype(device, "auto") is None else "bf16"


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` (auto | fp32 | bf16 | fp16); None means full fp32.

    `auto` here is decoding's: bf16 on CUDA devices that support it, fp32 elsewhere (training's
    `auto` is resolved first, by `training_precision`).
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "int8": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(device: torch.device, precision: str) -> None:
    """A one-line error for a precision `device` cannot compute in."""
    if precision == "int8" and device.type != "cpu":
        raise MTError(f"precision int8: int8 products run on the CPU only, not on {device.type} (use bf16 there)")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The context training and validation compute in: autocast to `precision`'s dtype, or none for fp32."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def decoding_precision(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The context search and scoring compute in. On the CPU, int8 and bf16 multiply the model's
    products in that type with weights converted once, everything else in fp32 (`mt.ops.cpu_products`):
    bf16 beam search ran 1.16-1.19x faster this way than under autocast, which casts every weight at every product
    and leaves activations in bf16 to be cast back (a Xeon with AMX, 2 cores). Elsewhere `autocast`."""
    precision = resolve_precision(device, precision)
    check_precision(device, precision)
    if device.type == "cpu" and precision in CPU_PRODUCTS:
        return cpu_products(precision)
    return autocast(device, precision)


def cpu_workers(requested: int, device: torch.device) -> int:
    """How many batches to decode at once: `requested`, or with 0 one per intra-op thread on the CPU."""
    if device.type != "cpu":
        return 1
    return requested if requested > 0 else torch.get_num_threads()


def map_in_workers(work: Callable[[Item], Result], items: Iterable[Item], workers: int) -> list[Result]:
    """`[work(item) for item in items]`, with `workers` threads sharing the CPU's intra-op threads.

    Small matrix products (a few hundred decoder rows) scale poorly across threads: on 2 cores, two
    batches at once with one thread each decode beam search 1.2-1.4x faster than one batch with two.
    Torch's operators release the GIL, so Python threads run them side by side. Gradient mode and
    autocast are per thread: `work` sets up its own.
    """
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        return [work(item) for item in items]
    threads = torch.get_num_threads()
    per_worker = max(1, threads // workers)

    def run(item: Item) -> Result:
        torch.set_num_threads(per_worker)  # OpenMP's setting is per thread; a new thread starts from the last one set
        return work(item)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="mt-decode")
    try:
        return list(pool.map(run, items))
    finally:
        # after an error or Ctrl-C, batches not yet started are dropped instead of decoded
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None


_malloc_trim = _glibc_malloc_trim() if sys.platform.startswith("linux") else None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    Batches of varying shapes leave free holes between live tensors in the heap; glibc keeps
    their pages resident, so a CPU training process's resident set creeps up (by ~130 MB in 100 s
    of a Multi30k run). Each trim costs a round of page faults when the memory is used again, so
    `mt train` trims every few dozen updates: trimming after every update cost ~20 % of the speed.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
