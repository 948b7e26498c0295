"""How much slower is lm-eval on a fake-quantized model than on the full-precision one?

A known complaint about rotation-quantization code (SpinQuant's: ~8x) is that zero-shot evaluation of the
quantized model crawls. This times `evaluate_zeroshot` on SmolLM2-135M in full precision and after QuaRot
at W4A4KV4 (fake quantization: activations and KV quantized on the fly, online Hadamards R3/R4), on the
same tasks and documents, and prints the ratio. The quantization itself is not timed.

    python experiments/zeroshot_speed.py --limit 20                      # CPU
    python experiments/zeroshot_speed.py --limit 200 --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from baseq import data
from baseq.config import register_configs
from baseq.evaluation.zeroshot import ZERO_SHOT_TASKS, evaluate_zeroshot
from baseq.methods import METHODS
from baseq.methods.base import MethodContext
from baseq.models.loading import load_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def quantized(model, family, tokenizer, cfg, device: torch.device):
    """Apply cfg.method in place, as pipeline.quantize_and_evaluate does."""
    def calibration() -> torch.Tensor:
        text, _ = data.wikitext2_text("train", cfg.data_root)
        return data.calibration_samples(data.tokenize(tokenizer, text), cfg.calib.nsamples, cfg.calib.seqlen,
                                        cfg.seed)

    ctx = MethodContext(method=cfg.method, quant=cfg.quant, device=device, seed=cfg.seed,
                        load_calibration=calibration, calib_batch_size=cfg.calib.batch_size)
    METHODS[cfg.method.algorithm](model, family, ctx)
    return model


def timed_eval(model, tokenizer, tasks, data_root, limit, batch_size, device) -> tuple[float, dict]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    scores = evaluate_zeroshot(model, tokenizer, tasks, data_root, limit, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=20, help="documents per task")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag", help=f"comma-separated, of {ZERO_SHOT_TASKS}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--method", default="quarot")
    parser.add_argument("--quant", default="w4a4kv4")
    parser.add_argument("--data-root", default=None, help="local data copies (default: as run.py finds them)")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={args.method}", f"quant={args.quant}", f"device={args.device}",
                                           "calib.nsamples=8", "calib.seqlen=512"]
                      + ([f"data_root={args.data_root}"] if args.data_root else []))
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    data_root = data.resolve_data_root(cfg.data_root)
    tasks = args.tasks.split(",")
    model, tokenizer, family = load_model(cfg.model.path, "auto", device)

    # one untimed pass warms the dataset caches (lm-eval's process_docs, datasets' arrow files)
    evaluate_zeroshot(model, tokenizer, tasks, data_root, 1, args.batch_size, device)
    fp_s, fp_scores = timed_eval(model, tokenizer, tasks, data_root, args.limit, args.batch_size, device)
    quantized(model, family, tokenizer, cfg, device)
    q_s, q_scores = timed_eval(model, tokenizer, tasks, data_root, args.limit, args.batch_size, device)

    print(f"SmolLM2-135M, tasks {','.join(tasks)}, limit {args.limit}, batch {args.batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<22}{'seconds':>10}{'0-shot avg %':>14}")
    print(f"{'fp':<22}{fp_s:>10.1f}{fp_scores['zeroshot_avg']:>14.2f}")
    print(f"{args.method + ' ' + args.quant:<22}{q_s:>10.1f}{q_scores['zeroshot_avg']:>14.2f}")
    print(f"slowdown: {q_s / fp_s:.2f}x")


if __name__ == "__main__":
    main()
