"""lm-eval's HFLM with batches sized so that their logits fit in memory (a large vocabulary needs this).

For each batch, HFLM._loglikelihood_tokens keeps two [batch, padded_len, vocab] tensors at once: the
model's logits and their log-softmax. With Qwen2's 151,936-token vocabulary in float32, a batch of 32 at
about 1,200 tokens (BoolQ's long passages) is 23 GiB per tensor. A fixed batch size that suits short requests
runs out of memory on long ones.

MemoryBoundedHFLM changes only how requests are grouped into batches, not what is computed. It does this
through lm-eval's own hook for variable batch sizes: with batch_size="auto", lm-eval asks
`_batch_scheduler(pos, requests)` for a batch size at every request, and the requests come sorted longest
first. At the first (longest) request of each batch it returns the largest size up to `max_batch_size` whose
two logits tensors fit `logits_budget_bytes`. Short requests keep the full batch and long ones get smaller
batches. lm-eval's own detection (batch_size="auto" in plain HFLM) is not used, for three reasons: it fills
whatever memory is free when it probes, so another job's growth on a shared GPU can push it out of memory
later; it costs five forward passes per probe; and with one probe it applies the longest request's batch to
every request.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM

log = logging.getLogger("baseq")

# The share of free memory (device memory on a GPU, host memory on a CPU), measured when evaluation starts,
# that one batch's logits may take. The rest is for the forward pass (activations and the fake quantizers'
# temporaries) and for other jobs on a shared GPU.
LOGITS_SHARE_OF_FREE = 0.4


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil   # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def batch_size_for(length: int, vocab: int, bytes_per_logit: int, budget_bytes: int, max_batch: int) -> int:
    """The largest batch (1 .. max_batch) with batch x length x vocab x bytes_per_logit <= budget_bytes. A single
    request that exceeds the budget still gets a batch of 1: the budget only limits how requests are grouped."""
    per_request = max(1, length) * vocab * bytes_per_logit
    return max(1, min(max_batch, budget_bytes // per_request))


class MemoryBoundedHFLM(HFLM):
    """HFLM(pretrained=model, tokenizer=...) with batches of up to max_batch_size requests, fewer for long
    requests, so that a batch's logits and their log-softmax fit logits_budget_bytes."""

    def __init__(self, *, max_batch_size: int, logits_budget_bytes: int, **hflm_kwargs):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        super().__init__(batch_size="auto", max_batch_size=max_batch_size, **hflm_kwargs)
        self.logits_budget_bytes = int(logits_budget_bytes)
        # older lm-eval releases (pyproject allows 0.4.8) may lack these overrides: then both are the model dtype
        logits_dtype = getattr(self, "mixed_precision_dtype", None) or next(self.model.parameters()).dtype
        softmax_dtype = getattr(self, "softmax_dtype", None) or logits_dtype   # what lm-eval's log_softmax yields
        # the model's logits and their log-softmax, both alive at once
        self.bytes_per_logit = logits_dtype.itemsize + softmax_dtype.itemsize
        self.logits_width = self.model.get_output_embeddings().weight.shape[0]   # the vocabulary, padded
        self._batch_end = 0    # the position after the current batch in lm-eval's sorted requests
        self._batch_size = 0

    def batch_size_for_length(self, length: int) -> int:
        return batch_size_for(length, self.logits_width, self.bytes_per_logit, self.logits_budget_bytes,
                              self.max_batch_size)

    def _batch_scheduler(self, pos: int, requests) -> int:
        """lm-eval's hook (Collator.get_chunks calls it at every position; a batch closes when it holds the
        returned number of requests): the size is fixed at the first request of each batch, its longest."""
        if pos == 0 or pos >= self._batch_end:
            _, context, continuation = requests[pos]
            # the padded length of this batch, as _loglikelihood_tokens builds it: (ctx + cont)[-(max+1):][:-1]
            length = min(len(context) + len(continuation), self.max_length + 1) - 1
            self._batch_size = self.batch_size_for_length(length)
            self._batch_end = pos + self._batch_size
        return self._batch_size

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """lm-eval's other batch_size="auto" paths (rolling loglikelihood, generation; none of the nine tasks):
        sized for the longest input the model takes, instead of probing with forward passes."""
        return self.batch_size_for_length(self.max_length)
