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

It also tokenizes loglikelihood requests in bulk (see `loglikelihood`): lm-eval encodes each request's strings one
`tokenizer.encode` call at a time, a large share of zero-shot wall time on a slow host CPU.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from lm_eval.models.huggingface import HFLM

log = logging.getLogger("baseq")

# The share of free memory (device memory on a GPU, host memory on a CPU), measured when evaluation starts,
# that one batch's logits may take. The rest is for the forward pass (activations and the fake quantizers'
# temporaries) and for other jobs on a shared GPU.
LOGITS_SHARE_OF_FREE = 0.4

# strings per batched tokenizer call: the Rust encodings of a call are all alive at once
TOKENIZE_CHUNK = 8192


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
        self._encoded = {}     # (string, add_special_tokens) -> token ids, while `loglikelihood` runs

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

    # Batched tokenization. lm-eval's LM.loglikelihood tokenizes request by request: _encode_pair calls tok_encode
    # twice (context + continuation, then the context), each one tokenizer.encode plus a decode of the prefix
    # token. Here every string it will ask for is encoded first, once (multiple-choice tasks repeat a context for
    # each choice), in a few batched calls that a fast tokenizer runs in Rust threads; tok_encode then answers from
    # that table. lm-eval's own loop still builds the requests: only where their token ids come from changes.

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # (a slow tokenizer gains nothing from a batch call; seq2seq's _encode_pair asks for other strings)
        if getattr(self.tokenizer, "is_fast", False) and self.backend == "causal":
            self._encoded = self._encode_all([req.args for req in requests])
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._encoded = {}

    def tok_encode(self, string, *args, **kwargs):
        # the table answers the two calls LM.loglikelihood makes, tok_encode(s) and
        # tok_encode(s, add_special_tokens=False); any other call (truncation, other methods) is lm-eval's own
        if self._encoded and not args and set(kwargs) <= {"add_special_tokens"}:
            ids = self._encoded.get((string, kwargs.get("add_special_tokens")))
            if ids is not None:
                return list(ids)   # a list of its own, as tokenizer.encode returns
        return super().tok_encode(string, *args, **kwargs)

    def _tok_encode_kwargs(self, string: str, add_special_tokens: bool | None, bos_text: str) -> dict:
        """The tokenizer kwargs HFLM.tok_encode (lm-eval 0.4.13) encodes `string` with: add_special_tokens as
        passed, else add_bos_token where set, else the tokenizer's default; but no special tokens, when the argument
        is None, for a string that already starts with the prefix token's text."""
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if string.startswith(bos_text):
            return {"add_special_tokens": False}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def _encode_all(self, pairs) -> dict:
        """{(string, add_special_tokens): ids} for every tok_encode call LM.loglikelihood makes for these
        (context, continuation) pairs; {} when a spot check finds lm-eval's tok_encode encoding otherwise."""
        wanted = {}   # (string, add_special_tokens) -> None: an ordered set
        for context, continuation in pairs:
            if context == "":   # LM.loglikelihood: the prefix token is the context
                wanted[(continuation, False)] = None
                continue
            n_spaces = len(context) - len(context.rstrip())   # _encode_pair moves trailing spaces to the continuation
            if n_spaces > 0:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            wanted[(context + continuation, None)] = None
            wanted[(context, None)] = None
        bos_text = self.tokenizer.decode(self.prefix_token_id)   # (what tok_encode decodes at every call)
        groups = defaultdict(list)   # the same tokenizer kwargs: one batched call
        for key in wanted:
            groups[tuple(self._tok_encode_kwargs(*key, bos_text).items())].append(key)
        encoded = {}
        for kwargs, keys in groups.items():
            for start in range(0, len(keys), TOKENIZE_CHUNK):
                chunk = keys[start:start + TOKENIZE_CHUNK]
                ids = self.tokenizer([string for string, _ in chunk], **dict(kwargs), return_attention_mask=False,
                                     return_token_type_ids=False)["input_ids"]
                encoded.update(zip(chunk, ids))
        # A guard against an lm-eval whose tok_encode picks other kwargs (pyproject allows older releases) or a
        # tokenizer whose encode differs from its batch call: the first string of each kind must come out as
        # lm-eval's own tok_encode encodes it, else every request is tokenized as lm-eval does.
        firsts = {}
        for kwargs, keys in groups.items():
            for string, add_special_tokens in keys:
                firsts.setdefault((kwargs, add_special_tokens), string)
        for (_, add_special_tokens), string in firsts.items():
            theirs = (super().tok_encode(string) if add_special_tokens is None
                      else super().tok_encode(string, add_special_tokens=add_special_tokens))
            if theirs != encoded[(string, add_special_tokens)]:
                log.warning("zero-shot: batched tokenization differs from lm-eval's tok_encode on %r; tokenizing "
                            "request by request instead", string[:80])
                return {}
        return encoded
