"""Measure what baseq.planning predicts: the peak device memory of each phase of a real calibration run, on
a random-weight model of a preset's shape (no checkpoint needed), next to the plan's numbers.

The method's real code runs (pipeline-free: methods.METHODS[algorithm].quantize with a MethodContext, random
calibration ids, then evaluation.perplexity.window_nlls on random windows). The phase functions are wrapped
where the method looks them up, and at each entry and exit the CUDA peak since the last boundary is charged
to the innermost open phase, then reset. Per-block times are taken at the same boundaries (synchronized).

    python experiments/planning_probe.py model=qwen2.5-coder-0.5b model.path=x.gguf model.num_layers=2 \\
        calib.nsamples=16 method.stage1_epochs=1 method.stage2_epochs=1 --out probe_qwen.json

The first block's training steps compile (torch.compile: 17-25 s per stage for Qwen2.5-0.5B's shape on an
H200, longer for larger blocks): give a run minutes. Measured so far: experiments/results/planning_probe_h200/
(the command above, 2026-12-02). The same probe for Llama-2-7B and -70B shapes (2 blocks, 32 and 8 windows)
was stopped by its 130 s limit while still in the first block, and not repeated (no device time was left).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from baseq import planning  # noqa: E402
from baseq.methods import METHODS  # noqa: E402
from baseq.methods.base import MethodContext  # noqa: E402


class PhaseMeter:
    """Peak device memory and seconds per (phase, block), a phase being the innermost wrapped call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stack: list[str] = []
        self.block: int | None = None
        self.peaks: dict[str, dict[str, float]] = {}
        self.seconds: dict[str, dict[str, float]] = {}
        self.last = time.perf_counter()

    def boundary(self) -> None:
        cuda = self.device.type == "cuda"   # a CPU dry run checks the code path only (no memory readings)
        if cuda:
            torch.cuda.synchronize(self.device)
        label = self.stack[-1] if self.stack else "loop"
        block = "-" if self.block is None else str(self.block)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0
        now = time.perf_counter()
        by_block = self.peaks.setdefault(label, {})
        by_block[block] = max(by_block.get(block, 0.0), peak)
        spent = self.seconds.setdefault(label, {})
        spent[block] = spent.get(block, 0.0) + now - self.last
        self.last = now
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def wrap(self, module, name: str) -> None:
        """Calls of module.name become a phase; a wrapped call inside another is `outer/name`."""
        inner = getattr(module, name)
        meter = self

        def wrapped(*args, **kwargs):
            meter.boundary()
            meter.stack.append(f"{meter.stack[-1]}/{name}" if meter.stack else name)
            try:
                return inner(*args, **kwargs)
            finally:
                meter.boundary()
                meter.stack.pop()

        setattr(module, name, wrapped)

    def wrap_block_iterator(self, module) -> None:
        inner = module.iterate_blocks
        meter = self

        def iterate(*args, **kwargs):
            for index, block in inner(*args, **kwargs):
                if not meter.stack:   # the method's own block loop, not a rotation pass
                    meter.boundary()
                    meter.block = index
                yield index, block
            if not meter.stack:
                meter.boundary()
                meter.block = None

        module.iterate_blocks = iterate


def from_second_block(by_block: dict[str, float]) -> float:
    """A phase's peak as the plan counts it: from the second block on (the first has no previous block's
    outputs alive), or its only reading for a phase outside the block loop."""
    later = [value for block, value in by_block.items() if block != "0"]
    return max(later or by_block.values())


def random_model(shape: planning.ModelShape, dtype: torch.dtype, family_name: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if family_name == "qwen2" else \
        (LlamaConfig, LlamaForCausalLM)
    config = config_class(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                          num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                          num_hidden_layers=shape.num_hidden_layers, vocab_size=shape.vocab_size,
                          tie_word_embeddings=shape.tie_word_embeddings, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = model_class(config).to(dtype).eval()
    model.config.use_cache = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-windows", type=int, default=2, help="random windows for the perplexity pass")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [*args.overrides, "device=cuda", "compare_with=[]"]
    plan = planning.make_plan(overrides)
    cfg, _ = planning.compose_run_config(overrides)
    shape = planning.model_shape(cfg["model"])
    dtype = getattr(torch, plan["load_dtype"])
    family_name = "qwen2" if shape.attention_bias else "llama"
    model = random_model(shape, dtype, family_name)
    from baseq.models.families import family_of

    family = family_of(model)
    n, seqlen = cfg["calib"]["nsamples"], cfg["calib"]["seqlen"]
    ids = torch.randint(0, shape.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))
    ctx = MethodContext(method=OmegaConf.create(cfg["method"]), quant=OmegaConf.create(cfg["quant"]),
                        device=device, seed=0, load_calibration=lambda: ids,
                        calib_batch_size=cfg["calib"]["batch_size"])

    meter = PhaseMeter(device)
    import baseq.methods.baseq.steps as baseq_method
    import baseq.methods.quarot as quarot_method
    import baseq.quantize as quantize_module

    for module in (baseq_method, quarot_method):
        meter.wrap(module, "apply_rotations")
    meter.wrap(baseq_method, "capture_block_inputs")
    meter.wrap(quantize_module, "capture_block_inputs")
    meter.wrap(baseq_method, "train_stage1")
    meter.wrap(baseq_method, "train_stage2")
    meter.wrap(baseq_method, "train_block")
    meter.wrap(baseq_method, "quantize_block_weights")
    meter.wrap(quantize_module, "gptq_block")
    meter.wrap_block_iterator(baseq_method)
    meter.wrap_block_iterator(quantize_module)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    METHODS[cfg["method"]["algorithm"]].quantize(model, family, ctx)
    meter.boundary()
    quantize_seconds = time.perf_counter() - start

    from baseq.evaluation.perplexity import window_nlls

    windows = torch.randint(0, shape.vocab_size, (args.eval_windows, cfg["eval"]["ppl"]["seqlen"]),
                            generator=torch.Generator().manual_seed(1))
    meter.stack.append("window_nlls")
    meter.block = None
    window_nlls(model, windows, device, cfg["eval"]["ppl"]["batch_size"])
    meter.boundary()
    meter.stack.pop()

    measured = {label: from_second_block(by_block) for label, by_block in meter.peaks.items()}
    result = {"overrides": overrides, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "load_dtype": plan["load_dtype"], "shape": plan["shape"], "quantize_seconds": quantize_seconds,
              "timings_s": ctx.report.get("timings_s"), "peaks_gib_by_block": meter.peaks,
              "seconds_by_block": meter.seconds, "measured_gib_blocks_from_1": measured,
              "planned": {p["name"]: p["gib"] for p in plan["device_phases"]},
              "planned_terms": {p["name"]: {t["name"]: t["gib"] for t in p["terms"]} for p in plan["device_phases"]},
              "planned_eval": plan["eval_phases"]["eager"]["terms"] if plan["eval_phases"]["eager"] else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'phase (measured, blocks >= 1)':<44}{'GiB':>8}")
    for label, value in sorted(measured.items()):
        print(f"  {label:<42}{value:8.2f}")
    print(f"{'phase (planned)':<44}{'GiB':>8}")
    for name, value in result["planned"].items():
        print(f"  {name:<42}{value:8.2f}")
    print(f"quantize {quantize_seconds:.1f} s; timings {ctx.report.get('timings_s')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
