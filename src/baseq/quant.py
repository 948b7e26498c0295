"""The one quantizer of the project: fake quantization (quantize-dequantize) of weights, activations and
the KV cache. Training, evaluation and the Triton kernels' reference all go through these functions."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import weakref

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


# --------------------------------------------------------------------------------------------- weights


def symmetric_weight_scale(w: torch.Tensor, bits: int, clip_ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-output-channel scale of a symmetric grid [-2^(b-1), 2^(b-1)-1] (shape [out, 1])."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1, keepdim=True) * clip_ratio
    return (amax / qmax).clamp(min=1e-8)


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w on the symmetric grid (float tensor holding integers)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax)


def fake_quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(round_ste(w / scale), -qmax - 1, qmax) * scale


def mse_weight_scale(
    w: torch.Tensor, bits: int, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> torch.Tensor:
    """Per-channel scale whose clip threshold minimises sum |w - Q(w)|^norm over a grid of shrink factors
    (the GPTQ/QuaRot clip search; norm 2.4 as they use)."""
    w = w.float()
    best_scale = symmetric_weight_scale(w, bits)
    best_err = torch.full((w.shape[0], 1), float("inf"), device=w.device)
    for i in range(int(max_shrink * grid)):
        ratio = 1 - i / grid
        scale = symmetric_weight_scale(w, bits, ratio)
        err = (fake_quantize_symmetric(w, scale, bits) - w).abs().pow(norm).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def weight_scale(w: torch.Tensor, bits: int, clip_search: str) -> torch.Tensor:
    if clip_search == "mse":
        return mse_weight_scale(w, bits)
    if clip_search == "none":
        return symmetric_weight_scale(w.float(), bits)
    raise ValueError(f"unknown weight clip search {clip_search!r}; use 'mse' or 'none'")


class RTNWeightQuantizer(nn.Module):
    """Per-channel symmetric RTN fake quantization of a weight, differentiable through the STE; used while
    training transforms that act on weights so that they see the grid they will be rounded to."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits >= 16:
            return w
        return fake_quantize_symmetric(w, symmetric_weight_scale(w.detach(), self.bits), self.bits)


# ----------------------------------------------------------------------------------------- activations


def _asymmetric_grid(x: torch.Tensor, bits: int, clip_ratio: torch.Tensor | float):
    """Scale and zero point per row of the last dim. The range always includes 0, as in QuaRot, so zero
    stays exact."""
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=1e-8)
    return scale, torch.round(-xmin / scale).detach()


def fake_quantize_asymmetric(
    x: torch.Tensor, bits: int, clip_ratio: torch.Tensor | float = 1.0, group_size: int | None = None
) -> torch.Tensor:
    """Dynamic asymmetric quantize-dequantize over the last dim (per token), or over groups of
    `group_size` channels of it. Gradients: STE through rounding, exact through scale and clip."""
    shape = x.shape
    if group_size is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scale, zero = _asymmetric_grid(x, bits, clip_ratio)
    q = torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(shape)


def asymmetric_codes(x: torch.Tensor, bits: int, clip_ratio: float = 1.0):
    """Integer codes, scale and zero point of the per-token asymmetric quantizer: the contract the Triton
    kernels reproduce (dequantized value = (code - zero) * scale)."""
    scale, zero = _asymmetric_grid(x, bits, clip_ratio)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return codes, scale, zero


def _register_clip(module: nn.Module, clip_ratio: float, learn: bool, shape: tuple[int, ...] = ()) -> None:
    """A fixed clip is a buffer `clip_ratio`; a learned one is a logit `clip_logit` with clip = sigmoid(logit).
    The sigmoid keeps the clip in (0, 1) without a clamp, so no value ever stops receiving gradient (a
    clamped clip pushed past a bound would stay there)."""
    if learn:
        if not 0 < clip_ratio < 1:
            raise ValueError(f"a learned clip must start strictly between 0 and 1, got {clip_ratio}")
        module.clip_logit = nn.Parameter(torch.full(shape, clip_ratio).logit())
    else:
        module.register_buffer("clip_ratio", torch.tensor(float(clip_ratio)))


def effective_clip(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The clip ratio a quantizer applies, in `dtype` (the runtime kernels use the same value): a scalar, or
    one per KV head shaped [heads, 1, 1]. Differentiable in a learned clip's logit."""
    logit = getattr(module, "clip_logit", None)
    clip = module.clip_ratio if logit is None else torch.sigmoid(logit)
    return clip.to(dtype)


def learned_clip(module: nn.Module) -> nn.Parameter | None:
    return getattr(module, "clip_logit", None)


# ------------------------------------------------------------------------------------- fused inference

# Without autograd on a GPU, the eager quantizer is about twenty small kernels per call, and evaluating a small
# model is bound by launching them (W4A4 SmolLM2's zero-shot took 1.8x its fp time). The same quantizer code,
# compiled by inductor with dynamic shapes (one graph per kind of quantizer serves every layer, batch and
# length), runs as one or two kernels: 70-145 us a call against 180-500 us eager on an H200's host, values
# bit-identical except a few in 10^7 where the GPU fuses a multiply-add (experiments/fused_quantizer_check.py).
# Training keeps the eager path: its compiled step (training.py) traces the quantizers into the block's own
# graph, and autograd would not go through this one.
_fused = {"enabled": True, "devices": ("cuda",)}


@contextlib.contextmanager
def fused_inference(enabled: bool, devices: tuple[str, ...] = ("cuda",)):
    """Whether the quantizers run compiled where autograd is off, on tensors of `devices` (the default, CUDA
    only: on a CPU compiling costs more than it saves; tests pass ("cpu",) to check the compiled numbers)."""
    saved = dict(_fused)
    _fused.update(enabled=enabled, devices=devices)
    try:
        yield
    finally:
        _fused.clear()
        _fused.update(saved)


def _runs_fused(x: torch.Tensor) -> bool:
    if not _fused["enabled"] or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if x.device.type not in _fused["devices"]:
        return False
    return x.device.type != "cuda" or _has_triton()


@functools.cache
def _has_triton() -> bool:
    """Inductor needs Triton for CUDA kernels; asked on first use, not at import (a plain install lacks it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:
        return False


# The clip arrives in float32 and is cast to the activations' dtype here, inside the compiled graph: in a
# 16-bit model the cast would otherwise be one more kernel launch per call (the same rounding either way).
def _quantize_activation(quantizer: nn.Module, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    return quantizer.quantize(x, clip.to(x.dtype))


# A layer's online rotation (R4, QuaRot's o_proj Hadamard) is traced into the same graph as its quantizer: the
# transform's small matmuls and reshapes would otherwise be a dozen eager launches of their own per call.
def _rotate_and_quantize_activation(quantizer: nn.Module, x: torch.Tensor, clip: torch.Tensor,
                                    rotation) -> torch.Tensor:
    return quantizer.quantize(rotation(x), clip.to(x.dtype))


def _quantize_kv(quantizer: nn.Module, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    return quantizer.quantize(x, clip.to(x.dtype))


# One compiled function per kind, so that each kind has dynamo's recompile limit (8 graphs) to itself. Activations
# come in as [tokens, channels], so the batch size does not matter. A clip (a sigmoid of a learned logit) is
# computed outside: inductor's sigmoid may round differently from eager's. A kind past the limit runs eager.
_COMPILED: dict = {}


def compiled_for_inference(fn):
    """Register fn, a quantizer's computation (tensors and modules in, tensors out), to run compiled under fused
    inference (see call_fused)."""
    _COMPILED[fn] = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
    return fn


def call_fused(fn, x: torch.Tensor, *args):
    """fn(*args), compiled where fused inference applies to x (autograd off, a fused device), else eager."""
    return (_COMPILED[fn] if _runs_fused(x) else fn)(*args)


for _fn in (_quantize_activation, _rotate_and_quantize_activation, _quantize_kv):
    compiled_for_inference(_fn)


def _apply(fn, quantizer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    return call_fused(fn, x, quantizer, x, effective_clip(quantizer, torch.float32), *args)


class ActivationQuantizer(nn.Module):
    """Per-token asymmetric fake quantizer of a linear layer's input.

    Holds the optional BASE-Q terms that must stay online (the paper's Eq. 15): an unpaired scale S^a that
    multiplies the input and a bias B subtracted after it, so the quantized tensor is Q(S^a x - B). The layer
    that owns the quantizer adds W_q B back to its output (see QuantLinear), which leaves exactly W_q S^a x:
    the bias has no residue and the unpaired scale is the only deliberate deviation. (Subtracting B before
    scaling would leave an uncompensated W_q (1 - S^a) B.) The clip ratio is fixed unless `learn_clip`.
    """

    def __init__(self, dim: int, bits: int, clip_ratio: float = 1.0, learn_clip: bool = False, consumers: int = 1):
        super().__init__()
        self.dim, self.bits = dim, bits
        _register_clip(self, clip_ratio, learn_clip)
        self.bias: nn.Parameter | None = None
        self.scale: nn.Parameter | None = None
        # the linears that read this quantizer's output (q/k/v: 3); see _reused_output
        self.consumers = consumers
        self._last: tuple | None = None

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def add_bias(self, init: torch.Tensor) -> None:
        self.bias = nn.Parameter(init.detach().clone().float())

    def add_scale(self) -> None:
        self.scale = nn.Parameter(torch.ones(self.dim, device=effective_clip(self, torch.float32).device))

    def scale_and_shift(self, x: torch.Tensor) -> torch.Tensor:
        """S^a x - B, the tensor that is quantized."""
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        if self.bias is not None:
            x = x - self.bias.to(x.dtype)
        return x

    def quantize(self, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        x = self.scale_and_shift(x)
        if not self.enabled:
            return x
        return fake_quantize_asymmetric(x, self.bits, clip)

    def forward(self, x: torch.Tensor, rotation=None) -> torch.Tensor:
        """Q(S^a rotation(x) - B); `rotation`, the owning layer's online transform of its input, runs in the same
        compiled graph as the quantizer where that applies."""
        if not self.enabled and self.scale is None and self.bias is None:
            return x if rotation is None else rotation(x)
        if rotation is not None:
            flat = x.reshape(-1, x.shape[-1])
            return _apply(_rotate_and_quantize_activation, self, flat, rotation).reshape(x.shape)
        reused = self._reused_output(x)
        if reused is not None:
            return reused
        out = _apply(_quantize_activation, self, x.reshape(-1, x.shape[-1])).reshape(x.shape)
        self._remember(x, out)
        return out

    @staticmethod
    def quantized_input(args: tuple) -> torch.Tensor:
        """The tensor a call quantizes, from its positional arguments (what a forward pre-hook gets): the input, or
        its rotation where the layer passes one."""
        x, rotation = args[0], (args[1] if len(args) > 1 else None)
        return x if rotation is None else rotation(x)

    # Linears that read one tensor (q/k/v, gate/up) share this quantizer, and each calls it: without autograd the
    # first call's output is kept for the others, so one quantization serves the group, as a kernel would do it.
    # The entry holds the input weakly and is dropped after the group's last call, so no activation outlives its
    # layer; it is used only for the same tensor object, unmodified (its version counter), with the quantizer's
    # own parameters unchanged since. Under autograd (training) every call computes, so each has its own graph.
    def _reuse_applies(self, x: torch.Tensor) -> bool:
        return (self.consumers > 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not x.is_inference())

    def _state_versions(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x._version, *(p._version for p in self.parameters(recurse=False)),
                *(b._version for b in self.buffers(recurse=False)))

    def _reused_output(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._last is None or not self._reuse_applies(x):
            return None
        source, versions, out, calls_left = self._last
        if source() is not x or versions != self._state_versions(x):
            self._last = None
            return None
        self._last = (source, versions, out, calls_left - 1) if calls_left > 1 else None
        return out

    def _remember(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self._reuse_applies(x):
            self._last = None
            return
        source = weakref.ref(x)
        self._last = (source, self._state_versions(x), out, self.consumers - 1)
        # a forward cut short after the first consumer (a calibration hook's StopForward) must not leave the
        # output held: the entry goes with its input
        weakref.finalize(x, self._forget, source)

    def _forget(self, source: weakref.ref) -> None:
        if self._last is not None and self._last[0] is source:
            self._last = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bits={self.bits}, clip={effective_clip(self, torch.float32).item():.3f}, " \
               f"bias={self.bias is not None}, scale={self.scale is not None}"


class KVQuantizer(nn.Module):
    """Per-token per-head asymmetric fake quantizer for keys or values, shaped [batch, heads, seq, head_dim].
    An optional per-head bias (BASE-Q's K/V bias) is subtracted before quantization and added back after;
    the cache stores the codes of (x - b). A learned clip is one per head when `heads` is given (as the
    authors' code), else one for the layer."""

    def __init__(self, bits: int, clip_ratio: float = 1.0, learn_clip: bool = False, heads: int | None = None):
        super().__init__()
        self.bits = bits
        _register_clip(self, clip_ratio, learn_clip, () if heads is None else (heads, 1, 1))
        self.bias: nn.Parameter | None = None

    def add_bias(self, init: torch.Tensor) -> None:
        """init: [heads, head_dim]."""
        self.bias = nn.Parameter(init.detach().clone().float())

    def quantize(self, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return fake_quantize_asymmetric(x, self.bits, clip)
        bias = self.bias.to(x.dtype)[:, None, :]
        return fake_quantize_asymmetric(x - bias, self.bits, clip) + bias

    def quantize_cache(self, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """What the cache holds for x (x itself at 16 bits); clip: effective_clip(self, torch.float32)."""
        return x if self.bits >= 16 else self.quantize(x, clip.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= 16:
            return x
        return _apply(_quantize_kv, self, x)

    def extra_repr(self) -> str:
        clip = effective_clip(self, torch.float32).detach()
        return f"bits={self.bits}, clip={clip.mean().item():.3f}" + ("" if clip.numel() == 1 else " (mean of heads)")
