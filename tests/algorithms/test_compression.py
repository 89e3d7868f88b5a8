"""Update compression: codes on hand-computed numbers, the error bounds, top-k's choice, and error
feedback making the sum of what was sent follow the sum of the true deltas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.algorithms.compression import (NF4_LEVELS, CompressionConfig,
                                                 compress_state,
                                                 compress_tensor,
                                                 decompress_state,
                                                 decompress_tensor, dequantize,
                                                 lowrank_product, lowrank_shape,
                                                 quantize, select_topk)
from edge_runtime.errors import ConfigError


def _t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_int8_codes_and_values_by_hand():
    # absmax 127 -> scale 127 / 127 = 1 (exact in bfloat16); round half to even: 0.5 -> 0, 2.5 -> 2
    q = quantize(_t(127.0, -63.4, 0.5, 2.5, 0, 0, 0, 0), "int8", block=8)
    assert q.codes.dtype == torch.int8 and q.codes.tolist() == [127, -63, 0, 2, 0, 0, 0, 0]
    assert q.scales.dtype == torch.bfloat16 and q.scales.tolist() == [1.0]
    assert dequantize(q, 8).tolist() == [127.0, -63.0, 0.0, 2.0, 0, 0, 0, 0]


def test_int4_packs_two_codes_a_byte_low_nibble_first():
    # absmax 7 -> scale 1; codes 7, -7, 3, -1 -> +8 -> 15, 1, 11, 7 -> bytes 15 | 1 << 4, 11 | 7 << 4
    q = quantize(_t(7.0, -7.0, 3.4, -0.6), "int4", block=8)
    assert q.codes.dtype == torch.uint8 and q.codes.tolist() == [31, 123]
    assert dequantize(q, 8).tolist() == [7.0, -7.0, 3.0, -1.0]
    # an odd count pads the last byte's high nibble; the decoder reads n values only
    q = quantize(_t(7.0, 1.0, -7.0), "int4", block=8)
    assert q.codes.tolist() == [15 | 9 << 4, 1] and dequantize(q, 8).tolist() == [7.0, 1.0, -7.0]


def test_nf4_goes_to_the_nearest_normal_float_level():
    # absmax 1 -> scale 1; 1 -> level 15, -1 -> 0, 0 -> 7, 0.08 -> 8 (0.0796), 0.5 -> 12 (0.4407: 0.0593 away, 0.5626 is 0.0626)
    q = quantize(_t(1.0, -1.0, 0.0, 0.08, 0.5, 0.0), "nf4", block=8)
    assert q.codes.tolist() == [15 | 0 << 4, 7 | 8 << 4, 12 | 7 << 4]
    assert dequantize(q, 8).tolist() == pytest.approx([1.0, -1.0, 0.0, 0.07958, 0.44071, 0.0], abs=1e-5)


def test_nf2_goes_to_the_nearest_lloyd_max_level_of_the_blocks_rms():
    # sum of squares 9 + 9 + 6 = 24 over 8 values: RMS sqrt(3) = 1.7321, sent rounded up into bfloat16
    # as 1.734375; x / scale: 1.730 -> level 3 (1.5104), -1.730 -> 0, 0.577 -> 2 (0.4528), -0.577 -> 1
    q = quantize(_t(3.0, -3.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0), "nf2", block=8)
    assert q.scales.tolist() == [1.734375]
    assert q.codes.tolist() == [3 | 0 << 2 | 2 << 4 | 1 << 6, 2 | 1 << 2 | 2 << 4 | 1 << 6]   # 99, 102
    out = dequantize(q, 8)
    assert out.tolist() == pytest.approx([v * 1.734375 for v in (1.5104, -1.5104, 0.4528, -0.4528) + (0.4528, -0.4528) * 2])
    # the last block's RMS is over its own values, not its padding; an all-zero block is exact zeros
    q = quantize(_t(0, 0, 0, 0, 0, 0, 0, 0, 2.0), "nf2", block=8)
    assert q.scales.tolist() == [0.0, 2.0] and dequantize(q, 8).tolist() == pytest.approx([0.0] * 8 + [3.0208])
    empty = quantize(torch.zeros(0), "nf2", block=8)
    assert empty.codes.numel() == 0 and dequantize(empty, 8).numel() == 0


def test_nf2_is_the_least_squares_2_bit_quantizer_of_gaussian_values():
    x = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(0))
    mse = float((dequantize(quantize(x, "nf2", 64), 64) - x).square().mean())
    assert 0.105 < mse < 0.135, mse   # Lloyd-Max: 0.1175 of the variance; block RMS estimates add a little
    absmax_2bit = float((torch.round(x.view(-1, 64) / (x.view(-1, 64).abs().amax(1, keepdim=True) / 1.5) + 0.5)
                         .clamp(-1, 2).sub(0.5).mul(x.view(-1, 64).abs().amax(1, keepdim=True) / 1.5)
                         .view(-1) - x).square().mean())
    assert mse < 0.6 * absmax_2bit, (mse, absmax_2bit)   # four levels spread to the absmax waste them


def test_fp16_rounds_to_half_precision_and_saturates():
    out = dequantize(quantize(_t(1 / 3, 1e6, -1e6), "fp16"))
    assert out.tolist() == [0.333251953125, 65504.0, -65504.0]


def test_each_block_has_its_own_scale():
    x = torch.cat([torch.full((4,), 100.0), torch.full((4,), 0.01)])
    q = quantize(x, "int8", block=4)
    assert q.scales.numel() == 2
    torch.testing.assert_close(dequantize(q, 4), x, rtol=5e-3, atol=0)   # the small block is not crushed to 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
       st.sampled_from(["int8", "int4", "nf4"]), st.sampled_from([8, 16, 64]))
def test_the_error_of_each_value_is_bounded_by_its_blocks_scale(values, codec, block):
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize(x, codec, block)
    out = dequantize(q, block)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    scale = q.scales.to(torch.float32).repeat_interleave(block)[: x.numel()]
    if codec == "nf4":   # half the widest gap between neighbouring levels, times the block's absmax
        bound = scale * float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2
    else:
        bound = scale / 2
    assert bool(((out - x).abs() <= bound * (1 + 1e-5) + 1e-30).all())
    # the scale sent is never below the block's true scale (rounded up into bfloat16), except for
    # blocks of subnormal values (|x| < 1e-30), whose scale underflows to 0: they decode as 0
    level = {"int8": 127, "int4": 7, "nf4": 1}[codec]
    absmax = torch.cat([x, x.new_zeros(-x.numel() % block)]).view(-1, block).abs().amax(1)
    assert bool(((q.scales.to(torch.float32) * level >= absmax) | (absmax < 1e-30)).all())


def test_topk_keeps_the_largest_magnitudes_ties_to_the_lower_position():
    assert select_topk(_t(0.1, -5.0, 3.0, 3.0, 0.2), 0.4).tolist() == [1, 2]
    assert select_topk(_t(0.1, 0.2), 0.01).tolist() == [1]        # at least one entry
    c = compress_tensor(_t(0.1, -5.0, 3.0, 3.0, 0.2).reshape(5, 1), "none", topk=0.4)
    assert decompress_tensor(c).tolist() == [[0.0], [-5.0], [3.0], [0.0], [0.0]]


def test_non_float_tensors_travel_exactly_and_have_no_residual():
    sent, residual = compress_state({"step": torch.tensor([3, 4]), "w": _t(1.0, 2.0)}, "int4", topk=0.5, block=8)
    out = decompress_state(sent, 8)
    assert out["step"].dtype == torch.int64 and out["step"].tolist() == [3, 4]
    assert set(residual) == {"w"}


def test_the_residual_is_exactly_what_was_not_sent():
    delta = {"w": torch.linspace(-1, 1, 50).reshape(5, 10)}
    carried = {"w": torch.full((5, 10), 0.01)}
    sent, residual = compress_state(delta, "int4", topk=0.3, block=16, residual=carried)
    torch.testing.assert_close(decompress_state(sent, 16)["w"] + residual["w"], delta["w"] + carried["w"])


def test_a_non_finite_delta_is_refused():
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress_state({"w": _t(1.0, math.inf)}, "int8")


def _sent_sum(rounds, feedback, codec="int4", topk=0.1):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, generator=g)
    total_sent, total_true, residual = torch.zeros(400), torch.zeros(400), None
    for _ in range(rounds):
        d = base + 0.3 * torch.randn(400, generator=g)   # deltas that point the same way, with noise
        sent, r = compress_state({"w": d}, codec, topk, 64, residual if feedback else None)
        residual = r
        total_sent += decompress_state(sent, 64)["w"]
        total_true += d
    return float((total_sent - total_true).norm() / total_true.norm())


def test_error_feedback_makes_the_sum_of_sent_deltas_follow_the_true_sum():
    # top 10% of int4: one round alone sends about a third of the delta's norm
    with_fb = [_sent_sum(t, True) for t in (10, 40)]
    without = _sent_sum(40, False)
    assert with_fb[1] < with_fb[0] / 2.5   # the residual stays bounded while the true sum grows
    assert with_fb[1] < 0.1 and without > 0.6, (with_fb, without)


@pytest.mark.parametrize("field,value", [("uplink", "int3"), ("downlink", "zip"), ("topk", 0.0), ("topk", 1.5),
                                         ("topk", True), ("error_feedback", "yes"), ("block", 4), ("block", 64.0),
                                         ("rank", -1), ("rank", True), ("rank", 257), ("rank", 2.0)])
def test_the_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=f"compression.{field}"):
        CompressionConfig(**{field: value})


def test_rank_and_topk_do_not_combine():
    with pytest.raises(ConfigError, match="compression.rank and compression.topk"):
        CompressionConfig(uplink="int4", rank=8, topk=0.5)
    assert CompressionConfig(rank=8).compresses_uplink and not CompressionConfig(rank=8).compresses_downlink


def test_which_tensors_travel_as_low_rank_factors():
    assert lowrank_shape((384, 384), 8) and lowrank_shape((384, 384), 48)      # MiniLM's pooler
    assert not lowrank_shape((384, 384), 49)                                   # 4 * 49 * 768 > 384 * 384
    assert not lowrank_shape((26, 384), 8) and not lowrank_shape((8, 384), 8)  # the head, a LoRA factor
    assert not lowrank_shape((384,), 8) and not lowrank_shape((384, 384), 0) and not lowrank_shape((4, 4, 4), 1)
    assert lowrank_shape((16, 16), 2) and not lowrank_shape((16, 16), 3)      # 4 * 2 * 32 = 256: just in


def test_low_rank_by_hand_and_exact_for_a_matrix_of_that_rank():
    # a rank-1 matrix: row i is (i + 1) * (1, -2, 0.5, 4, ...): factors of rank 1 carry it all
    a, b = torch.arange(1.0, 17.0), _t(1, -2, 0.5, 4) .repeat(4)
    x = torch.outer(a, b)
    c = compress_tensor(x, "none", rank=1)
    assert c.factors is not None and c.factors[0].shape == (16, 1) and c.factors[1].shape == (16, 1)
    torch.testing.assert_close(decompress_tensor(c), x, rtol=1e-5, atol=1e-5)
    # the best rank-1 approximation of diag(3, 1, 0, ...) keeps the 3 and drops the 1
    d = torch.diag(_t(3, 1, *[0] * 14))
    torch.testing.assert_close(decompress_tensor(compress_tensor(d, "none", rank=1)),
                               torch.diag(_t(3, *[0] * 15)), rtol=0, atol=1e-6)
    # the factors share the singular values evenly: |P| = |Q| column by column
    p, q = (f.values.reshape(16, 1) for f in c.factors)
    assert float(p.norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def test_the_low_rank_product_is_the_matmul_rounded_once_and_the_same_at_any_thread_count():
    g = torch.Generator().manual_seed(5)
    p, q = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g)
    ref = (p.double() @ q.double().T)
    out = lowrank_product(p, q)
    assert out.dtype == torch.float32 and float((out.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(lowrank_product(p, q), out)
    finally:
        torch.set_num_threads(threads)


def _lowrank_sent_sum(rounds, feedback):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)   # full rank: rank-4 factors send a share of it a round
    total_sent, total_true, residual = torch.zeros(64, 48), torch.zeros(64, 48), None
    errs = []
    for _ in range(rounds):
        d = base + 0.3 * torch.randn(64, 48, generator=g)
        sent, r = compress_state({"w": d}, "int8", 1.0, 64, residual if feedback else None, rank=4)
        assert sent["w"].factors is not None
        total_sent += decompress_state(sent, 64)["w"]
        if feedback:   # nothing is lost: what was not sent is in the residual
            torch.testing.assert_close(total_sent + r["w"], total_true + d, rtol=0, atol=1e-3)
        residual = r
        total_true += d
        errs.append(float((total_sent - total_true).norm() / total_true.norm()))
    return errs


def test_error_feedback_carries_what_the_low_rank_factors_miss():
    with_fb, without = _lowrank_sent_sum(40, True), _lowrank_sent_sum(40, False)
    assert with_fb[0] > 0.5 and without[-1] > 0.5                  # one round sends under half the norm
    assert with_fb[-1] < with_fb[19] < with_fb[0] / 2 and with_fb[-1] < with_fb[0] / 5, (with_fb[0], with_fb[-1])


def test_the_default_config_compresses_nothing():
    assert not CompressionConfig().compresses_uplink and not CompressionConfig().compresses_downlink
    assert CompressionConfig(uplink="int4").compresses_uplink and CompressionConfig(topk=0.5).compresses_uplink
    assert CompressionConfig(downlink="int8").compresses_downlink
