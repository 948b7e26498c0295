"""GPTQ (Frantar et al., 2023) on top of the project's symmetric per-channel weight quantizer."""

from __future__ import annotations

import torch

from .precision import float32_matmul_precision
from .quant import quantize_symmetric, weight_scale


class HessianAccumulator:
    """Running H = 2/n sum x x^T of a linear layer's inputs, in float32 on the layer's device.

    normalize_tokens: divide every token by its RMS before adding it (the BASE-Q authors' code does this; it
    stops a few large-norm tokens from dominating H, which standard GPTQ does not do)."""

    def __init__(self, columns: int, device: torch.device, normalize_tokens: bool = False):
        self.hessian = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.count = 0
        self.normalize_tokens = normalize_tokens

    @float32_matmul_precision("highest")   # fp32 whatever the forward that produced x ran at (TF32 training)
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.normalize_tokens:
            x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True).clamp(min=1e-12))
        n = x.shape[0]
        self.hessian *= self.count / (self.count + n)
        self.count += n
        x = x * (2 / self.count) ** 0.5
        self.hessian += x.T @ x


@float32_matmul_precision("highest")
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, clip_search: str = "mse",
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False):
    """Quantize `weight` [out, in] column by column, spreading each column's rounding error over the
    columns not yet quantized. Returns (dequantized weight in weight's dtype, per-channel scale [out, 1])."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale = weight_scale(w, bits, clip_search)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]

    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_blk, hinv_blk = w[:, start:end].clone(), hinv[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for i in range(end - start):
            col, d = w_blk[:, i], hinv_blk[i, i]
            q_col = quantize_symmetric(col.unsqueeze(1), scale, bits).squeeze(1) * scale.squeeze(1)
            q[:, start + i] = q_col
            err = (col - q_col) / d
            w_blk[:, i:] -= err.unsqueeze(1) @ hinv_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ hinv[start:end, end:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(weight.dtype), scale
