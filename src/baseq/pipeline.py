"""One job: load -> quantize with a method -> evaluate -> record. `run_job` is what run.py (and the
launchers) call; it never returns tensors, only the record dict."""

from __future__ import annotations

import copy
import logging
import random
import traceback
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import data
from .config import enum_value, resolve_device
from .errors import UserError
from .evaluation.perplexity import perplexity, window_nlls
from .evaluation.zeroshot import data_sources as zeroshot_sources
from .evaluation.zeroshot import evaluate_zeroshot
from .methods import METHODS
from .methods.base import MethodContext
from .models.loading import load_model
from .records import (StageTimer, environment, git_commit, host_peak_memory_gb, new_run_id, package_versions,
                      write_record)

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


def quantize_and_evaluate(model, family, tokenizer, cfg: DictConfig, method_cfg: DictConfig,
                          windows: torch.Tensor | None, device: torch.device, timer: StageTimer, sources: dict,
                          prefix: str = "") -> dict:
    seed_everything(cfg.seed)
    ctx = MethodContext(method=method_cfg, quant=cfg.quant, device=device, seed=cfg.seed,
                        load_calibration=_calibration_loader(cfg, tokenizer, sources),
                        calib_batch_size=cfg.calib.batch_size)
    with timer.stage(f"{prefix}quantize"):
        METHODS[method_cfg.algorithm](model, family, ctx)
    for name, seconds in ctx.report.pop("timings_s", {}).items():
        timer.seconds[f"{prefix}quantize.{name}"] = seconds
    metrics: dict[str, Any] = {}
    if windows is not None:
        with timer.stage(f"{prefix}eval_ppl"):
            nlls = window_nlls(model, windows, device, cfg.eval.ppl.batch_size)
        metrics.update(wikitext2_ppl=perplexity(nlls), wikitext2_windows=int(windows.shape[0]))
        log.info("%s%s wikitext2_ppl = %.6f (%d windows)", prefix, method_cfg.name, metrics["wikitext2_ppl"],
                 windows.shape[0])
    if cfg.eval.zeroshot is not None:
        zs = cfg.eval.zeroshot
        root = data.resolve_data_root(cfg.data_root)   # the same root as perplexity and calibration
        with timer.stage(f"{prefix}eval_zeroshot"):
            metrics.update(evaluate_zeroshot(model, tokenizer, list(zs.tasks), root, zs.limit, zs.batch_size, device))
        sources["zeroshot"] = zeroshot_sources(list(zs.tasks), root)
    if cfg.eval.kernels and windows is not None and method_cfg.algorithm != "fp":
        metrics.update(evaluate_with_kernels(model, family, windows, device, cfg.eval.ppl.batch_size, timer, prefix,
                                             metrics["wikitext2_ppl"]))
    model.to("cpu")
    if ctx.report:
        metrics["method_report"] = ctx.report
    return metrics


def evaluate_with_kernels(model, family, windows, device, batch_size, timer, prefix, fake_ppl) -> dict:
    """Convert the fake-quant model to the W4A4 runtime (in place) and measure its perplexity on the same
    windows: the check that the kernels compute what was evaluated."""
    from .runtime import convert_to_w4a4, load_kernels

    if device.type != "cuda" and not load_kernels().interpreting():
        raise UserError("eval.kernels=true runs the Triton kernels, which need device=cuda "
                        "(or TRITON_INTERPRET=1 for a slow CPU check)")
    with timer.stage(f"{prefix}eval_ppl_kernels"):
        convert_to_w4a4(model.to(device), family)
        ppl = perplexity(window_nlls(model, windows, device, batch_size))
    return {"wikitext2_ppl_kernels": ppl, "kernels_vs_fake_ppl": ppl / fake_ppl - 1}


def run_job(cfg: DictConfig, compare_methods: dict[str, DictConfig] | None = None, run_key: str | None = None) -> dict:
    """Run one configured job and write its record. Errors write a 'failed' record and re-raise."""
    compare_methods = compare_methods or {}
    device = resolve_device(cfg.device)
    run_id = new_run_id(cfg.model.name, cfg.method.name, cfg.quant.name)
    timer = StageTimer(device)
    sources: dict[str, str] = {}
    record: dict[str, Any] = {
        "run_id": run_id,
        "run_key": run_key,
        "status": "running",
        "model": cfg.model.name,
        "method": cfg.method.name,
        "quant": cfg.quant.name,
        "protocol": cfg.protocol,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "metrics": {},
        "timings_s": timer.seconds,
        "peak_memory_gb": {"device": timer.device_peak_gb, "host": None},
        "data_sources": sources,
        "environment": environment(device),
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    try:
        seed_everything(cfg.seed)
        with timer.stage("load_model"):
            model, tokenizer, family = load_model(cfg.model.path, enum_value(cfg.model.dtype), device,
                                                  cfg.model.revision, cfg.model.num_layers)
        windows = None
        if cfg.eval.ppl is not None:
            with timer.stage("load_eval_data"):
                text, sources["wikitext2_test"] = data.wikitext2_text("test", cfg.data_root)
                windows = data.perplexity_windows(data.tokenize(tokenizer, text), cfg.eval.ppl.seqlen,
                                                  cfg.eval.ppl.max_windows)
            log.info("protocol %s: calibration %d x %d tokens, %d evaluation windows of %d tokens", cfg.protocol,
                     cfg.calib.nsamples, cfg.calib.seqlen, windows.shape[0], cfg.eval.ppl.seqlen)
        # comparisons first, each on a fresh copy; the main method then consumes the loaded model
        compare = {}
        for name, method_cfg in compare_methods.items():
            log.info("comparison method: %s", name)
            compare[name] = quantize_and_evaluate(copy.deepcopy(model), family, tokenizer, cfg, method_cfg, windows,
                                                  device, timer, sources, prefix=f"compare_{name}_")
        log.info("method: %s", cfg.method.name)
        record["metrics"] = quantize_and_evaluate(model, family, tokenizer, cfg, cfg.method, windows, device, timer,
                                                  sources)
        if compare:
            record["metrics"]["compare"] = compare
        record["status"] = "done"
    except BaseException as err:
        record["status"] = "failed"
        record["error"] = {"type": type(err).__name__, "message": str(err).strip().splitlines()[0] if str(err).strip() else "",
                           "user_error": isinstance(err, UserError)}
        if not isinstance(err, UserError):
            record["error"]["traceback"] = traceback.format_exc()
        raise
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat()
        record["peak_memory_gb"]["host"] = host_peak_memory_gb()
        record["record_path"] = str(write_record(cfg.results_dir, record))
    return record


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
