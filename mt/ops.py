"""Kernels the model is built from: rotary positions, a CPU dropout with a byte mask, and a linear
layer that multiplies through oneDNN where MKL is slow, or in int8 or bf16 for decoding on the CPU
(`cpu_products`).

Each computes what a few lines of tensor arithmetic (or F.linear) would, with less memory kept for
the backward pass or in less time; the tests check them against that arithmetic.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Below this many rows oneDNN's fp32 product, padded to its bucket (`onednn_rows`), costs as much as
# MKL's or more (a 256 x 768 weight on one Zen 5 core: 8 rows 73 against 68 us, 12 rows 107 against
# 86); from 16 rows on it is faster (91 against 106 us, 24 rows 109 against 143).
ONEDNN_MIN_ROWS = 16


@functools.cache
def onednn_multiplies_fp32() -> bool:
    """Whether fp32 inference products on the CPU go through oneDNN rather than MKL: on AMD CPUs with AVX-512.

    MKL runs its AVX2 kernels on AMD's AVX-512 CPUs: on one Zen 5 core 75-87 GFLOP/s at search's
    shapes, where oneDNN (which CTranslate2 also multiplies with there) reaches 164-202. On AVX2 CPUs
    MKL already runs near the core's peak, and on Intel's AVX-512 ones it runs AVX-512: there fp32
    beam search was 1.13x faster with MKL than with oneDNN (a Xeon with AMX, 2 cores), so they keep it.
    """
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
        and cpu_vendor_is_amd()
    )


def cpu_vendor_is_amd() -> bool:
    """Whether this CPU is AMD's (Linux's /proc/cpuinfo; elsewhere what `platform` says)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return "AuthenticAMD" in platform.processor()  # Windows: 'AMD64 Family 25 Model 97 ..., AuthenticAMD'


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias); without autograd, in fp32 on the CPU, through oneDNN where it is faster.

    Only where no gradient is taken (search, scoring, validation) and no autocast runs: training keeps
    PyTorch's own kernels and their backward. `weight` (N, K) may be a transposed view.
    """
    rows = x.numel() // max(1, x.size(-1))
    if (
        x.device.type != "cpu"
        or not x.dtype == weight.dtype == torch.float32
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled("cpu")
        or rows < ONEDNN_MIN_ROWS
        or not onednn_multiplies_fp32()
    ):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.size(-1))
    bucket = onednn_rows(rows)
    if bucket != rows:  # zero rows up to the bucket's size: a product shape oneDNN has already seen
        padded = flat.new_empty(bucket, flat.size(1))
        padded[:rows], padded[rows:] = flat, 0
        flat = padded
    out = _onednn_linear(flat, weight, bias, "none", [], "")[:rows]
    return out.view(*x.shape[:-1], weight.size(0))


def onednn_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 8 up to 32 rows, then of 32, or of 1/16 of the next power of
    two when that is more.

    oneDNN keeps each product shape it meets with ~2-3 MB of buffers, and search meets a new row
    count at nearly every step: without the rounding, decoding the 1,000 test sentences three times
    grew the resident set to 1.1 GB (MKL: 300 MB), and a pass over 164 row counts x 6 weights took
    1.47 s against 1.03 s rounded (the rounding wastes at most 1/8 of the rows beyond 256).
    """
    step = 8 if rows <= 32 else max(32, (1 << (rows - 1).bit_length()) // 16)
    return -(-rows // step) * step


def _onednn_linear(*args) -> Tensor:
    """oneDNN's product of dense tensors (a strided weight needs no reordering into its own layout first)."""
    return torch.ops.mkldnn._linear_pointwise(*args)


class Int8Weight(NamedTuple):
    """A weight (N, K) in int8 with one scale per output row: weight ~ values * scales[:, None]."""

    values: Tensor  # (N, K) int8, symmetric: -127..127
    scales: Tensor  # (N,) fp32


def quantize_rows(weight: Tensor) -> Int8Weight:
    """(N, K) float weight -> its int8 rows, each scaled by its largest magnitude (CTranslate2's int8 scheme)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp_(min=1e-12).div_(127)
    return Int8Weight(torch.div(weight, scales[:, None]).round_().to(torch.int8), scales)


def int8_linear(x: Tensor, weight: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """~F.linear(x, weight) in fp32 with the product in int8: each row of x quantized on the fly by its
    own scale (dynamic quantization), the int32 sums scaled back. On one AVX-512 core (Zen 4) a
    400 x 256 by 256 x 768 product takes 567 us with the quantization against 1,732 in fp32."""
    rows = x.reshape(-1, x.size(-1)).float()
    scales = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)  # (R, 1)
    quantized = torch.div(rows, scales).round_().to(torch.int8)
    out = torch._int_mm(quantized, weight.values.t()).float().mul_(scales).mul_(weight.scales)
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], weight.values.size(0))


class Bf16Weight(NamedTuple):
    """A weight (N, K) in bf16, for products on the CPU's bf16 matrix units (AMX, AVX-512 BF16)."""

    values: Tensor  # (N, K) bf16


ReducedWeight = Int8Weight | Bf16Weight


def bf16_linear(x: Tensor, weight: Bf16Weight, bias: Tensor | None = None) -> Tensor:
    """~F.linear(x, weight, bias) in fp32 with the product in bf16: x and bias rounded to bf16, the result
    back in fp32. The bias goes into the product, which adds it to fp32 sums before rounding them (1.15-1.4x
    faster than adding it to the fp32 result, one thread on a Xeon with AMX)."""
    bias = None if bias is None else bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), weight.values, bias).float()


def reduced_linear(x: Tensor, weight: ReducedWeight, bias: Tensor | None = None) -> Tensor:
    """x times an int8 or bf16 weight, in and out in fp32."""
    if isinstance(weight, Int8Weight):
        return int8_linear(x, weight, bias)
    return bf16_linear(x, weight, bias)


def reduce(weight: Tensor, kind: str) -> ReducedWeight:
    """A float weight (N, K) as `kind` (int8 | bf16) products take it."""
    if kind == "int8":
        return quantize_rows(weight)
    return Bf16Weight(weight.detach().to(torch.bfloat16))


_PRODUCTS: ContextVar[str | None] = ContextVar("mt_cpu_products", default=None)
CPU_PRODUCTS = ("int8", "bf16")


@contextlib.contextmanager
def cpu_products(kind: str) -> Iterator[None]:
    """Within it (per thread), `Linear` layers and `Transformer.logits` multiply in `kind` (int8 | bf16)
    on the CPU when no gradient is taken, everything else staying fp32: decoding's `precision: int8`
    and, on the CPU, `bf16`. Unlike autocast, no activation leaves fp32 and no weight is cast per product."""
    if kind not in CPU_PRODUCTS:
        raise ValueError(f"cpu_products: {kind!r} is not one of {CPU_PRODUCTS}")
    token = _PRODUCTS.set(kind)
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


def reduced_products(x: Tensor) -> str | None:
    """The type products with `x` run in here (int8 | bf16), or None: fp32 (or autocast's choice).
    Only inside `cpu_products`, on the CPU, without autograd."""
    kind = _PRODUCTS.get()
    return kind if kind is not None and x.device.type == "cpu" and not torch.is_grad_enabled() else None


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose product is `linear`'s, or in int8 or bf16
    inside `cpu_products` (that weight made once and kept until the weight changes)."""

    _reduced: tuple[tuple, ReducedWeight] | None = None

    def forward(self, x: Tensor) -> Tensor:
        kind = reduced_products(x)
        if kind is not None:
            return reduced_linear(x, cached_reduced(self, self.weight, kind), self.bias)
        return linear(x, self.weight, self.bias)


def cached_reduced(owner: nn.Module, weight: Tensor, kind: str) -> ReducedWeight:
    """`reduce(weight, kind)`, kept on `owner` until the weight is replaced or changed by a tensor
    operation, or another kind is asked. Not all in-place updates show: the fused AdamW bumps no
    version counter, so whatever decodes a model in training calls `forget_reduced` first."""
    version = (weight.data_ptr(), weight._version, kind)
    if owner._reduced is None or owner._reduced[0] != version:
        with torch.no_grad():
            owner._reduced = (version, reduce(weight, kind))
    return owner._reduced[1]


def forget_reduced(model: nn.Module) -> None:
    """Drop the int8/bf16 weights `cached_reduced` keeps in `model`, so that they are made afresh."""
    for module in model.modules():
        if getattr(module, "_reduced", None) is not None:
            module._reduced = None


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) of the queries and keys of a fused q/k/v tensor.

    Channel i of the first half and channel i of the second half form a pair that is rotated by
    the angle position * base ** (-2i / Dh); a query-key dot product then depends only on the
    distance between their positions, not on where they are.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, not {head_dim}")
        frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * frequency  # (P, Dh/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, qkv: Tensor, offset: int = 0) -> Tensor:
        """qkv (B, L, 3, H, Dh) at positions offset..offset+L-1 -> queries and keys rotated, same shape."""
        positions = slice(offset, offset + qkv.size(1))
        # (L, 1, 1, Dh/2): the same angles for queries and keys and for every head
        cos, sin = (table[positions, None, None].to(qkv.dtype) for table in (self.cos, self.sin))
        if torch.compiler.is_compiling():  # torch.compile fuses the plain arithmetic (and cannot trace
            return _rotated(qkv, cos, sin)  # _Rotation's writes into views of a new tensor)
        return _Rotation.apply(qkv, cos, sin)


def _rotated(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`_rotate` in plain arithmetic, without writes into views."""
    half = x.size(-1) // 2
    first, second = x[:, :, :2, :, :half], x[:, :, :2, :, half:]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return torch.cat([rotated, x[:, :, 2:]], dim=2)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, L, 3, H, Dh): in the q and k slots, pairs (x[..., i], x[..., i + Dh/2]) rotated by the angles
    of cos/sin (broadcast to x[:, :, :2, :, :Dh/2]); the v slot copied unchanged (rotating it by angle 0
    cost a third of the work)."""
    half = x.size(-1) // 2
    out = torch.empty_like(x)
    out[:, :, 2] = x[:, :, 2]
    qk, out_qk = x[:, :, :2], out[:, :, :2]
    first, second = qk[..., :half], qk[..., half:]
    torch.mul(first, cos, out=out_qk[..., :half]).addcmul_(second, sin, value=-1)
    torch.mul(first, sin, out=out_qk[..., half:]).addcmul_(second, cos)
    return out


class _Rotation(torch.autograd.Function):
    """`_rotate` written into one new tensor, keeping nothing of x for backward (which rotates back).

    The same as a few lines of tensor arithmetic, but those leave half a dozen temporaries of
    q/k/v size per layer that fragment the allocator's heap: training peaked ~70 MB higher.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class _ByteMaskDropout(torch.autograd.Function):
    """Dropout from 15-bit random integers, keeping a 1-byte mask for the backward pass.

    PyTorch's CPU dropout draws a float mask with `bernoulli_` and keeps it (4 bytes per
    activation). `random_` on int32 gives 31 random bits per draw; splitting each word into two
    15-bit samples is ~3x faster, and the bool mask takes a quarter of the memory. The drop
    probability is rounded to a multiple of 1/32768 and the scale uses the rounded value, so the
    expectation stays exact.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        dropped = round(p * 32768)
        words = torch.empty((x.numel() + 1) // 2, dtype=torch.int32, device=x.device).random_()
        samples = words.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF  # uniform over 0..32767
        keep = samples >= dropped
        ctx.scale = 32768 / (32768 - dropped)
        ctx.save_for_backward(keep)
        return torch.where(keep, x * ctx.scale, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None


class Dropout(nn.Dropout):
    """nn.Dropout; on the CPU with a byte mask and a faster random draw (`_ByteMaskDropout`).

    CUDA's fused dropout kernel already keeps a byte mask, so other devices use it unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if torch.compiler.is_compiling():  # the compiler fuses its own dropout; an int16 view defeats its tracing
            return super().forward(x)
        return _ByteMaskDropout.apply(x, self.p)
