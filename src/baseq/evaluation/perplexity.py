"""WikiText-2 perplexity with the GPTQ/QuaRot protocol (DESIGN.md section 7): the test rows joined with
"\\n\\n", tokenized once, cut into non-overlapping windows (tail dropped); ppl = exp(mean window NLL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def mean_next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each window's mean NLL of its next tokens (float64 on the host), from logits [b, seq, vocab]."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return loss.view(ids.shape[0], -1).mean(dim=1).double().cpu()


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token NLL of every window [n, seqlen] (float64 on the host)."""
    model.to(device)
    nlls = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="WikiText-2 ppl", unit="batch"):
        ids = windows[start:start + batch_size].to(device)
        nlls.append(mean_next_token_nll(model(ids, use_cache=False).logits, ids))
    return torch.cat(nlls)


@torch.no_grad()
def window_nlls_blockwise(model, family, windows: torch.Tensor, device: torch.device,
                          batch_size: int = 1) -> torch.Tensor:
    """window_nlls computed one block at a time over all windows (as GPTQ's own evaluation does): only one
    block and the windows' hidden states are on the device, and a lazy model's blocks stream from their
    store. Same numbers as window_nlls up to the batching of the matmuls."""
    from ..blockwise import block_forward, capture_block_inputs, iterate_blocks, move_to

    inputs = capture_block_inputs(model, family, windows, device)
    hidden = inputs.hidden
    for _, block in tqdm(iterate_blocks(model, family, device, write_back=False), total=len(family.blocks(model)),
                         desc="WikiText-2 ppl, block by block", unit="block"):
        for start in range(0, hidden.shape[0], batch_size):   # in place: one copy of the hidden states
            hidden[start:start + batch_size] = block_forward(block, hidden[start:start + batch_size], inputs.kwargs)
    norm, head = model.get_submodule(family.final_norm), model.get_submodule(family.lm_head)
    nlls = []
    for start in range(0, hidden.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        nlls.append(mean_next_token_nll(head(norm(hidden[start:start + batch_size])), ids))
    move_to(model, family, "cpu")
    return torch.cat(nlls)


def perplexity(nlls: torch.Tensor) -> float:
    return math.exp(nlls.mean().item())
