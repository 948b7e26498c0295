"""Quantizer exactness: grids, codes, clipping, STE, and GPTQ's advantage over RTN."""

import torch

from baseq.gptq import HessianAccumulator, gptq_quantize
import pytest

from baseq.modules import QuantLinear
from baseq.quant import (ActivationQuantizer, KVQuantizer, asymmetric_codes, effective_clip, fake_quantize_asymmetric,
                         fake_quantize_symmetric, learned_clip, mse_weight_scale, quantize_symmetric,
                         symmetric_weight_scale)


def test_symmetric_weight_grid_is_per_channel_int4():
    w = torch.randn(16, 64)
    scale = symmetric_weight_scale(w, 4)
    codes = quantize_symmetric(w, scale, 4)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(codes, codes.round())
    # the largest magnitude of each row maps to +-7 exactly
    assert torch.equal(codes.abs().amax(dim=1), torch.full((16,), 7.0))
    deq = fake_quantize_symmetric(w, scale, 4)
    assert torch.allclose(deq, codes * scale)
    assert ((deq - w).abs() <= scale / 2 + 1e-6).all()


def test_mse_clip_search_never_worse_than_max_scaling():
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 256)
    w[:, 0] *= 20  # an outlier column makes clipping worthwhile
    plain = fake_quantize_symmetric(w, symmetric_weight_scale(w, 4), 4)
    searched = fake_quantize_symmetric(w, mse_weight_scale(w, 4), 4)
    err = lambda q: (q - w).abs().pow(2.4).sum(dim=1)
    assert (err(searched) <= err(plain) + 1e-5).all()
    assert err(searched).sum() < err(plain).sum()


def test_asymmetric_fake_quant_equals_codes_contract():
    x = torch.randn(5, 7, 96) + 0.3
    for clip in (1.0, 0.9):
        codes, scale, zero = asymmetric_codes(x, 4, clip)
        assert codes.min() >= 0 and codes.max() <= 15
        assert torch.equal(fake_quantize_asymmetric(x, 4, clip), (codes - zero) * scale)


def test_asymmetric_quant_keeps_zero_and_error_bound():
    x = torch.rand(4, 64) + 1.0  # all positive: the range still includes 0, so 0 stays exact
    x[:, 0] = 0
    deq = fake_quantize_asymmetric(x, 4)
    assert torch.equal(deq[:, 0], torch.zeros(4))
    step = x.amax(dim=1, keepdim=True) / 15
    assert ((deq - x).abs() <= step / 2 + 1e-6).all()


def test_more_bits_less_error():
    x = torch.randn(8, 256)
    errors = [(fake_quantize_asymmetric(x, b) - x).pow(2).mean() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


def test_ste_passes_gradients_and_clip_is_learnable():
    q = ActivationQuantizer(32, bits=4, clip_ratio=0.9, learn_clip=True)
    q.add_bias(torch.zeros(32))
    q.add_scale()
    x = torch.randn(10, 32, requires_grad=True)
    q(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in (learned_clip(q), q.bias, q.scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert effective_clip(q, torch.float32).item() == pytest.approx(0.9)


@pytest.mark.parametrize("clip", [0.05, 0.3, 0.999])
def test_learned_clip_keeps_its_gradient_at_and_beyond_the_old_bounds(clip):
    # the old clamp to [0.3, 1.0] gave a clip at or past a bound no gradient; the sigmoid never does
    q = ActivationQuantizer(64, bits=4, clip_ratio=clip, learn_clip=True)
    x = torch.randn(32, 64)
    (q(x) - x).pow(2).sum().backward()
    assert learned_clip(q).grad.abs().item() > 0
    with torch.no_grad():
        learned_clip(q).fill_(40.0)   # far past 1 in logit space: still strictly inside (0, 1]
    assert 0 < effective_clip(q, torch.float32).item() <= 1


def test_learned_kv_clip_is_one_per_head():
    q = KVQuantizer(4, clip_ratio=0.9, learn_clip=True, heads=3)
    assert learned_clip(q).shape == (3, 1, 1)
    k = torch.randn(2, 3, 7, 16)
    (q(k) - k).pow(2).sum().backward()
    assert (learned_clip(q).grad.abs().flatten() > 0).all()
    with torch.no_grad():
        learned_clip(q)[1] = -3.0   # a tight clip on head 1 only
    deq = q(k)
    expected = fake_quantize_asymmetric(k[:, 1], 4, torch.sigmoid(torch.tensor(-3.0)))
    torch.testing.assert_close(deq[:, 1], expected)
    torch.testing.assert_close(deq[:, 0], fake_quantize_asymmetric(k[:, 0], 4, 0.9))


def test_activation_quantizer_applies_scale_then_bias():
    # Eq. 15: the quantized tensor is S^a x - B
    q = ActivationQuantizer(8, bits=16)
    q.add_bias(torch.full((8,), 2.0))
    q.add_scale()
    with torch.no_grad():
        q.scale.fill_(3.0)
    x = torch.randn(4, 8)
    assert torch.allclose(q(x), x * 3 - 2)


def test_eq15_bias_leaves_exactly_the_unpaired_scale():
    # with activation quantization off the layer computes W_q S^a x + b, for any B: the bias has no residue
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8).double()
    q = ActivationQuantizer(32, bits=16)
    q.add_bias(torch.randn(32))
    q.add_scale()
    with torch.no_grad():
        q.scale.uniform_(0.5, 2.0)
    layer = QuantLinear(linear, q).double()
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = torch.nn.functional.linear(x * q.scale.double(), linear.weight, linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    layer.fuse_activation_bias()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_kv_quantizer_is_per_token_per_head():
    k = torch.randn(1, 3, 5, 16)
    k[:, 1] *= 100  # one loud head must not coarsen the grid of the others
    deq = KVQuantizer(4)(k)
    quiet = (deq[:, 0] - k[:, 0]).abs().max()
    assert quiet <= (k[:, 0].amax(-1) - k[:, 0].amin(-1)).max() / 15 / 2 + 1e-6
    assert torch.equal(KVQuantizer(16)(k), k)


def test_gptq_beats_rtn_on_layer_output_error():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs: where GPTQ shines
    acc = HessianAccumulator(128, torch.device("cpu"))
    for chunk in x.split(512):
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    q_gptq, scale = gptq_quantize(w, acc.hessian, bits=4, clip_search="none")
    q_rtn = fake_quantize_symmetric(w, symmetric_weight_scale(w, 4), 4)
    # GPTQ's output stays on the same grid...
    codes = q_gptq / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
    err = lambda q: (x @ (q - w).T).pow(2).mean()
    assert err(q_gptq) < 0.7 * err(q_rtn)
    # act-order is a permutation of the same algorithm: also better than RTN
    q_ao, _ = gptq_quantize(w, acc.hessian, bits=4, clip_search="none", act_order=True)
    assert err(q_ao) < 0.7 * err(q_rtn)


def test_gptq_block_stops_each_pass_at_the_group_input_and_gets_the_full_pass_hessians():
    import copy

    from baseq.blockwise import capture_block_inputs, run_block
    from baseq.methods.quarot import apply_rotations
    from baseq.models.families import family_of
    from baseq.quantize import attach_quantizers, each_quantizer_input, gptq_block, set_quantized_weight
    from conftest import tiny_qwen2

    model = tiny_qwen2(hidden=64, ffn=192, heads=4, kv_heads=2, layers=1, dtype=torch.float32)
    family = family_of(model)
    attach_quantizers(model, family, 16, 16, 1.0, 1.0)
    apply_rotations(model, family, torch.device("cpu"), seed=0)
    inputs = capture_block_inputs(model, family, torch.randint(0, 256, (3, 24)), torch.device("cpu"))
    block = family.blocks(model)[0]
    reference = copy.deepcopy(block)
    gptq_block(block, family, inputs.hidden, inputs.kwargs, bits=4, clip_search="none", batch_size=2)
    # the reference: every Hessian from a full pass of the block, group by group
    for group in family.sequential_groups():
        linears = [reference.get_submodule(name) for name in group]
        hessian = HessianAccumulator(linears[0].in_features, torch.device("cpu"))
        with each_quantizer_input([linears[0].act_quantizer], lambda _q, x: hessian.add(x)):
            run_block(reference, inputs.hidden, inputs.kwargs, 2)
        for lin in linears:
            q, scale = gptq_quantize(lin.weight, hessian.hessian, 4, "none")
            set_quantized_weight(lin, q, scale, 4)
    for (name, ours), (_, theirs) in zip(block.named_parameters(), reference.named_parameters()):
        assert torch.equal(ours, theirs), name


def test_16bit_calibration_inputs_are_cast_a_micro_batch_at_a_time_with_the_numbers_of_a_full_fp32_copy():
    """BASE-Q keeps a 16-bit model's calibration activations in 16 bits and its block in fp32: run_block and
    gptq_block cast each micro-batch, which must give exactly what casting all inputs up front gives."""
    import copy

    from baseq.blockwise import capture_block_inputs, run_block
    from baseq.methods.quarot import apply_rotations
    from baseq.models.families import family_of
    from baseq.quantize import attach_quantizers, gptq_block
    from conftest import tiny_llama

    model = tiny_llama(hidden=64, ffn=192, heads=4, kv_heads=2, layers=1, dtype=torch.bfloat16)
    family = family_of(model)
    attach_quantizers(model, family, 16, 16, 1.0, 1.0)
    apply_rotations(model, family, torch.device("cpu"), seed=0)
    inputs = capture_block_inputs(model, family, torch.randint(0, 256, (3, 24)), torch.device("cpu"))
    assert inputs.hidden.dtype == torch.bfloat16
    block = family.blocks(model)[0].float()
    up_front = inputs.hidden.float()
    assert torch.equal(run_block(block, inputs.hidden, inputs.kwargs, 2, torch.float32),
                       run_block(block, up_front, inputs.kwargs, 2))
    reference = copy.deepcopy(block)
    gptq_block(block, family, inputs.hidden, inputs.kwargs, bits=4, clip_search="none", batch_size=2)
    gptq_block(reference, family, up_front, inputs.kwargs, bits=4, clip_search="none", batch_size=2)
    for (name, ours), (_, theirs) in zip(block.named_parameters(), reference.named_parameters()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_inference_quantizers_are_the_eager_ones_compiled_with_the_same_numbers(dtype):
    # On a GPU with autograd off the quantizers run compiled (quant.fused_inference; CUDA only by default, forced
    # onto the CPU here). Same code, same numbers: every value bit-identical, for each kind of quantizer.
    from torch._dynamo.utils import counters

    from baseq.quant import fused_inference

    torch.manual_seed(0)
    baseq_style = ActivationQuantizer(64, 4, 0.9, learn_clip=True)
    baseq_style.add_bias(torch.randn(64))
    baseq_style.add_scale()
    with torch.no_grad():
        baseq_style.scale.uniform_(0.5, 1.5)
    quarot_style = ActivationQuantizer(64, 4, 0.9)
    kv = KVQuantizer(4, 0.95, learn_clip=True, heads=2)
    kv.add_bias(torch.randn(2, 16))
    x, xk = (torch.randn(3, 17, 64) * 3).to(dtype), torch.randn(3, 2, 17, 16).to(dtype)
    with torch.no_grad():
        eager = [baseq_style(x), quarot_style(x), kv(xk)]
        torch._dynamo.reset()
        counters.clear()
        with fused_inference(True, ("cpu",)):
            fused = [baseq_style(x), quarot_style(x), kv(xk), quarot_style(x[:1, :5])]
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])   # the compiled path did run
    for a, b in zip(eager + [eager[1][:1, :5]], fused):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    # with autograd on, the eager path (compiled training traces it into its own graph)
    counters.clear()
    with fused_inference(True, ("cpu",)):
        out = baseq_style(x.float())
    out.sum().backward()
    assert baseq_style.bias.grad is not None and not counters["stats"]["unique_graphs"]


def test_fused_inference_of_a_rotated_model_is_exact_and_quantizes_each_input_once():
    # QuaRot on a Qwen2-shaped model: R4 and the o_proj Hadamard trace into their layer's quantizer graph, R3 and
    # the cache quantizers into one, and q/k/v (gate/up) reuse one quantization. Same logits, bit for bit.
    from torch._dynamo.utils import counters

    from baseq.methods.quarot import apply_rotations
    from baseq.models.families import family_of
    from baseq.quant import fused_inference
    from baseq.quantize import attach_quantizers, quantize_block_rtn
    from conftest import tiny_qwen2

    model = tiny_qwen2(hidden=128, ffn=384, layers=2, heads=4, kv_heads=2, dtype=torch.float32)
    family = family_of(model)
    attach_quantizers(model, family, 4, 4, 0.9, 0.95)
    apply_rotations(model, family, torch.device("cpu"), 0, o_proj_hadamard="cross_heads")
    for block in family.blocks(model):
        quantize_block_rtn(block, 4, "none")
    calls = {"n": 0}

    def count(_module, _args):
        calls["n"] += 1
    quantizers = {m for m in model.modules() if isinstance(m, ActivationQuantizer)}
    ids = torch.randint(0, 256, (3, 19))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        counters.clear()
        with fused_inference(True, ("cpu",)):
            fused = model(ids).logits
            model(torch.randint(0, 256, (2, 11)))   # other shapes: the same graphs
    assert torch.equal(eager, fused)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # activations (plain, rotated: o_proj and down_proj have two widths) and the attention inputs
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_a_shared_quantizer_quantizes_its_input_once_per_group_without_autograd():
    q = ActivationQuantizer(16, bits=4, consumers=3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        first = q(x)
        assert q(x) is first and q(x) is first   # k and v reuse q's quantization ...
        assert q._last is None                   # ... and nothing is held after the group's last call
        again = q(x)
        assert again is not first and torch.equal(again, first)
        x.mul_(2)                                # a modified input is quantized again
        assert not torch.equal(q(x), first)
        y = torch.randn(5, 16)
        assert torch.equal(q(y), fake_quantize_asymmetric(y, 4))   # another input is not answered from the entry
    assert q(x) is not q(x)                      # with autograd, every call has its own graph
