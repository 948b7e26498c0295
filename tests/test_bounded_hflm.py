"""MemoryBoundedHFLM's batched tokenization of loglikelihood requests: the token ids it hands to
_loglikelihood_tokens are the ones lm-eval's own request-by-request tokenization makes."""

import logging

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers import processors

from baseq.evaluation.bounded_hflm import MemoryBoundedHFLM
from baseq.evaluation.zeroshot import load_tasks

TASKS = ["arc_easy", "boolq", "hellaswag", "lambada_openai", "piqa", "winogrande"]
BOS = "<|endoftext|>"   # the tiny tokenizer's BOS = EOS, so lm-eval's prefix token


@pytest.fixture(scope="module")
def task_pairs():
    """(context, continuation) of the first documents of several tasks, as lm-eval builds them from the local data."""
    import os
    from pathlib import Path

    if not os.environ.get("BASEQ_DATA_ROOT"):
        pytest.skip("BASEQ_DATA_ROOT is not set")
    _, tasks = load_tasks(TASKS, Path(os.environ["BASEQ_DATA_ROOT"]))
    pairs = []
    for task in tasks.values():
        task.build_all_requests(limit=4, rank=0, world_size=1)
        pairs += [inst.args for inst in task.instances]
    return pairs


# the cases _encode_pair and LM.loglikelihood treat specially, repeated contexts, and what byte-level BPE splits oddly
EDGE_PAIRS = [
    ("Question: why?\nAnswer:", " because"), ("Question: why?\nAnswer:", " it is"),   # one context, two choices
    ("The end ", "of it"), ("tabs and newlines\t\n ", "x"), ("   ", "only spaces before"),   # trailing whitespace
    ("", "an empty context"), ("", f"{BOS}starts with the prefix token"), ("", " leading space"),
    (f"{BOS}a context that starts with BOS", " then more"), (f"{BOS}", " after BOS alone"),
    ("Senjō no Valkyria 3 : Unrecorded Chronicles", " — ünïcödé 日本語 🙂"), ("naïve café", ""),
]


def tiny_tokenizer(adds_bos: bool):
    from conftest import SAMPLE_TEXT, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(SAMPLE_TEXT + " Question: why? Answer: because it is. ")
    if adds_bos:   # as Llama's tokenizers do: then the BOS-prefix check in HFLM.tok_encode decides the ids
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.bos_token_id)])
        assert tokenizer.encode("a")[0] == tokenizer.bos_token_id
    return tokenizer


def tokenized(lm, pairs) -> list:
    """What lm.loglikelihood passes on to _loglikelihood_tokens (nothing is run through the model)."""
    captured = []
    lm._loglikelihood_tokens = lambda reqs, **_: captured.append(reqs) or []
    lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)],
                     disable_tqdm=True)
    return captured[0]


@pytest.mark.parametrize("adds_bos", [False, True])
@pytest.mark.parametrize("add_bos_token", [None, False, True])
def test_batched_tokenization_gives_lm_evals_token_ids(task_pairs, adds_bos, add_bos_token, monkeypatch):
    from conftest import tiny_llama

    tokenizer = tiny_tokenizer(adds_bos)
    model = tiny_llama(hidden=32, ffn=64, heads=2, kv_heads=1, layers=1, vocab=len(tokenizer), dtype=torch.float32)
    pairs = task_pairs + EDGE_PAIRS
    kwargs = dict(pretrained=model, tokenizer=tokenizer, add_bos_token=add_bos_token)
    plain = tokenized(HFLM(batch_size=1, **kwargs), pairs)
    bounded = MemoryBoundedHFLM(max_batch_size=4, logits_budget_bytes=2**30, **kwargs)
    calls = []   # lm-eval's own tok_encode: only the spot checks, when the batched table serves the requests
    tok_encode = HFLM.tok_encode
    monkeypatch.setattr(HFLM, "tok_encode", lambda self, *a, **kw: calls.append(a) or tok_encode(self, *a, **kw))
    ours = tokenized(bounded, pairs)
    assert ours == plain
    assert len(calls) <= 4, len(calls)
    assert bounded._encoded == {}   # the table lives only while loglikelihood runs


def test_batched_tokenization_falls_back_when_lm_eval_encodes_otherwise(task_pairs, caplog):
    """An lm-eval (or tokenizer) that would encode with other kwargs than the mirrored ones: the spot check
    notices and every request is tokenized as lm-eval does."""
    from conftest import tiny_llama

    tokenizer = tiny_tokenizer(adds_bos=True)
    model = tiny_llama(hidden=32, ffn=64, heads=2, kv_heads=1, layers=1, vocab=len(tokenizer), dtype=torch.float32)
    plain = tokenized(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), task_pairs)
    bounded = MemoryBoundedHFLM(pretrained=model, tokenizer=tokenizer, max_batch_size=4, logits_budget_bytes=2**30)
    bounded._tok_encode_kwargs = lambda *_: {"add_special_tokens": False}   # never a BOS: not what lm-eval does
    with caplog.at_level(logging.WARNING, logger="baseq"):
        assert tokenized(bounded, task_pairs) == plain
    assert "batched tokenization differs from lm-eval's tok_encode" in caplog.text
