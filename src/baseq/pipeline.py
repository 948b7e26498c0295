"""One job: load -> quantize with a method -> evaluate -> record. `run_job` is what run.py (and the
launchers) call; it never returns tensors, only the record dict.

Each step is a stage of the run's record (records.RunRecord), written as it starts and ends: load_model,
load_eval_data, then per comparison method compare_<name>_quantize / _eval_ppl / _eval_zeroshot /
_eval_ppl_kernels, then the run's own quantize (or load_quantized), save_quantized, eval_ppl,
eval_zeroshot, eval_ppl_kernels."""

from __future__ import annotations

import copy
import logging
import random
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import data
from .config import enum_value, resolve_device
from .errors import UserError
from .blockwise import move_to
from .evaluation.perplexity import perplexity, window_nlls, window_nlls_blockwise
from .evaluation.zeroshot import data_sources as zeroshot_sources
from .evaluation.zeroshot import evaluate_zeroshot
from .methods import METHODS
from .methods.base import MethodContext
from .models.lazy import block_store
from .models.loading import load_model
from .quant import fused_inference
from .records import MethodRecord, RunRecord, StageTimer, environment, git_commit, new_run_id, package_versions
from .saving import MANIFEST, load_quantized_model, save_quantized_model
from .signals import Preempted, stop_signals_raise
from .sweep import find_resumable_record

log = logging.getLogger("baseq")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _calibration_loader(cfg: DictConfig, tokenizer, sources: dict) -> Any:
    def load() -> torch.Tensor:
        text, source = data.wikitext2_text("train", cfg.data_root)
        sources["calibration"] = source
        ids = data.tokenize(tokenizer, text)
        return data.calibration_samples(ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
    return load


def apply_method(model, family, tokenizer, cfg: DictConfig, method_cfg: DictConfig, device: torch.device,
                 sources: dict) -> dict:
    """Quantize `model` in place with the method; returns the method's own report (per-block losses, notes,
    per-step times). The calibration files read are added to `sources`."""
    seed_everything(cfg.seed)
    ctx = MethodContext(method=method_cfg, quant=cfg.quant, device=device, seed=cfg.seed,
                        load_calibration=_calibration_loader(cfg, tokenizer, sources),
                        calib_batch_size=cfg.calib.batch_size)
    METHODS[method_cfg.algorithm].quantize(model, family, ctx)
    return ctx.report


def quantize(model, family, tokenizer, cfg: DictConfig, method_cfg: DictConfig, device: torch.device,
             rec: MethodRecord) -> None:
    """Apply the method in place, as the record's `quantize` stage (with the method's own report)."""
    with rec.stage("quantize"):
        report = apply_method(model, family, tokenizer, cfg, method_cfg, device, rec.run.data["data_sources"])
        for name, seconds in report.pop("timings_s", {}).items():
            rec.run.timer.seconds[f"{rec.prefix}quantize.{name}"] = seconds
        if report:
            rec.update(method_report=report)


def evaluation_stages(cfg: DictConfig, method_cfg: DictConfig) -> list[str]:
    """The evaluation stages a method goes through under this config."""
    stages = []
    if cfg.eval.ppl is not None:
        stages.append("eval_ppl")
    if cfg.eval.zeroshot is not None:
        stages.append("eval_zeroshot")
    if cfg.eval.kernels and cfg.eval.ppl is not None and method_cfg.algorithm != "fp":
        stages.append("eval_ppl_kernels")
    return stages


def evaluate(model, family, tokenizer, cfg: DictConfig, method_cfg: DictConfig, windows: torch.Tensor | None,
             device: torch.device, rec: MethodRecord) -> None:
    """Every evaluation the config asks for, each a stage of the record, so each metric is on disk as soon
    as it is measured. Stages the record already holds (carried over from a preempted run) are skipped."""
    stages = [s for s in evaluation_stages(cfg, method_cfg) if not rec.finished(s)]
    sources = rec.run.data["data_sources"]
    lazy = block_store(model) is not None
    if "eval_ppl" in stages:
        with rec.stage("eval_ppl"):
            if lazy:   # its blocks stream from their store
                nlls = window_nlls_blockwise(model, family, windows, device, cfg.eval.ppl.batch_size)
            else:
                nlls = window_nlls(model, windows, device, cfg.eval.ppl.batch_size)
            rec.update(wikitext2_ppl=perplexity(nlls), wikitext2_windows=int(windows.shape[0]))
            log.info("%s wikitext2_ppl = %.6f (%d windows)", method_cfg.name, rec.metrics["wikitext2_ppl"],
                     windows.shape[0])
    if {"eval_zeroshot", "eval_ppl_kernels"} & set(stages):
        # straight onto the device: a lazy model's host memory stays at one block
        materialize(model, family, "zero-shot and the kernels' perplexity run the whole model", device)
    if "eval_zeroshot" in stages:
        zs = cfg.eval.zeroshot
        root = data.resolve_data_root(cfg.data_root)   # the same root as perplexity and calibration
        with rec.stage("eval_zeroshot"):
            rec.update(**evaluate_zeroshot(model, tokenizer, list(zs.tasks), root, zs.limit, zs.batch_size, device,
                                           matmul_precision=enum_value(zs.float32_matmul_precision)))
            sources["zeroshot"] = zeroshot_sources(list(zs.tasks), root)
    if "eval_ppl_kernels" in stages:
        with rec.stage("eval_ppl_kernels"):
            rec.update(**evaluate_with_kernels(model, family, windows, device, cfg.eval.ppl.batch_size,
                                               rec.metrics["wikitext2_ppl"]))
    if not lazy:   # (a lazy model read onto the device stays there: its caller drops it)
        move_to(model, family, "cpu")


def materialize(model, family, why: str, device: torch.device | str = "cpu") -> None:
    """A lazy model's blocks all onto `device` (it stops being lazy), for a step that needs the whole model."""
    store = block_store(model)
    if store is not None:
        log.info("%s: reading all %d blocks of the lazy model onto %s", why, len(family.blocks(model)), device)
        store.materialize_all(model, family.blocks(model), torch.device(device))
        move_to(model, family, device)


def quantize_and_evaluate(model, family, tokenizer, cfg: DictConfig, method_cfg: DictConfig,
                          windows: torch.Tensor | None, device: torch.device, rec: MethodRecord) -> None:
    quantize(model, family, tokenizer, cfg, method_cfg, device, rec)
    evaluate(model, family, tokenizer, cfg, method_cfg, windows, device, rec)


def evaluate_with_kernels(model, family, windows, device, batch_size, fake_ppl) -> dict:
    """Convert the fake-quant model to the W4A4 runtime (in place) and measure its perplexity on the same
    windows: the check that the kernels compute what was evaluated."""
    from .runtime import convert_to_w4a4, load_kernels

    if device.type != "cuda" and not load_kernels().interpreting():
        raise UserError("eval.kernels=true runs the Triton kernels, which need device=cuda "
                        "(or TRITON_INTERPRET=1 for a slow CPU check)")
    convert_to_w4a4(model.to(device), family)
    ppl = perplexity(window_nlls(model, windows, device, batch_size))
    return {"wikitext2_ppl_kernels": ppl, "kernels_vs_fake_ppl": ppl / fake_ppl - 1}


def _flat(container: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(container, dict):
        return {prefix: container}
    out: dict[str, Any] = {}
    for key, value in container.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_saved_model_matches(cfg: DictConfig, folder: str, manifest: dict) -> None:
    """A loaded model is recorded under this run's config: refuse one that was made with another."""
    wanted = {"method": OmegaConf.to_container(cfg.method, resolve=True, enum_to_str=True),
              "quant": OmegaConf.to_container(cfg.quant, resolve=True, enum_to_str=True),
              "model": {k: cfg.model[k] for k in ("name", "num_layers")}}
    saved = {"method": manifest["method"], "quant": manifest["quant"],
             "model": {k: manifest["model"].get(k) for k in ("name", "num_layers")}}
    ours, theirs = _flat(wanted), _flat(saved)
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise UserError(f"load_quantized={folder} was made with {key}={theirs.get(key)}, this run has "
                            f"{key}={ours.get(key)}; pass {key}={theirs.get(key)} (the saved config is in "
                            f"{Path(folder) / MANIFEST}) or drop load_quantized")


def _method_stages(stages_done: list[str], prefix: str) -> list[str]:
    """The stages of one method (prefix "" = the run's own) in a list of stage names, without the prefix."""
    if prefix:
        return [s[len(prefix):] for s in stages_done if s.startswith(prefix)]
    return [s for s in stages_done if not s.startswith("compare_") and s not in ("load_model", "load_eval_data")]


def carry_over(record: RunRecord, previous: dict, cfg: DictConfig, compare_methods: dict[str, DictConfig]) -> dict:
    """Take from a preempted record what need not be measured again. A method whose every stage finished
    keeps its metrics and is not run; the run's own method, when its quantized model was saved, keeps the
    metrics measured on it and is loaded instead of quantized. Otherwise a method starts afresh, so the
    metrics of one method always come from one quantized model. Returns {method name or None: "done" |
    <saved folder> | None}."""
    plan: dict[str | None, str | None] = {}
    previous_metrics = previous.get("metrics", {})
    for name, method_cfg in [*compare_methods.items(), (None, cfg.method)]:
        prefix = "" if name is None else f"compare_{name}_"
        done = _method_stages(previous.get("stages_done", []), prefix)
        metrics = previous_metrics.get("compare", {}).get(name, {}) if name else \
            {k: v for k, v in previous_metrics.items() if k != "compare"}
        quantized = "quantize" in done or "load_quantized" in done
        finished_evals = [s for s in evaluation_stages(cfg, method_cfg) if s in done]
        saved = previous.get("quantized_model") if name is None and "save_quantized" in done else None
        if quantized and finished_evals == evaluation_stages(cfg, method_cfg):
            plan[name], carried = "done", done
            if name is None and previous.get("quantized_model"):
                record.data["quantized_model"] = previous["quantized_model"]
        elif saved and (Path(saved) / MANIFEST).is_file():
            plan[name], carried = saved, ["save_quantized", *finished_evals]
            record.data["quantized_model"] = saved
        else:
            plan[name], carried = None, []
        if carried:
            record.method(name).update(**metrics)
            record.data["stages_done"] += [prefix + s for s in carried]
            for stage in carried:
                if prefix + stage in previous.get("timings_s", {}):
                    record.timer.seconds[prefix + stage] = previous["timings_s"][prefix + stage]
    if record.data["stages_done"]:   # what the carried stages read (calibration, test set)
        record.data["data_sources"].update(previous.get("data_sources", {}))
    record.data["resumed_from"] = previous["record_path"]
    record.write()
    return plan


def run_job(cfg: DictConfig, compare_methods: dict[str, DictConfig] | None = None, run_key: str | None = None,
            key_parts: dict | None = None, run_id: str | None = None) -> dict:
    """Run one configured job and keep its record up to date (see records.RunRecord). Errors write a
    'failed' record naming the stage, SIGTERM a 'preempted' one, and re-raise. A job whose key has a
    preempted record resumes from it (carry_over)."""
    compare_methods = compare_methods or {}
    device = resolve_device(cfg.device)
    timer = StageTimer(device)
    record = RunRecord(cfg.results_dir, {
        "run_id": run_id or new_run_id(cfg.model.name, cfg.method.name, cfg.quant.name),
        "run_key": run_key,
        "run_key_parts": key_parts,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "quant": cfg.quant.name,
        "protocol": cfg.protocol,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "metrics": {},
        "data_sources": {},
        "environment": environment(device),
        "versions": package_versions(),
        "git_commit": git_commit(),
    }, timer)
    with stop_signals_raise() as signals_received:
        try:
            with fused_inference(cfg.fused_quantizers):
                _run_stages(record, cfg, compare_methods, device, run_key)
            record.finish("done")
        except BaseException as err:
            done = record.data["stages_done"]
            stage = record.data["stage"] or (f"after {done[-1]}" if done else "setup")
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            error = {"type": type(err).__name__, "message": message, "stage": stage,
                     "user_error": isinstance(err, UserError)}
            if isinstance(err, Preempted) or (signals_received and not isinstance(err, KeyboardInterrupt)):
                error["signal"] = signals_received[-1] if signals_received else "SIGTERM"
                status = "preempted"
            else:
                status = "failed"
                if not isinstance(err, (UserError, KeyboardInterrupt)):
                    error["traceback"] = traceback.format_exc()
            record.finish(status, error)
            raise
    return record.data


def _run_stages(record: RunRecord, cfg: DictConfig, compare_methods: dict[str, DictConfig], device: torch.device,
                run_key: str | None) -> None:
    previous = find_resumable_record(cfg.results_dir, run_key, record.data["run_id"]) if run_key else None
    plan = carry_over(record, previous, cfg, compare_methods) if previous else {}
    if previous:
        log.info("resuming from %s: carried %s", previous["record_path"], ", ".join(record.data["stages_done"]) or "nothing")
    main_source = cfg.load_quantized or plan.get(None)   # a folder to load the run's own model from, or "done"
    compare_to_run = {n: m for n, m in compare_methods.items() if plan.get(n) != "done"}
    seed_everything(cfg.seed)
    model = tokenizer = family = None

    def load():
        return load_model(cfg.model.path, enum_value(cfg.model.dtype), device, cfg.model.revision,
                          cfg.model.num_layers, cfg.model.lazy, cfg.model.scratch_dir)

    if compare_to_run or main_source is None:
        with record.stage("load_model"):
            model, tokenizer, family = load()
    quantized = None
    if main_source not in (None, "done"):
        with record.stage("load_quantized"):
            quantized, saved_tokenizer, quantized_family, manifest = load_quantized_model(main_source)
            check_saved_model_matches(cfg, main_source, manifest)
            record.data["quantized_model"] = str(main_source)
        tokenizer = tokenizer or saved_tokenizer
    windows = None
    needs_windows = cfg.eval.ppl is not None and (compare_to_run or main_source != "done")
    if needs_windows:
        with record.stage("load_eval_data"):
            text, record.data["data_sources"]["wikitext2_test"] = data.wikitext2_text("test", cfg.data_root)
            windows = data.perplexity_windows(data.tokenize(tokenizer, text), cfg.eval.ppl.seqlen,
                                              cfg.eval.ppl.max_windows)
        log.info("protocol %s: calibration %d x %d tokens, %d evaluation windows of %d tokens", cfg.protocol,
                 cfg.calib.nsamples, cfg.calib.seqlen, windows.shape[0], cfg.eval.ppl.seqlen)
    # comparisons first, each on a fresh copy (a lazy model is loaded again: its skeleton is cheap, and a deep
    # copy would hold meta blocks with no store behind them); the main method then consumes the loaded model
    for name, method_cfg in compare_to_run.items():
        log.info("comparison method: %s", name)
        fresh = load()[0] if block_store(model) is not None else copy.deepcopy(model)
        quantize_and_evaluate(fresh, family, tokenizer, cfg, method_cfg, windows, device, record.method(name))
        del fresh
    if main_source == "done":
        return
    log.info("method: %s", cfg.method.name)
    main = record.method()
    if quantized is None:
        quantize(model, family, tokenizer, cfg, cfg.method, device, main)
        if cfg.save_quantized:
            with main.stage("save_quantized"):
                materialize(model, family, "save_quantized writes the whole model")
                folder = Path(cfg.results_dir) / "models" / record.data["run_id"]
                save_quantized_model(model, tokenizer, folder, cfg.method, cfg.quant, cfg.model,
                                     info={"run_id": record.data["run_id"], "git_commit": record.data["git_commit"]})
                record.data["quantized_model"] = str(folder)
        quantized, quantized_family = model, family
    evaluate(quantized, quantized_family, tokenizer, cfg, cfg.method, windows, device, main)


def summary_table(record: dict) -> str:
    """The console's closing table: this run's metrics next to the comparison methods'."""
    metrics = record["metrics"]
    rows = [(name, m) for name, m in metrics.get("compare", {}).items()] + [(record["method"], metrics)]
    fp = next((m for name, m in rows if name == "fp"), {})
    columns = [c for c in (("wikitext2_ppl", "wikitext2 ppl", 15), ("zeroshot_avg", "0-shot avg %", 14))
               if any(c[0] in m for _, m in rows)]
    lines = [f"{record['model']}  {record['quant']}  protocol={record['protocol']}  "
             f"({metrics.get('wikitext2_windows', 0)} WikiText-2 windows)",
             f"{'method':<28}" + "".join(f"{title:>{width}}{'vs fp':>12}" for _, title, width in columns)]
    for name, m in rows:
        cells = []
        for key, _, width in columns:
            value = f"{m[key]:.3f}" if key in m else ""
            delta = f"{m[key] - fp[key]:+.3f}" if key in m and key in fp and name != "fp" else ""
            cells.append(f"{value:>{width}}{delta:>12}")
        lines.append(f"{name:<28}" + "".join(cells))
    for name, m in rows:
        for note in m.get("method_report", {}).get("notes", []):
            lines.append(f"note ({name}): {note}")
    lines.append(f"record: {record['record_path']}")
    return "\n".join(lines)
