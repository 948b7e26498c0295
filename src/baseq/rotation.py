"""Computational-invariance transforms (QuaRot/SpinQuant naming, DESIGN.md section 3).

Convention: a rotation Q acts on row vectors, x -> x Q. A linear that reads x (y = x W^T) absorbs it as
W <- W Q; a linear that writes x absorbs it as W <- Q^T W, b <- b Q. All fusing happens in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from .blockwise import iterate_blocks
from .models.families import ModelFamily


def _update(param: torch.Tensor, new64: torch.Tensor) -> None:
    param.data = new64.to(device=param.device, dtype=param.dtype)


def _f64(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    return t.detach().to(device=device or t.device, dtype=torch.float64)


def untie_embeddings(model: nn.Module, family: ModelFamily) -> None:
    """Give lm_head its own weight: rotations treat the embedding (a writer) and the head (a reader)
    differently, and the final norm is fused into the head only."""
    head = model.get_submodule(family.lm_head)
    embed = model.get_submodule(family.embed_tokens)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


def _fuse_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    gain = _f64(norm.weight)
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("norm with a bias (LayerNorm) is not supported; RMSNorm only")
    for linear in readers:
        _update(linear.weight, _f64(linear.weight) * gain.to(linear.weight.device))
    norm.weight.data.fill_(1.0)


def fuse_block_norms(block: nn.Module, family: ModelFamily) -> None:
    _fuse_norm(block.get_submodule(family.attn_norm), [block.get_submodule(n) for n in family.readers_of_attn_norm()])
    _fuse_norm(block.get_submodule(family.mlp_norm), [block.get_submodule(n) for n in family.readers_of_mlp_norm()])


def fuse_norms_into_linears(model: nn.Module, family: ModelFamily, device: torch.device | str = "cpu") -> None:
    """Move every RMSNorm gain into the linears that read the norm's output; the norms become pure
    normalisations, which commute with rotations of the residual stream."""
    for _, block in iterate_blocks(model, family, torch.device(device)):
        fuse_block_norms(block, family)
    _fuse_norm(model.get_submodule(family.final_norm), [model.get_submodule(family.lm_head)])


def rotate_reader(linear: nn.Module, q: torch.Tensor) -> None:
    """The linear's input is rotated (x -> x q): absorb q into the weight."""
    w = _f64(linear.weight)
    _update(linear.weight, w @ q.to(w.device, torch.float64))


def rotate_writer(linear: nn.Module, q: torch.Tensor) -> None:
    w = _f64(linear.weight)
    q = q.to(w.device, torch.float64)
    _update(linear.weight, q.T @ w)
    if getattr(linear, "bias", None) is not None:
        _update(linear.bias, _f64(linear.bias) @ q)


def rotate_block_residual(block: nn.Module, family: ModelFamily, q: torch.Tensor) -> None:
    for name in family.readers_of_attn_norm() + family.readers_of_mlp_norm():
        rotate_reader(block.get_submodule(name), q)
    for name in family.residual_writers():
        rotate_writer(block.get_submodule(name), q)


def rotate_residual(model: nn.Module, family: ModelFamily, q: torch.Tensor, device: torch.device | str = "cpu") -> None:
    """R1: rotate the residual stream by q (d x d orthogonal). Norms must be fused first. The float64 products
    run on `device`, one block at a time."""
    device = torch.device(device)
    q = q.to(device, torch.float64)
    embed = model.get_submodule(family.embed_tokens)
    _update(embed.weight, _f64(embed.weight, device) @ q)
    head = model.get_submodule(family.lm_head)
    _update(head.weight, _f64(head.weight, device) @ q)
    for _, block in iterate_blocks(model, family, device):
        rotate_block_residual(block, family, q)


def rotate_values(block: nn.Module, family: ModelFamily, rotations: torch.Tensor, head_dim: int) -> None:
    """R2: rotate each KV head's value vectors by its own head_dim x head_dim matrix (rotations has shape
    [num_kv_heads, hd, hd], or [hd, hd] for one shared matrix); o_proj absorbs the inverse per query head."""
    v_proj, o_proj = block.get_submodule(family.v_proj), block.get_submodule(family.o_proj)
    num_kv = v_proj.weight.shape[0] // head_dim
    num_heads = o_proj.weight.shape[1] // head_dim
    if rotations.dim() == 2:
        rotations = rotations.expand(num_kv, head_dim, head_dim)
    r = rotations.to(v_proj.weight.device, torch.float64)
    wv = _f64(v_proj.weight).reshape(num_kv, head_dim, -1)
    _update(v_proj.weight, torch.einsum("gji,gjk->gik", r, wv).reshape(num_kv * head_dim, -1))
    if v_proj.bias is not None:
        bv = _f64(v_proj.bias).reshape(num_kv, 1, head_dim)
        _update(v_proj.bias, torch.bmm(bv, r).reshape(-1))
    group = num_heads // num_kv
    wo = _f64(o_proj.weight).reshape(-1, num_heads, head_dim)
    r_per_head = r.repeat_interleave(group, dim=0).to(wo.device)
    _update(o_proj.weight, torch.einsum("ohj,hjk->ohk", wo, r_per_head).reshape(wo.shape[0], -1))



@torch.no_grad()
def weight_pca_basis(model: nn.Module, family: ModelFamily, device: torch.device | str = "cpu",
                     include_writers: bool = False) -> torch.Tensor:
    """Eigenvectors (columns, by decreasing eigenvalue) of sum W^T W over the linears that read the residual
    stream (q, k, v, gate, up) [+ W W^T of the writers o, down]. Norms must be fused first."""
    device = torch.device(device)
    d = model.config.hidden_size
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)
    for _, block in iterate_blocks(model, family, device):
        for name in family.readers_of_attn_norm() + family.readers_of_mlp_norm():
            w = _f64(block.get_submodule(name).weight, device)
            cov += w.T @ w
        if include_writers:
            for name in family.residual_writers():
                w = _f64(block.get_submodule(name).weight, device)
                cov += w @ w.T
    _, vectors = torch.linalg.eigh(cov)
    return vectors.flip(-1).cpu()
