"""Zero-shot accuracy with lm-evaluation-harness on the in-memory model (DESIGN.md section 7).

The nine tasks of the paper are lm-eval's own task definitions: prompts, doc_to_text/choice/target,
process_docs and metrics all come from the installed lm-eval. Scores are the task's `acc_norm` where it
has one, else `acc` (as QuaRot and SpinQuant report them), in percent, with their unweighted mean.

Online (data_root=None) the tasks read their datasets from the Hugging Face hub, as lm-eval does.
Offline, a data root holds local copies (the layout of ../shared/data, see LOCAL_FILES). Each task is
then re-declared by a generated YAML that `include:`s the stock task YAML and only swaps the dataset
source to the local JSON lines; where a local file's fields differ from the hub dataset's (ARC and
OpenBookQA in the original AI2 layout, labels in separate files, BoolQ labels as strings), a small
converter writes the hub's schema to a cache folder first, so lm-eval's own code runs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import UserError

if TYPE_CHECKING:   # torch and lm-eval load on first evaluation: config validation imports this module
    import torch

log = logging.getLogger("baseq")

ZERO_SHOT_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "openbookqa", "piqa",
                   "social_iqa", "winogrande")

# Where each task's stock YAML lives under lm_eval/tasks/. Indexing only these folders takes a fraction
# of a second; indexing all of lm-eval's tasks (what TaskManager() does) takes ~20 s.
STOCK_TASK_DIRS = {
    "arc_challenge": "arc",
    "arc_easy": "arc",
    "boolq": "super_glue/boolq",
    "hellaswag": "hellaswag",
    "lambada_openai": "lambada",
    "openbookqa": "openbookqa",
    "piqa": "piqa",
    "social_iqa": "siqa",
    "winogrande": "winogrande",
}

# Bump when a converter's output changes, so cached conversions are rebuilt.
CONVERTER_VERSION = 1


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _with_labels(rows: list[dict], labels: list[str], rows_path: Path, labels_path: Path) -> Iterator[tuple[dict, str]]:
    if len(rows) != len(labels):
        raise UserError(f"{labels_path} has {len(labels)} labels but {rows_path} has {len(rows)} rows; "
                        f"they must be aligned line by line")
    return zip(rows, labels)


def _ai2_choices(question: dict) -> dict:
    """AI2's [{"text", "label"}, ...] as the hub's {"text": [...], "label": [...]}."""
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def _arc(paths: list[Path]) -> Iterator[dict]:
    # AI2 release layout -> allenai/ai2_arc: question is the stem, choices are parallel lists
    for row in _read_jsonl(paths[0]):
        yield {"id": row["id"], "question": row["question"]["stem"], "choices": _ai2_choices(row["question"]),
               "answerKey": row["answerKey"]}


def _openbookqa(paths: list[Path]) -> Iterator[dict]:
    # AI2 release layout -> allenai/openbookqa "main": question_stem, choices as parallel lists
    for row in _read_jsonl(paths[0]):
        yield {"id": row["id"], "question_stem": row["question"]["stem"], "choices": _ai2_choices(row["question"]),
               "answerKey": row["answerKey"]}


def _boolq(paths: list[Path]) -> Iterator[dict]:
    # SuperGLUE jsonl (this copy stores the label as the string "true"/"false") -> aps/super_glue boolq,
    # whose label is a ClassLabel: 0 = False, 1 = True (lm-eval's choices are ["no", "yes"])
    for row in _read_jsonl(paths[0]):
        label = row["label"]
        if isinstance(label, str):
            if label.lower() not in ("true", "false"):
                raise UserError(f"{paths[0]}: BoolQ label {label!r} is neither true nor false")
            label = label.lower() == "true"
        yield {"question": row["question"], "passage": row["passage"], "idx": row["idx"], "label": int(label)}


def _piqa(paths: list[Path]) -> Iterator[dict]:
    # goal/sol1/sol2 + a separate label file of 0/1 -> baber/piqa with an integer label
    rows, labels = _read_jsonl(paths[0]), _read_labels(paths[1])
    for row, label in _with_labels(rows, labels, *paths):
        yield {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}


def _social_iqa(paths: list[Path]) -> Iterator[dict]:
    # context/question/answerA-C + a separate label file of 1/2/3 -> lighteval/siqa (label a string "1".."3")
    rows, labels = _read_jsonl(paths[0]), _read_labels(paths[1])
    for row, label in _with_labels(rows, labels, *paths):
        yield {"context": row["context"], "question": row["question"], "answerA": row["answerA"],
               "answerB": row["answerB"], "answerC": row["answerC"], "label": label}


@dataclass(frozen=True)
class LocalFiles:
    """A task's files under the data root, and the converter to the hub's schema (None: already in it)."""
    files: tuple[str, ...]
    convert: Callable[[list[Path]], Iterator[dict]] | None = None


LOCAL_FILES = {
    "arc_challenge": LocalFiles(("arc/ARC-Challenge-Test.jsonl",), _arc),
    "arc_easy": LocalFiles(("arc/ARC-Easy-Test.jsonl",), _arc),
    "boolq": LocalFiles(("boolq/val.jsonl",), _boolq),
    # the hub rows as saved by `datasets` (label a string "0".."3", as on the hub)
    "hellaswag": LocalFiles(("hellaswag/hellaswag_validation.jsonl",)),
    # OpenAI's lambada_test.jsonl: one field `text`, as EleutherAI/lambada_openai "default"
    "lambada_openai": LocalFiles(("lambada_openai/lambada_test.jsonl",)),
    "openbookqa": LocalFiles(("openbookqa/test.jsonl",), _openbookqa),
    "piqa": LocalFiles(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "social_iqa": LocalFiles(("siqa/dev.jsonl", "siqa/dev-labels.lst"), _social_iqa),
    # winogrande_xl dev: sentence/option1/option2/answer as on the hub (its dev-labels.lst repeats `answer`)
    "winogrande": LocalFiles(("winogrande/dev.jsonl",)),
}


def cache_dir() -> Path:
    return Path(os.environ.get("BASEQ_CACHE", Path.home() / ".cache" / "baseq")) / "zeroshot"


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in ZERO_SHOT_TASKS]
    if unknown:
        raise UserError(f"unknown zero-shot task {unknown[0]!r}; available: {', '.join(ZERO_SHOT_TASKS)}")
    if not tasks:
        raise UserError(f"no zero-shot tasks given; available: {', '.join(ZERO_SHOT_TASKS)}")


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def conversion_key(task: str, sources: list[Path]) -> str:
    """The cache key of a conversion: the task, CONVERTER_VERSION and the sources' contents. No paths or
    modification times, so that the same data copied elsewhere (another checkout or machine) hits the cache."""
    contents = ",".join(file_digest(p) for p in sources)
    return hashlib.sha256(f"{task}|v{CONVERTER_VERSION}|{contents}".encode()).hexdigest()[:16]


def local_data_file(task: str, data_root: Path) -> Path:
    """The JSON lines file lm-eval reads for `task`: the local copy itself, or its conversion to the hub's
    schema (cached under cache_dir(), keyed by conversion_key)."""
    spec = LOCAL_FILES[task]
    sources = [Path(data_root) / rel for rel in spec.files]
    for path in sources:
        if not path.is_file():
            raise UserError(f"zero-shot task {task} needs {path.relative_to(data_root)}, which is not under "
                            f"data_root {data_root}; add it (see ../shared/data/README.md for the layout) or drop "
                            f"the task")
    if spec.convert is None:
        return sources[0].resolve()
    out = cache_dir() / f"{task}-{conversion_key(task, sources)}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        # temp file + rename: concurrent jobs may convert the same file; each rename is atomic
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{task}-", suffix=".jsonl")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in spec.convert(sources):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
        log.info("zero-shot %s: converted %s to the hub's schema in %s", task, ", ".join(spec.files), out)
    return out


def stock_task_manager(tasks: list[str]):
    """An lm-eval TaskManager over the folders of lm-eval's own definitions of `tasks` (datasets: the hub)."""
    from importlib.resources import files

    from lm_eval.tasks import TaskManager

    check_tasks(tasks)
    root = Path(str(files("lm_eval") / "tasks"))
    dirs = sorted({root / STOCK_TASK_DIRS[t] for t in tasks})
    manager = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
    missing = [t for t in tasks if t not in manager.task_index]
    if missing:
        raise UserError(f"the installed lm-eval has no task {missing[0]!r} in {root / STOCK_TASK_DIRS[missing[0]]}; "
                        f"install the lm-eval version in pyproject.toml")
    return manager


def _local_task_yaml(stock_yaml: Path, stock_cfg: dict, data_file: Path) -> dict:
    """The stock task with only its data source swapped: every other key comes from `include:`."""
    split = stock_cfg.get("test_split") or stock_cfg["validation_split"]   # the split lm-eval evaluates
    return {
        "include": str(stock_yaml),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        # zero-shot: no training split (lm-eval would build its few-shot pool from it), only the evaluated one
        "training_split": None,
        "validation_split": split if split == stock_cfg.get("validation_split") else None,
        "test_split": split if split == stock_cfg.get("test_split") else None,
    }


def local_task_manager(tasks: list[str], data_root: Path, yaml_dir: Path):
    """An lm-eval TaskManager whose `tasks` read the local copies under data_root: one YAML per task in
    yaml_dir, each including the stock definition (`lm_eval --include_path yaml_dir` reads the same)."""
    import yaml
    from lm_eval.tasks import TaskManager

    stock = stock_task_manager(tasks)
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(f"data_root {data_root} is not a directory")
    yaml_dir = Path(yaml_dir)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        entry = stock.task_index[task]   # entry.cfg: the stock YAML with its includes merged
        cfg = _local_task_yaml(Path(entry.yaml_path), entry.cfg, local_data_file(task, data_root))
        (yaml_dir / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return TaskManager(include_path=str(yaml_dir), include_defaults=False)


def load_tasks(tasks: list[str], data_root: Path | None) -> tuple[object, dict]:
    """(task manager, {name: lm-eval Task}) with the datasets loaded: from the local copies under data_root,
    or from the hub when data_root is None; hub failures become one-line errors."""
    # the generated YAMLs are only read while the tasks are built; the Task objects hold their datasets
    with tempfile.TemporaryDirectory(prefix="baseq-zeroshot-tasks-") as yaml_dir:
        manager = (stock_task_manager(tasks) if data_root is None
                   else local_task_manager(tasks, Path(data_root), Path(yaml_dir)))
        loaded = {}
        for name in tasks:
            try:
                loaded[name] = manager.load([name])["tasks"][name]
            except ConnectionError as err:   # datasets' "Couldn't reach ... on the Hub", offline mode included
                raise UserError(f"zero-shot task {name}: cannot load its dataset from the Hugging Face hub "
                                f"({str(err).splitlines()[0][:200]}); set data_root to a folder with local "
                                f"copies (layout: ../shared/data/README.md)") from err
    return manager, loaded


def data_sources(tasks: list[str], data_root: Path | None) -> dict[str, str]:
    """What each task reads, for the run record: local:<files> or hub:<dataset>[/<config>]."""
    if data_root is not None:
        return {t: "local:" + ",".join(str(Path(data_root) / rel) for rel in LOCAL_FILES[t].files) for t in tasks}
    index = stock_task_manager(tasks).task_index
    sources = {}
    for task in tasks:
        cfg = index[task].cfg
        sources[task] = f"hub:{cfg['dataset_path']}" + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
    return sources


def headline_metric(task_result: dict) -> tuple[str, float]:
    """acc_norm where the task reports it, else acc (lm-eval keys are '<metric>,<filter>')."""
    for metric in ("acc_norm", "acc"):
        if f"{metric},none" in task_result:
            return metric, float(task_result[f"{metric},none"])
    raise KeyError(f"lm-eval reported neither acc_norm nor acc: {sorted(task_result)}")


def evaluate_zeroshot(model, tokenizer, tasks: list[str], data_root: Path | None, limit: int | None,
                      batch_size: int, device: torch.device, logits_budget_bytes: int | None = None,
                      matmul_precision: str = "highest") -> dict:
    """{"zeroshot": {task: accuracy in percent}, "zeroshot_avg": their mean}.

    data_root: a folder with the local copies, or None for the hub (pass `data.resolve_data_root(...)` so
    zero-shot reads from the same root as perplexity). limit: the first N documents of each task (quick
    runs; None = all). batch_size: the largest batch; long requests get smaller ones so that a batch's
    logits fit logits_budget_bytes (default: a share of the memory free on `device` once the model is
    there; see bounded_hflm.py). matmul_precision: torch's float32 matmul precision while lm-eval runs ("high":
    TF32 on a GPU). The model is moved to `device` for the evaluation and back after.
    """
    from lm_eval.evaluator import simple_evaluate

    from ..precision import float32_matmul_precision
    from .bounded_hflm import LOGITS_SHARE_OF_FREE, MemoryBoundedHFLM, free_memory_bytes

    if limit is not None and limit < 1:
        raise UserError(f"zero-shot limit={limit} must be >= 1, or null for every document")
    if batch_size < 1:
        raise UserError(f"zero-shot batch_size={batch_size} must be >= 1 (it is the largest batch)")
    tasks = list(tasks)
    manager, loaded = load_tasks(tasks, data_root)
    home = next(model.parameters()).device
    model.to(device)
    try:   # (lm-eval runs the model under torch.no_grad itself; all tasks share this one HFLM)
        if logits_budget_bytes is None:
            logits_budget_bytes = int(LOGITS_SHARE_OF_FREE * free_memory_bytes(device))
        lm = MemoryBoundedHFLM(pretrained=model, tokenizer=tokenizer, max_batch_size=batch_size,
                               logits_budget_bytes=logits_budget_bytes)
        log.info("zero-shot: batches of up to %d requests, fewer where their logits would exceed %.1f GiB",
                 batch_size, logits_budget_bytes / 2**30)
        # bootstrap_iters=0: no stderr bootstrap (100k resamples per task otherwise); log_samples=False
        # keeps every document's outputs out of memory
        with float32_matmul_precision(matmul_precision):
            out = simple_evaluate(lm, tasks=list(loaded.values()), task_manager=manager, limit=limit,
                                  bootstrap_iters=0, log_samples=False)
    finally:
        model.to(home)
    scores = {}
    for name in tasks:
        metric, value = headline_metric(out["results"][name])
        scores[name] = 100.0 * value
        log.info("zero-shot %s: %s %.2f", name, metric, scores[name])
    return {"zeroshot": scores, "zeroshot_avg": statistics.fmean(scores.values())}
