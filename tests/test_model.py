import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import Tensor, nn

from mt.model import (
    CrossAttention,
    SelfAttention,
    causal_mask,
    cross_attention_weights,
    decoder_self_mask,
    padding_mask,
    sinusoidal_positions,
)
from mt.ops import Dropout, Rotary, _rotated
from mt.vocab import BOS, EOS, PAD


def test_padding_and_causal_masks():
    tokens = torch.tensor([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    assert padding_mask(tokens).tolist() == [[True, True, True, False], [True, True, False, False]]
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    mask = decoder_self_mask(torch.tensor([[BOS, 5, PAD], [BOS, 6, 7]]))
    assert mask.shape == (2, 1, 3, 3)
    # query 2 of sentence 0 may see BOS and 5 but not its own padded position
    assert mask[0, 0, 2].tolist() == [True, True, False]
    assert mask[1, 0, 2].tolist() == [True, True, True]
    assert mask[1, 0, 0].tolist() == [True, False, False]


def test_sinusoidal_positions():
    table = sinusoidal_positions(50, 8)
    assert table.shape == (50, 8)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0] * 4))
    assert math.isclose(table[3, 0].item(), math.sin(3), rel_tol=1e-6)
    assert math.isclose(table[3, 3].item(), math.cos(3 / 10000 ** (2 / 8)), rel_tol=1e-6)


def _reference_attention(dim, heads, q_weight, k_weight, v_weight, biases, out):
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([q_weight, k_weight, v_weight]))
        reference.in_proj_bias.copy_(biases)
        reference.out_proj.weight.copy_(out.weight)
        reference.out_proj.bias.copy_(out.bias)
    return reference.eval()


def test_self_attention_matches_torch_multihead_attention():
    dim, heads = 32, 4
    ours = SelfAttention(dim, heads, dropout=0.0).eval()
    nn.init.normal_(ours.qkv_proj.bias)
    q_w, k_w, v_w = ours.qkv_proj.weight.chunk(3)
    reference = _reference_attention(dim, heads, q_w, k_w, v_w, ours.qkv_proj.bias, ours.out_proj)
    x = torch.randn(3, 7, dim)
    tokens = torch.tensor([[BOS, 4, 5, 6, 7, 8, 9], [BOS, 4, 5, PAD, PAD, PAD, PAD], [BOS, 4, 5, 6, 7, PAD, PAD]])
    ours_out, _ = ours(x, decoder_self_mask(tokens))
    # torch's masks say True = "blocked": the opposite of ours
    ref_out, _ = reference(x, x, x, attn_mask=~causal_mask(7), key_padding_mask=~padding_mask(tokens))
    real = padding_mask(tokens)
    assert torch.allclose(ours_out[real], ref_out[real], atol=1e-5)
    # the decoder's causal attention needs no padding mask for its real positions
    ours.causal = True
    causal_out, _ = ours(x, None)
    assert torch.allclose(causal_out[real], ref_out[real], atol=1e-5)


def _cross_attention_and_reference(dim=32, heads=4):
    """Our cross-attention, torch's MultiheadAttention with the same weights, and inputs with padding."""
    ours = CrossAttention(dim, heads, dropout=0.0).eval()
    nn.init.normal_(ours.q_proj.bias)
    nn.init.normal_(ours.kv_proj.bias)
    k_w, v_w = ours.kv_proj.weight.chunk(2)
    biases = torch.cat([ours.q_proj.bias, ours.kv_proj.bias])
    reference = _reference_attention(dim, heads, ours.q_proj.weight, k_w, v_w, biases, ours.out_proj)
    x, memory = torch.randn(2, 5, dim), torch.randn(2, 6, dim)
    src = torch.tensor([[4, 5, 6, EOS, PAD, PAD], [4, 5, 6, 7, 8, EOS]])
    return ours, reference, x, memory, src


def test_cross_attention_matches_torch_multihead_attention():
    ours, reference, x, memory, src = _cross_attention_and_reference()
    mask = padding_mask(src)[:, None, None, :]
    ours_out = ours(x, ours.memory_keys(memory), mask)
    ref_out, _ = reference(x, memory, memory, key_padding_mask=~padding_mask(src))
    assert torch.allclose(ours_out, ref_out, atol=1e-5)


def test_cross_attention_weights_are_those_the_attention_uses():
    """The heatmap weights are those torch's MultiheadAttention computes with the same weights."""
    ours, reference, x, memory, src = _cross_attention_and_reference()
    heads = ours.heads
    mask = padding_mask(src)[:, None, None, :]
    weights = ours.weights(x, ours.memory_keys(memory), mask)
    _, ref_weights = reference(
        x, memory, memory, key_padding_mask=~padding_mask(src), need_weights=True, average_attn_weights=False
    )
    assert torch.allclose(weights, ref_weights, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, heads, 5)) and (weights[0, ..., 4:] == 0).all()


def test_cross_attention_weights_of_the_whole_model():
    model = tiny_model().eval()
    src, tgt_in = torch.tensor([[5, 6, 7, EOS, PAD], [8, 9, 10, 11, EOS]]), torch.tensor([[BOS, 7, 6], [BOS, 9, 8]])
    weights = cross_attention_weights(model, src, tgt_in)
    assert weights.shape == (len(model.decoder), 2, 4, 3, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6)
    assert (weights[:, 0, ..., 4] == 0).all()  # the padded source position gets no attention
    assert all(not layer.cross_attn._forward_pre_hooks for layer in model.decoder)


def test_cross_attention_groups_hypotheses_of_a_sentence():
    """K hypotheses per sentence attending to one copy of the memory equal K copies of it."""
    attention = CrossAttention(32, 4, dropout=0.0).eval()
    memory, x = torch.randn(2, 6, 32), torch.randn(6, 1, 32)  # 2 sentences x 3 hypotheses
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    grouped = attention(x, attention.memory_keys(memory), mask)
    expanded = memory.repeat_interleave(3, dim=0)
    copies = attention(x, attention.memory_keys(expanded), mask.repeat_interleave(3, dim=0))
    assert torch.allclose(grouped, copies, atol=1e-6)


def test_cpu_dropout_drops_p_scales_the_rest_and_keeps_only_a_byte_mask():
    torch.manual_seed(0)
    dropout = Dropout(0.1)
    x = torch.randn(999, 301, requires_grad=True)  # odd element count: the 16-bit samples do not pair up
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x)
    kept = y != 0
    assert abs((~kept).float().mean().item() - 0.1) < 0.005
    scale = 1 / (1 - round(0.1 * 32768) / 32768)
    assert torch.allclose(y[kept], x[kept] * scale)
    assert [t.dtype for t in saved] == [torch.bool]  # not a float mask, nor the input
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept * torch.tensor(scale))
    assert abs(dropout(torch.ones(1_000_000)).mean().item() - 1) < 0.005  # the expectation is unchanged
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_rotary_attention_scores_depend_only_on_distance():
    rotary = Rotary(head_dim=8, max_positions=64)
    qkv = torch.randn(1, 1, 3, 1, 8)  # (B, L, q/k/v, H, Dh)

    def score(query_position: int, key_position: int) -> Tensor:
        return (rotary(qkv, query_position)[0, 0, 0] * rotary(qkv, key_position)[0, 0, 1]).sum()

    assert torch.allclose(score(3, 1), score(40, 38), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(40, 30), atol=1e-3)
    assert torch.allclose(rotary(qkv, 0), qkv)  # position 0 is not rotated
    assert torch.equal(rotary(qkv, 17)[:, :, 2], qkv[:, :, 2])  # values never are


def test_rotary_backward_is_the_gradient_of_the_rotation():
    rotary = Rotary(head_dim=6, max_positions=16).double()
    qkv = torch.randn(2, 5, 3, 2, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rotary(x, offset=4), (qkv,))
    # and the same as autograd through the plain formula
    half, cos, sin = 3, rotary.cos[4:9, None, None], rotary.sin[4:9, None, None]
    qk, v = qkv[:, :, :2], qkv[:, :, 2:]
    first, second = qk[..., :half], qk[..., half:]
    plain = torch.cat([torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1), v], dim=2)
    grad = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, qkv, grad)[0]
    assert torch.allclose(rotary(qkv, 4), plain)
    assert torch.allclose(torch.autograd.grad(rotary(qkv, 4), qkv, grad)[0], expected)
    assert torch.allclose(_rotated(qkv, cos, sin), plain)  # the form torch.compile traces


@pytest.mark.parametrize("norm, position", [("pre", "sinusoidal"), ("post", "sinusoidal"), ("pre", "rope")])
def test_padding_does_not_change_encoder_output(norm, position):
    model = tiny_model(norm=norm, position=position).eval()
    short = torch.tensor([[5, 6, 7, EOS]])
    padded = torch.tensor([[5, 6, 7, EOS, PAD, PAD, PAD], [8, 9, 10, 11, 12, 13, EOS]])
    alone, _ = model.encode(short)
    together, _ = model.encode(padded)
    assert torch.allclose(alone[0], together[0, :4], atol=1e-5)
    assert not torch.isnan(together).any()


def test_padding_does_not_change_decoder_output_and_never_gives_nan():
    model = tiny_model().eval()
    src = torch.tensor([[5, 6, EOS, PAD], [7, 8, 9, EOS]])
    tgt = torch.tensor([[BOS, 11, 12, PAD, PAD], [BOS, 13, 14, 15, 16]])
    hidden = model(src, tgt)
    alone = model(src[:1, :3], tgt[:1, :3])
    assert torch.allclose(hidden[0, :3], alone[0], atol=1e-5)
    assert not torch.isnan(hidden).any()


def test_tied_embeddings_share_one_matrix():
    model = tiny_model(tie=True)
    assert model.src_embed.weight is model.tgt_embed.weight
    assert model.output_proj is None
    untied = tiny_model(tie=False)
    assert untied.output_proj is not None


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_cached_step_equals_full_decoder(position):
    model = tiny_model(position=position).eval()
    src = torch.tensor([[5, 6, 7, EOS, PAD], [8, 9, 10, 11, EOS]])
    tgt = torch.tensor([[BOS, 12, 13, 14], [BOS, 15, 16, 17]])
    memory, mask = model.encode(src)
    full = model.logits(model.decode(tgt, memory, mask))
    state = model.start_decoding(memory, mask, use_cache=True)
    for t in range(tgt.size(1)):
        hidden, state = model.step(tgt[:, : t + 1], state)
        assert torch.allclose((hidden @ state.output_weight)[:, : full.size(-1)], full[:, t], atol=1e-5)


def test_training_step_reduces_loss():
    from mt.loss import label_smoothed_nll

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    src = torch.tensor([[5, 6, 7, EOS]] * 4)
    tgt_in, tgt_out = torch.tensor([[BOS, 7, 6, 5]] * 4), torch.tensor([[7, 6, 5, EOS]] * 4)
    losses = []
    for _ in range(30):
        loss, _ = label_smoothed_nll(model.logits(model(src, tgt_in)).flatten(0, 1), tgt_out.flatten(), 0.1)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] / 3


def test_projection_columns_pad_to_the_alignment_with_zeros():
    from mt.model import PROJECTION_ALIGNMENT, projection_columns

    weight = torch.randn(37, 8)  # (V, D)
    padded = projection_columns(weight)
    assert padded.shape == (8, -(-37 // PROJECTION_ALIGNMENT) * PROJECTION_ALIGNMENT)
    assert torch.equal(padded[:, :37], weight.t()) and not padded[:, 37:].any()
    columns = torch.tensor([3, 5, 36])
    chosen = projection_columns(weight, columns)
    assert chosen.shape == (8, PROJECTION_ALIGNMENT) and torch.equal(chosen[:, :3], weight[columns].t())


def test_attention_runs_in_fp32_under_cpu_bf16_autocast(monkeypatch):
    import mt.model

    seen = []
    sdpa = mt.model.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(mt.model.F, "scaled_dot_product_attention", recording)
    model = tiny_model(position="rope")
    src, tgt_in = torch.tensor([[5, 6, 7, EOS]] * 2), torch.tensor([[BOS, 7, 6, 5]] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(src, tgt_in)
    # all three attentions of every layer in fp32, outside autocast (which would cast them back)
    assert seen == [(torch.float32,) * 3 + (False,)] * 6
    hidden.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(src, tgt_in)
    assert seen == [(torch.float32,) * 3 + (False,)] * 6  # and in inference


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_equals_f_linear_and_keeps_autograd_and_autocast_to_torch(monkeypatch, onednn):
    import mt.ops
    from mt.ops import Linear, linear

    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(mt.ops, "onednn_multiplies_fp32", lambda: onednn)
    calls = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(mt.ops, "_onednn_linear", lambda *args: calls.append(1) or pointwise(*args))
    layer = Linear(16, 24)
    weight_t = torch.randn(16, 24)  # a transposed view as the weight: search's output projection
    for x in (torch.randn(17, 16), torch.randn(3, 6, 16)):
        with torch.no_grad():
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
            assert torch.allclose(linear(x, weight_t.t()), x @ weight_t, atol=1e-5)
    assert len(calls) == (4 if onednn else 0)
    calls.clear()
    with torch.no_grad():
        layer(torch.randn(2, 16))  # too few rows for oneDNN
    x = torch.randn(17, 16, requires_grad=True)
    layer(x).sum().backward()  # with autograd: F.linear
    assert x.grad is not None and torch.allclose(x.grad, layer.weight.sum(dim=0).expand(17, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(17, 16)).dtype == torch.bfloat16  # autocast's own choice
    assert calls == []
    assert set(layer.state_dict()) == {"weight", "bias"}  # checkpoints of nn.Linear load unchanged


def test_onednn_row_buckets_cover_the_rows_with_little_waste():
    from mt.ops import onednn_rows

    buckets = {onednn_rows(rows) for rows in range(1, 5000)}
    assert len(buckets) < 80  # a few dozen product shapes for oneDNN to keep, not thousands
    for rows in range(1, 5000):
        bucket = onednn_rows(rows)
        assert bucket >= rows and bucket % 8 == 0 and onednn_rows(bucket) == bucket
        assert rows <= 256 or bucket <= rows * 1.125


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.02), ("bf16", 0.01)])
def test_cpu_products_are_close_to_fp32_and_run_only_where_asked(kind, tolerance):
    from mt.ops import Linear, cpu_products

    torch.manual_seed(0)
    layer, x = Linear(64, 48), torch.randn(3, 7, 64)
    x[0, 0] = 0  # a row of zeros: its int8 scale must not divide by zero
    with torch.no_grad():
        exact = F.linear(x, layer.weight, layer.bias)
        with cpu_products(kind):
            reduced = layer(x)
        assert torch.equal(layer(x), linear_fp32(layer, x))  # outside the context: fp32 as before
    assert reduced.shape == exact.shape and reduced.dtype == torch.float32
    assert not torch.allclose(reduced, exact, atol=1e-5)
    assert (reduced - exact).abs().max() < tolerance * exact.abs().max()
    bias = layer.bias.detach()
    assert torch.equal(reduced[0, 0], bias if kind == "int8" else bias.bfloat16().float())  # bf16: bias in the product
    with cpu_products(kind):
        assert layer(x).requires_grad  # with autograd: the fp32 product and its backward
        with torch.no_grad():
            layer.weight.mul_(2)  # a changed weight is converted again
            doubled = F.linear(x, layer.weight, layer.bias)
            assert (layer(x) - doubled).abs().max() < tolerance * doubled.abs().max()
    other = "bf16" if kind == "int8" else "int8"
    with torch.no_grad(), cpu_products(other):  # the other kind: its own weight, not the cached one
        assert (layer(x) - doubled).abs().max() < 0.02 * doubled.abs().max()
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_cpu_products_know_only_int8_and_bf16():
    from mt.ops import cpu_products

    with pytest.raises(ValueError, match="'fp16' is not one of"):
        with cpu_products("fp16"):
            pass


def linear_fp32(layer, x):
    from mt.ops import linear

    return linear(x, layer.weight, layer.bias)


def test_a_reduced_shortlist_projection_gives_the_full_projections_columns():
    from mt.model import PROJECTION_ALIGNMENT, project, reduced_projection
    from mt.ops import Bf16Weight, bf16_linear, int8_linear, quantize_rows, reduce

    weight, hidden = torch.randn(50, 32), torch.randn(9, 32)
    full = quantize_rows(weight)
    assert full.values.dtype == torch.int8 and full.values.abs().max() == 127
    assert torch.allclose(full.values * full.scales[:, None], weight, atol=full.scales.max().item() / 2 + 1e-6)
    columns = torch.tensor([0, 3, 17, 49])
    chosen = reduced_projection(full, columns)
    assert len(chosen.values) == PROJECTION_ALIGNMENT and not chosen.values[4:].any()
    logits = project(hidden, chosen)
    assert torch.equal(logits[:, :4], int8_linear(hidden, full)[:, columns])  # integer sums: exactly
    assert not logits[:, 4:].any()

    in_bf16 = reduce(weight, "bf16")
    assert isinstance(in_bf16, Bf16Weight) and in_bf16.values.dtype == torch.bfloat16
    chosen = reduced_projection(in_bf16, columns)
    assert isinstance(chosen, Bf16Weight) and len(chosen.values) == PROJECTION_ALIGNMENT
    logits = project(hidden, chosen)
    assert logits.dtype == torch.float32 and not logits[:, 4:].any()
    assert torch.allclose(logits[:, :4], bf16_linear(hidden, in_bf16)[:, columns], atol=1e-5)
    assert torch.allclose(logits[:, :4], hidden @ weight[columns].t(), atol=0.05)
    assert len(reduced_projection(in_bf16).values) == 64  # the whole layer, padded to the alignment


def test_int8_precision_is_for_the_cpu_only():
    from mt.device import decoding_precision
    from mt.errors import MTError

    with pytest.raises(MTError, match="int8 products run on the CPU only"):
        decoding_precision(torch.device("cuda"), "int8")


@pytest.mark.parametrize("amx, vnni, expected", [(True, True, "bf16"), (False, True, "int8"), (False, False, "fp32")])
def test_fastest_precision_follows_the_cpus_instructions(monkeypatch, amx, vnni, expected):
    import mt.device
    from mt.device import decoding_precision, resolve_precision, slow_precision
    from mt.ops import reduced_products

    monkeypatch.setattr(mt.device, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(mt.device, "cpu_multiplies_int8", lambda: vnni)
    monkeypatch.setattr(mt.device, "cpu_multiplies_bf16", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fastest") == expected
    assert resolve_precision(cpu, "int8") == "int8" and resolve_precision(torch.device("cuda"), "fastest") == "auto"
    assert slow_precision(cpu, resolve_precision(cpu, "fastest")) is None  # never a precision the CPU lacks
    with torch.no_grad(), decoding_precision(cpu, "fastest"):
        assert reduced_products(torch.zeros(1)) == (None if expected == "fp32" else expected)


def test_cpu_decoding_in_bf16_multiplies_in_bf16_and_keeps_the_rest_in_fp32():
    from mt.device import decoding_precision

    model = tiny_model(position="rope").eval()
    src, tgt_in = torch.tensor([[5, 6, 7, EOS]] * 2), torch.tensor([[BOS, 7, 6, 5]] * 2)
    with torch.inference_mode():
        exact = model.logits(model(src, tgt_in))
        with decoding_precision(torch.device("cpu"), "bf16"):
            assert not torch.is_autocast_enabled("cpu")  # no autocast: activations stay fp32
            hidden = model(src, tgt_in)
            logits = model.logits(hidden)
    assert hidden.dtype == logits.dtype == torch.float32
    assert not torch.equal(logits, exact) and torch.allclose(logits, exact, atol=0.05 * exact.abs().max().item())


def test_a_new_engine_decodes_with_the_weights_training_has_since_changed():
    from mt.decoding import DecodeOptions, TorchEngine
    from mt.device import decoding_precision

    # the fused AdamW (training's) changes weights in place without bumping their version counter, so
    # int8/bf16 weights kept from an earlier validation would go stale if the engine did not forget them
    torch.manual_seed(0)
    model = tiny_model(position="rope")
    src, tgt_in = torch.tensor([[5, 6, 7, EOS]] * 2), torch.tensor([[BOS, 7, 6, 5]] * 2)
    cpu = torch.device("cpu")
    for kind in ("bf16", "int8"):
        TorchEngine(model, cpu).search([[5, 6, 7]], DecodeOptions(beam=1, precision=kind))  # weights made and kept
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        model.train()
        model.logits(model(src, tgt_in)).logsumexp(-1).sum().backward()
        optimizer.step()
        model.eval()
        TorchEngine(model, cpu)  # what validation builds each time
        with torch.inference_mode():
            exact = model.logits(model(src, tgt_in))
            with decoding_precision(cpu, kind):
                reduced = model.logits(model(src, tgt_in))
        assert (reduced - exact).abs().max() < 0.05 * exact.abs().max()
