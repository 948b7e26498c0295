"""WikiText-2 perplexity with the GPTQ/QuaRot protocol (DESIGN.md section 7): the test rows joined with
"\\n\\n", tokenized once, cut into non-overlapping windows (tail dropped); ppl = exp(mean window NLL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token NLL of every window [n, seqlen] (float64 on the host)."""
    model.to(device)
    nlls = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="WikiText-2 ppl", unit="batch"):
        ids = windows[start:start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        nlls.append(loss.view(ids.shape[0], -1).mean(dim=1).double().cpu())
    return torch.cat(nlls)


def perplexity(nlls: torch.Tensor) -> float:
    return math.exp(nlls.mean().item())
