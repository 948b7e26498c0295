"""Learnable equivalence transforms between pairs of linears (BASE-Q's paired scales and learned R_v), as
torch parametrizations: while training, the weights are computed from the frozen originals and the
transform's parameters; `fuse_block_transforms` then bakes them into the weights (float64) and removes
the parametrizations, leaving plain tensors.

Both transforms are exact: the full-precision block computes the same function for any parameter value.
  v -> o:     v' = (v R) / s per KV head (R orthogonal, s > 0), o absorbs R^T and s per query head.
  up -> down: u' = u / s, and down absorbs s.
A reader with an online input rotation Q (down's R4, an o_proj Hadamard) absorbs the transform M in the
basis before Q: W <- W Q^T M Q.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from .models.families import ModelFamily
from .modules import QuantLinear


class PositiveScale(nn.Module):
    """A vector s = exp(theta), theta = 0 at start: positive by construction, so dividing by it is safe."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()


class HeadRotations(nn.Module):
    """One orthogonal head_dim x head_dim matrix per KV head (or one shared), through torch's orthogonal
    parametrization with the Cayley map. It starts at the identity: it acts on top of the Hadamard R2
    already fused into v/o, so the learned R_v = H C(A) starts at the Hadamard, as BASE-Q specifies."""

    def __init__(self, count: int, head_dim: int):
        super().__init__()
        self.holder = nn.Module()
        self.holder.weight = nn.Parameter(torch.eye(head_dim).repeat(count, 1, 1))
        orthogonal(self.holder, "weight", orthogonal_map="cayley")

    def forward(self) -> torch.Tensor:
        return self.holder.weight


class _ValueWeight(nn.Module):
    """W_v [kv*hd, d] -> diag(1/s) blockdiag(R^T) W_v; also used for the v bias (as a [kv*hd, 1] column)."""

    def __init__(self, rotations: HeadRotations | None, scale: PositiveScale | None, head_dim: int):
        super().__init__()
        self.rotations, self.scale, self.head_dim = rotations, scale, head_dim

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        column = w.dim() == 1
        if column:
            w = w.unsqueeze(1)
        if self.rotations is not None:
            r = self.rotations().to(w.dtype)
            heads = w.shape[0] // self.head_dim
            r = r.expand(heads, -1, -1) if r.shape[0] == 1 else r
            w = torch.einsum("gji,gjk->gik", r, w.reshape(heads, self.head_dim, -1)).reshape(w.shape)
        if self.scale is not None:
            w = w / self.scale().to(w.dtype).unsqueeze(1)
        return w.squeeze(1) if column else w


def _in_input_basis(layer: nn.Module, transform, w: torch.Tensor) -> torch.Tensor:
    """W Q^T M Q for a QuantLinear with an online rotation Q, W M for any other layer."""
    if isinstance(layer, QuantLinear):
        return layer.weight_from_input_basis(transform(layer.weight_in_input_basis(w)))
    return transform(w)


class _OutputWeight(nn.Module):
    """W_o [d, H*hd] -> W_o blockdiag(R per query head) diag(s per query head), in o's input basis."""

    def __init__(self, o_proj: nn.Module, rotations: HeadRotations | None, scale: PositiveScale | None,
                 head_dim: int, group: int):
        super().__init__()
        self.rotations, self.scale, self.head_dim, self.group = rotations, scale, head_dim, group
        self._layer = [o_proj]   # a list: not a submodule of the parametrization

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _in_input_basis(self._layer[0], self._transform, w)

    def _transform(self, w: torch.Tensor) -> torch.Tensor:
        heads = w.shape[1] // self.head_dim
        if self.rotations is not None:
            r = self.rotations().to(w.dtype)
            r = r.expand(heads // self.group, -1, -1) if r.shape[0] == 1 else r
            r = r.repeat_interleave(self.group, dim=0)
            w = torch.einsum("ohj,hjk->ohk", w.reshape(w.shape[0], heads, self.head_dim), r).reshape(w.shape)
        if self.scale is not None:
            s = self.scale().to(w.dtype).reshape(-1, self.head_dim).repeat_interleave(self.group, dim=0)
            w = w * s.reshape(1, -1)
        return w


class _DivideRows(nn.Module):
    def __init__(self, scale: PositiveScale):
        super().__init__()
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale().to(w.dtype)
        return w / (s.unsqueeze(1) if w.dim() == 2 else s)


class _ScaleColumns(nn.Module):
    """W -> W diag(s), in the layer's input basis (before its online rotation, if any)."""

    def __init__(self, layer: nn.Module, scale: PositiveScale):
        super().__init__()
        self.scale = scale
        self._layer = [layer]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _in_input_basis(self._layer[0], lambda v: v * self.scale().to(v.dtype), w)


class BlockTransforms(nn.Module):
    """The learnable transforms of one block; registering them parametrizes the block's weights."""

    def __init__(self, block: nn.Module, family: ModelFamily, head_dim: int, paired_scale: bool,
                 learn_rv: bool, rv_per_kv_head: bool):
        super().__init__()
        v_proj, o_proj = block.get_submodule(family.v_proj), block.get_submodule(family.o_proj)
        up, down = block.get_submodule(family.up_proj), block.get_submodule(family.down_proj)
        num_kv = v_proj.weight.shape[0] // head_dim
        group = (o_proj.weight.shape[1] // head_dim) // num_kv
        self.rv = HeadRotations(num_kv if rv_per_kv_head else 1, head_dim) if learn_rv else None
        self.vo_scale = PositiveScale(v_proj.weight.shape[0]) if paired_scale else None
        self.ud_scale = PositiveScale(up.weight.shape[0]) if paired_scale else None
        self._targets: list[tuple[nn.Module, str]] = []
        if self.rv is not None or self.vo_scale is not None:
            self._register(v_proj, "weight", _ValueWeight(self.rv, self.vo_scale, head_dim))
            if v_proj.bias is not None:
                self._register(v_proj, "bias", _ValueWeight(self.rv, self.vo_scale, head_dim))
            self._register(o_proj, "weight", _OutputWeight(o_proj, self.rv, self.vo_scale, head_dim, group))
        if self.ud_scale is not None:
            self._register(up, "weight", _DivideRows(self.ud_scale))
            if up.bias is not None:
                self._register(up, "bias", _DivideRows(self.ud_scale))
            self._register(down, "weight", _ScaleColumns(down, self.ud_scale))

    def _register(self, module: nn.Module, name: str, transform: nn.Module) -> None:
        getattr(module, name).requires_grad_(False)
        parametrize.register_parametrization(module, name, transform, unsafe=True)
        self._targets.append((module, name))

    def rotation_parameters(self) -> list[nn.Parameter]:
        return list(self.rv.parameters()) if self.rv is not None else []

    def scale_parameters(self) -> list[nn.Parameter]:
        return [m.log_scale for m in (self.vo_scale, self.ud_scale) if m is not None]

    @torch.no_grad()
    def summary(self) -> dict:
        """Ranges of the learned paired scales and how far R_v moved from its start (Frobenius norm of
        R - I, the mean over heads), for the run record."""
        out = {}
        for name, scale in (("v_o", self.vo_scale), ("up_down", self.ud_scale)):
            if scale is not None:
                s = scale()
                out[name] = {"min": s.min().item(), "max": s.max().item(), "mean": s.mean().item()}
        if self.rv is not None:
            r = self.rv()
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
            out["rv_distance_from_init"] = (r - eye).flatten(1).norm(dim=1).mean().item()
        return out

    @torch.no_grad()
    def fuse(self) -> None:
        """Bake the transforms into the weights, computing them in float64, and drop the parametrizations."""
        for module, name in self._targets:
            original = getattr(module.parametrizations, name).original
            dtype = original.dtype
            original.data = original.data.double()
            for transform in getattr(module.parametrizations, name):
                transform.double()
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            param = getattr(module, name)
            param.data = param.data.to(dtype)
            param.requires_grad_(False)
        self._targets.clear()
