"""An encoder-decoder Transformer (Vaswani et al., 2017), written out layer by layer.

Shapes: B sentences, S source length, T target length, D = d_model, H heads, Dh = D // H,
V vocabulary size. Tensors are batch-first.

Mask convention (one for the whole package): boolean, True means "may attend". Sequences are
padded on the right with PAD, and every sequence holds at least one real token (EOS or BOS), so
no attention row is ever fully masked and padded queries never produce NaN.

During search the decoder runs one position per step: each layer's self-attention keys/values
are cached, and the cross-attention keys/values of the encoder output are computed once per
sentence. Beam hypotheses of one sentence share those: the beam rows are folded into the query
axis, (B*K, 1, D) -> (B, K, D), so reordering beams never copies encoder keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.config import ModelConfig
from mt.ops import (
    Bf16Weight,
    Dropout,
    Int8Weight,
    Linear,
    ReducedWeight,
    Rotary,
    cached_reduced,
    linear,
    reduced_linear,
    reduced_products,
)
from mt.vocab import PAD

KeyValue = tuple[Tensor, Tensor]  # each (B, H, L, Dh)

# A product (R, D) x (D, N) on the CPU (MKL) runs at about half speed when N is not a multiple of 16
# floats (a shortlist's 3,398 candidates: 30-37 GFLOP/s on one core, 48-61 padded to 3,408).
PROJECTION_ALIGNMENT = 16


def padding_mask(tokens: Tensor) -> Tensor:
    """(B, L) token ids -> (B, L) bool, True at real tokens."""
    return tokens != PAD


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """(T, T) bool, True where key position <= query position (no look-ahead)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def decoder_self_mask(tgt: Tensor) -> Tensor:
    """(B, T) target ids -> (B, 1, T, T): causal and not attending to padding."""
    return causal_mask(tgt.size(1), tgt.device) & padding_mask(tgt)[:, None, None, :]


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(length, dim) table: sin on even channels, cos on odd, wavelengths 2pi .. 10000*2pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, D) -> (B, H, L, Dh)"""
    batch, length, dim = x.shape
    return x.view(batch, length, heads, dim // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, Dh) -> (B, L, D)"""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _append(cached: Tensor, new: Tensor, rows: Tensor | None) -> Tensor:
    """cat([cached[rows], new], dim=2) with one copy of the cache: (R, H, t, Dh) -> (R', H, t+L, Dh)."""
    count, heads, length, head_dim = cached.shape
    out = new.new_empty(count if rows is None else rows.numel(), heads, length + new.size(2), head_dim)
    if rows is None:
        out[:, :, :length] = cached
    else:
        torch.index_select(cached, 0, rows, out=out[:, :, :length])
    out[:, :, length:] = new
    return out


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool = False) -> Tensor:
    """Scaled dot-product attention (B, H, L, Dh) -> (B, H, L, Dh), in q's dtype.

    On the CPU it always computes in fp32, also under bf16/fp16 autocast: the CPU's half-precision
    kernel runs slower there (its backward ~3.5x at the presets' training shapes, a cached search
    step 1.2-1.6x), more than the half-precision matrix products around it save. Search keeps its
    keys and values in fp32 on the CPU for this (`_cpu_fp32`), so only the new position is cast.
    """
    dtype = q.dtype
    if q.device.type == "cpu" and {dtype, k.dtype, v.dtype} != {torch.float32}:
        with torch.autocast("cpu", enabled=False):  # autocast would cast fp32 inputs back down
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout, is_causal=causal
            )
        return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def _cpu_fp32(x: Tensor) -> Tensor:
    """Keys/values kept for later search steps: fp32 on the CPU (where `_attend` computes in fp32)."""
    return x.float() if x.device.type == "cpu" and x.dtype != torch.float32 else x


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection.

    `causal` (the decoder's): with no explicit mask, each position sees itself and earlier ones.
    Padding is on the right, so a causal mask alone already keeps real positions from padded
    keys; leaving out the padding mask lets SDPA use its causal kernels (flash attention on GPUs).
    """

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool = False, rotary: Rotary | None = None):
        super().__init__()
        self.heads, self.dropout, self.causal, self.rotary = heads, dropout, causal, rotary
        self.qkv_proj = Linear(dim, 3 * dim)
        self.out_proj = Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        cache: KeyValue | None = None,
        cache_rows: Tensor | None = None,
        offset: int = 0,
    ) -> tuple[Tensor, KeyValue]:
        """x (B, L, D) at positions offset..offset+L-1; mask broadcastable to (B, H, L, L_total).

        `cache` holds earlier positions' keys/values; row r of the output continues row
        `cache_rows[r]` of the cache (beam reordering). Returns the output (B, L, D) and the
        keys/values of all positions seen so far (keys already rotated, with rotary positions).
        """
        batch, length, dim = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.heads, dim // self.heads)
        if self.rotary is not None:
            # one new q/k/v tensor, so SDPA keeps it alone for backward: a v that still viewed the
            # projection's output would keep the unrotated q and k alive as well
            qkv = self.rotary(qkv, offset)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        k, v = _cpu_fp32(k), _cpu_fp32(v)
        if cache is not None:
            k, v = _append(cache[0], k, cache_rows), _append(cache[1], v, cache_rows)
        dropout = self.dropout if self.training else 0.0
        causal = self.causal and mask is None and cache is None  # a cached step sees all earlier positions
        out = _attend(q, k, v, mask, dropout, causal)
        return self.out_proj(_merge_heads(out)), (k, v)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder states to the encoder output."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = Linear(dim, dim)
        self.kv_proj = Linear(dim, 2 * dim)
        self.out_proj = Linear(dim, dim)

    def memory_keys(self, memory: Tensor) -> KeyValue:
        """Encoder output (B, S, D) -> keys and values, each (B, H, S, Dh); computed once per sentence."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return _cpu_fp32(_split_heads(k, self.heads)), _cpu_fp32(_split_heads(v, self.heads))

    def weights(self, x: Tensor, memory_kv: KeyValue, mask: Tensor) -> Tensor:
        """The attention probabilities `forward` uses: x (B, T, D) -> (B, H, T, S)."""
        q = _split_heads(self.q_proj(x), self.heads)
        scores = q @ memory_kv[0].transpose(-2, -1) / math.sqrt(q.size(-1))
        return scores.masked_fill(~mask, -torch.inf).softmax(dim=-1)

    def forward(self, x: Tensor, memory_kv: KeyValue, mask: Tensor) -> Tensor:
        """x (B*K, L, D) for K hypotheses per sentence; memory_kv for B sentences; mask (B, 1, 1, S)."""
        rows, length, dim = x.shape
        sentences = memory_kv[0].size(0)
        # the K hypotheses of a sentence attend to the same keys: treat them as K*L queries
        q = _split_heads(self.q_proj(x).reshape(sentences, -1, dim), self.heads)
        dropout = self.dropout if self.training else 0.0
        out = _attend(q, *memory_kv, mask, dropout)
        return self.out_proj(_merge_heads(out).reshape(rows, length, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # in place: the ReLU backward needs only its output, so fc1's output need not be kept as well
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class Residual(nn.Module):
    """Pre-norm: x + dropout(f(norm(x))). Post-norm: norm(x + dropout(f(x)))."""

    def __init__(self, dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm, self.dropout, self.pre_norm = nn.LayerNorm(dim), Dropout(dropout), pre_norm

    def sublayer_input(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.pre_norm else x

    def add(self, x: Tensor, sublayer_output: Tensor) -> Tensor:
        x = x + self.dropout(sublayer_output)
        return x if self.pre_norm else self.norm(x)


class EncoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, rotary: Rotary | None = None):
        super().__init__()
        pre = c.norm == "pre"
        self.self_attn = SelfAttention(c.d_model, c.heads, c.attention_dropout, rotary=rotary)
        self.ffn = FeedForward(c.d_model, c.ffn_dim, c.activation_dropout)
        self.attn_block, self.ffn_block = Residual(c.d_model, c.dropout, pre), Residual(c.d_model, c.dropout, pre)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S)."""
        attended, _ = self.self_attn(self.attn_block.sublayer_input(x), mask)
        x = self.attn_block.add(x, attended)
        return self.ffn_block.add(x, self.ffn(self.ffn_block.sublayer_input(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, rotary: Rotary | None = None):
        super().__init__()
        pre = c.norm == "pre"
        self.self_attn = SelfAttention(c.d_model, c.heads, c.attention_dropout, causal=True, rotary=rotary)
        self.cross_attn = CrossAttention(c.d_model, c.heads, c.attention_dropout)
        self.ffn = FeedForward(c.d_model, c.ffn_dim, c.activation_dropout)
        self.self_block, self.cross_block, self.ffn_block = (Residual(c.d_model, c.dropout, pre) for _ in range(3))

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        memory_kv: KeyValue,
        memory_mask: Tensor,
        cache: KeyValue | None = None,
        cache_rows: Tensor | None = None,
        offset: int = 0,
    ) -> tuple[Tensor, KeyValue]:
        """x (B*K, T, D) at positions offset..; self_mask (B*K, 1, T, T), or None: causal (or one cached step)."""
        attended, kv = self.self_attn(self.self_block.sublayer_input(x), self_mask, cache, cache_rows, offset)
        x = self.self_block.add(x, attended)
        x = self.cross_block.add(x, self.cross_attn(self.cross_block.sublayer_input(x), memory_kv, memory_mask))
        return self.ffn_block.add(x, self.ffn(self.ffn_block.sublayer_input(x))), kv


@dataclass
class DecoderState:
    """What the decoder needs between search steps; `select` reorders or drops rows.

    memory/src_mask/cross_kv have one row per sentence; self_kv has one row per hypothesis.
    self_kv is None on the uncached reference path, which reruns the decoder on the whole prefix.
    A reordering of hypotheses is only recorded (`self_rows`); the next step applies it while it
    appends to the cache, so the cache is copied once per step, not twice.
    """

    memory: Tensor  # (B, S, D)
    memory_mask: Tensor  # (B, 1, 1, S)
    cross_kv: list[KeyValue]  # per layer
    self_kv: list[KeyValue | None] | None  # per layer, each (B*K, H, t, Dh); None before the first step
    # (D, V'): the output projection, transposed and zero-padded to V' >= V columns once per batch
    # (`projection_columns`), or its int8 or bf16 rows (V', D) under `cpu_products`; logits are
    # project(hidden, output_weight)[:, :V] (with a shortlist only its candidates' columns: mt.stepping)
    output_weight: Tensor | ReducedWeight
    self_rows: Tensor | None = None  # row r of the next step continues cached row self_rows[r]

    def select(self, rows: Tensor, sentences: Tensor | None = None) -> DecoderState:
        """Keep hypothesis rows `rows` (and sentences `sentences`, when some sentences are dropped)."""
        state = self
        if sentences is not None:
            state = replace(
                state,
                memory=state.memory.index_select(0, sentences),
                memory_mask=state.memory_mask.index_select(0, sentences),
                cross_kv=[(k.index_select(0, sentences), v.index_select(0, sentences)) for k, v in state.cross_kv],
            )
        if state.self_kv is not None:
            state = replace(state, self_rows=rows if state.self_rows is None else state.self_rows[rows])
        return state


class Transformer(nn.Module):
    _reduced: tuple[tuple, ReducedWeight] | None = None  # the output projection in int8 or bf16 (`cached_reduced`)

    def __init__(self, config: ModelConfig, src_vocab: int, tgt_vocab: int, shared_vocab: bool):
        super().__init__()
        self.config, self.dim = config, config.d_model
        self.src_embed = nn.Embedding(src_vocab, config.d_model, padding_idx=PAD)
        share = config.tie_embeddings and shared_vocab
        self.tgt_embed = self.src_embed if share else nn.Embedding(tgt_vocab, config.d_model, padding_idx=PAD)
        self.output_proj = None if config.tie_embeddings else Linear(config.d_model, tgt_vocab, bias=False)
        self.max_positions = config.max_positions
        # absolute positions: a fixed sinusoidal table or a learned one, added to the embeddings
        self.position_embed = (
            nn.Embedding(config.max_positions, config.d_model) if config.position == "learned" else None
        )
        if config.position == "sinusoidal":
            self.register_buffer(
                "positions", sinusoidal_positions(config.max_positions, config.d_model), persistent=False
            )
        rotary = Rotary(config.d_model // config.heads, config.max_positions) if config.position == "rope" else None
        self.embed_dropout = Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config, rotary) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config, rotary) for _ in range(config.decoder_layers))
        # pre-norm stacks end un-normalised; post-norm layers already end with a norm
        final_norm = (lambda: nn.LayerNorm(config.d_model)) if config.norm == "pre" else nn.Identity
        self.encoder_norm, self.decoder_norm = final_norm(), final_norm()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.dim**-0.5)
                if module is not self.position_embed:  # row 0 of the position table is position 0
                    with torch.no_grad():
                        module.weight[PAD].zero_()

    def _embed(self, tokens: Tensor, table: nn.Embedding, offset: int = 0) -> Tensor:
        """(B, L) ids -> (B, L, D): scaled embedding plus the positions offset..offset+L-1."""
        length = tokens.size(1)
        if offset + length > self.max_positions:
            raise ValueError(
                f"sequence of {offset + length} positions exceeds model.max_positions={self.max_positions}"
            )
        x = table(tokens) * math.sqrt(self.dim)
        if self.position_embed is not None:
            x = x + self.position_embed.weight[offset : offset + length]
        elif self.config.position == "sinusoidal":
            x = x + self.positions[offset : offset + length]
        return self.embed_dropout(x)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) ids -> memory (B, S, D) and its mask (B, 1, 1, S)."""
        mask = padding_mask(src)[:, None, None, :]
        x = self._embed(src, self.src_embed)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Whole-sequence decoder: tgt_in (B*K, T) ids (BOS first) -> hidden states (B*K, T, D)."""
        x = self._embed(tgt_in, self.tgt_embed)
        for layer in self.decoder:
            # causal attention without a padding mask: padded positions come last (see SelfAttention)
            x, _ = layer(x, None, layer.cross_attn.memory_keys(memory), memory_mask)
        return self.decoder_norm(x)

    @property
    def output_weight(self) -> Tensor:
        """(V, D): the output projection (the target embedding when tied)."""
        return self.tgt_embed.weight if self.output_proj is None else self.output_proj.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V)"""
        kind = reduced_products(hidden)
        if kind is not None:
            return reduced_linear(hidden, cached_reduced(self, self.output_weight, kind))
        return linear(hidden, self.output_weight)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> decoder hidden states (B, T, D).

        Call `logits` on the states you need (e.g. only non-padding positions, to save work).
        """
        memory, memory_mask = self.encode(src)
        return self.decode(tgt_in, memory, memory_mask)

    def start_decoding(
        self, memory: Tensor, memory_mask: Tensor, use_cache: bool = True, columns: Tensor | None = None
    ) -> DecoderState:
        """The state before the first step; `columns` (target ids) cuts the output layer to a shortlist."""
        cross_kv = [layer.cross_attn.memory_keys(memory) for layer in self.decoder] if use_cache else []
        self_kv = [None for _ in self.decoder] if use_cache else None
        kind = reduced_products(memory)
        if kind is not None:
            projection = reduced_projection(cached_reduced(self, self.output_weight, kind), columns)
        else:
            projection = projection_columns(self.output_weight, columns)
        return DecoderState(memory, memory_mask, cross_kv, self_kv, projection)

    def step(self, prefix: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """The decoder's output at the next position: prefix (B*K, t), every token so far (BOS first) -> (B*K, D).

        Its next-token logits are `project(hidden, state.output_weight)[:, :V]`.

        With a cache only the last token is run through the decoder; without one (the reference
        path) the whole prefix is. The cache of the `state` passed in is consumed: use the returned one.
        """
        if state.self_kv is None:
            return self.decode(prefix, state.memory, state.memory_mask)[:, -1], state
        offset = prefix.size(1) - 1
        x = self._embed(prefix[:, -1:], self.tgt_embed, offset)
        new_kv, old_kv = [], state.self_kv
        for i, (layer, memory_kv) in enumerate(zip(self.decoder, state.cross_kv)):
            x, kv = layer(x, None, memory_kv, state.memory_mask, old_kv[i], state.self_rows, offset)
            old_kv[i] = None  # free this layer's old cache now, not after the last layer (peak memory)
            new_kv.append(kv)
        return self.decoder_norm(x)[:, 0], replace(state, self_kv=new_kv, self_rows=None)


def projection_columns(weight: Tensor, columns: Tensor | None = None) -> Tensor:
    """(V, D) output projection -> (D, N') its transpose, only rows `columns` (N of them) if given, with
    zero columns appended up to a multiple of PROJECTION_ALIGNMENT. Search multiplies by it at
    every step: (R, D) x (D, N') runs faster than F.linear's (R, D) x (V, D)^T on the CPU."""
    if columns is not None:
        weight = weight.index_select(0, columns)
    count, dim = weight.shape
    padded = weight.new_zeros(dim, -(-count // PROJECTION_ALIGNMENT) * PROJECTION_ALIGNMENT)
    padded[:, :count] = weight.t()
    return padded


def reduced_projection(weight: ReducedWeight, columns: Tensor | None = None) -> ReducedWeight:
    """`projection_columns` of an int8 or bf16 output projection (V, D): its rows `columns` if given, zero
    rows appended up to a multiple of PROJECTION_ALIGNMENT; kept as rows, which `reduced_linear` multiplies by."""
    values = weight.values if columns is None else weight.values[columns]
    missing = -len(values) % PROJECTION_ALIGNMENT
    if missing:
        values = torch.cat([values, values.new_zeros(missing, values.size(1))])
    if isinstance(weight, Bf16Weight):
        return Bf16Weight(values)
    scales = weight.scales if columns is None else weight.scales[columns]
    if missing:  # scale 1 for the zero rows: their products stay 0
        scales = torch.cat([scales, scales.new_ones(missing)])
    return Int8Weight(values, scales)


def project(hidden: Tensor, weight: Tensor | ReducedWeight) -> Tensor:
    """Search's logits: hidden (R, D) times a `DecoderState.output_weight` -> (R, V')."""
    if isinstance(weight, (Int8Weight, Bf16Weight)):
        return reduced_linear(hidden, weight)
    return linear(hidden, weight.t())  # hidden @ weight


@torch.no_grad()
def cross_attention_weights(model: Transformer, src: Tensor, tgt_in: Tensor) -> Tensor:
    """Teacher-forced cross-attention of every decoder layer: src (B, S), tgt_in (B, T) -> (layers, B, H, T, S).

    Records each layer's cross-attention inputs while the ordinary decoder runs, so the weights
    are exactly those that layer's attention used.
    """
    captured: list[Tensor] = []

    def record(module: CrossAttention, args: tuple) -> None:
        captured.append(module.weights(*args))

    hooks = [layer.cross_attn.register_forward_pre_hook(record) for layer in model.decoder]
    try:
        model(src, tgt_in)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(captured)


def build_model(config: ModelConfig, src_vocab: int, tgt_vocab: int, shared_vocab: bool) -> Transformer:
    return Transformer(config, src_vocab, tgt_vocab, shared_vocab)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
