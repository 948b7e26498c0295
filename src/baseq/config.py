"""Typed configuration. Every Hydra config group has a dataclass schema here, except the methods': the
generic MethodConfig is in baseq/methods/base.py and each method's own schema in its module, registered in
baseq/methods/registry.py. The YAML files under conf/ extend these schemas, so a misspelled key or an
out-of-range value fails at composition time, before any model loads, with OmegaConf's message naming the
key (and, for enums, the valid values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import UserError
from .evaluation.zeroshot import ZERO_SHOT_TASKS
# enum_value is imported from here by much of the package; it lives with MethodConfig, which the methods share
from .methods.base import MethodConfig, enum_value
from .methods.registry import METHODS


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class MatmulPrecision(Enum):
    """torch.set_float32_matmul_precision: highest = true fp32, high = TF32 tensor cores on a GPU."""
    highest = "highest"
    high = "high"


class DType(Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class WeightClipSearch(Enum):
    mse = "mse"
    none = "none"


@dataclass
class ModelConfig:
    name: str = MISSING
    # a hub id, a local HF folder, a .gguf file, or pip:<distribution>/<file inside it> (the embedded model)
    path: str = MISSING
    dtype: DType = DType.auto
    revision: Optional[str] = None
    # keep only the first N decoder blocks (e.g. to show memory does not grow with depth); null = all
    num_layers: Optional[int] = None
    # true: the blocks stay in the checkpoint's safetensors until processed, so host memory holds one block
    # plus the embeddings and head (models/lazy.py); their working copies go to a temporary folder in
    # scratch_dir (null: the system's temporary folder; it needs about the model's size on disk)
    lazy: bool = False
    scratch_dir: Optional[str] = None


@dataclass
class QuantConfig:
    name: str = MISSING
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    w_clip_search: WeightClipSearch = WeightClipSearch.mse


@dataclass
class CalibConfig:
    dataset: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1


@dataclass
class PerplexityConfig:
    seqlen: int = 2048
    max_windows: Optional[int] = None   # null: the whole test set
    batch_size: int = 1


@dataclass
class ZeroShotConfig:
    # lm-eval task names (baseq.evaluation.zeroshot.ZERO_SHOT_TASKS lists the supported ones)
    tasks: list[str] = field(default_factory=lambda: list(ZERO_SHOT_TASKS))
    limit: Optional[int] = None   # the first N documents of each task (quick runs); null = every document
    # the largest batch; smaller ones where their logits would not fit (evaluation/bounded_hflm.py)
    batch_size: int = 32
    # float32 matmuls while lm-eval runs: `high` (TF32) makes fp32 models (GGUF copies) several times faster
    # on a GPU at a 10-bit mantissa for the matmul inputs; perplexity and calibration always use `highest`
    float32_matmul_precision: MatmulPrecision = MatmulPrecision.highest


@dataclass
class EvalConfig:
    name: str = MISSING
    ppl: Optional[PerplexityConfig] = field(default_factory=PerplexityConfig)   # null: no perplexity
    zeroshot: Optional[ZeroShotConfig] = None                                   # null: no zero-shot
    # also convert the quantized model to packed int4 + Triton kernels (baseq.runtime) and measure its ppl
    kernels: bool = False


@dataclass
class LoggerConfig:
    name: str = "local"
    project: str = "baseq"
    mode: str = "online"


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    quant: QuantConfig = MISSING
    calib: CalibConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    device: Device = Device.auto
    seed: int = 0
    results_dir: str = "results"
    data_root: Optional[str] = None
    # methods evaluated in the same job on the same windows, for the closing comparison table
    compare_with: list[str] = field(default_factory=list)
    # which protocol the calibration/eval sizes come from: filled in by the by_device resolver's callers
    protocol: str = "${protocol_name:${device}}"
    # skip a run whose configuration (baseq.sweep.run_key) already has a done record; false: run it again
    resume: bool = True
    # save the run's quantized model to <results_dir>/models/<run_id>/ (safetensors + manifest, baseq.saving)
    save_quantized: bool = False
    # evaluate the quantized model saved in this folder instead of quantizing (null: quantize)
    load_quantized: Optional[str] = None
    # where autograd is off on a GPU, the fake quantizers run compiled (quant.fused_inference): the same code, one
    # or two kernels a call instead of about twenty. Bit-identical on a CPU (tests); on an H200 a few values in 10^7
    # differ (fused multiply-adds; docs/results.md). false: eager everywhere
    fused_quantizers: bool = True


def resolve_device(device: Device | str):
    import torch  # imported here so that config errors are reported without loading torch

    name = device.value if isinstance(device, Device) else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible to torch; use device=cpu or device=auto")
    return torch.device(name)


def _by_device(device: str, cpu_value: Any, gpu_value: Any) -> Any:
    """Sizes of the quick CPU preset vs the paper's protocol, chosen by the run's device."""
    return cpu_value if resolve_device(device).type == "cpu" else gpu_value


def _protocol_name(device: str) -> str:
    return "cpu-preset" if resolve_device(device).type == "cpu" else "full"


def register_configs() -> None:
    for name, fn in (("by_device", _by_device), ("protocol_name", _protocol_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="method", name="method_schema", node=MethodConfig)
    for method in METHODS.values():   # each method's own: baseq_schema, ... (fp_schema etc. = method_schema)
        cs.store(group="method", name=method.schema_name, node=method.schema)
    cs.store(group="quant", name="quant_schema", node=QuantConfig)
    cs.store(group="calib", name="calib_schema", node=CalibConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


def validate(cfg) -> None:
    """Checks that span fields or need more than a type; run before anything heavy happens."""
    resolve_device(cfg.device)  # first: the by_device presets below resolve through it
    for key in ("w_bits", "a_bits", "kv_bits"):
        bits = cfg.quant[key]
        if not (2 <= bits <= 8 or bits == 16):
            raise UserError(f"quant.{key}={bits} is not supported; use 2..8, or 16 for no quantization")
    for key in ("act_clip_ratio", "kv_clip_ratio"):
        if not 0 < cfg.method[key] <= 1:
            raise UserError(f"method.{key}={cfg.method[key]} must be in (0, 1]")
    for key in ("nsamples", "seqlen", "batch_size"):
        if cfg.calib[key] < 1:
            raise UserError(f"calib.{key}={cfg.calib[key]} must be >= 1")
    if cfg.eval.ppl is None and cfg.eval.zeroshot is None:
        raise UserError("eval.ppl and eval.zeroshot are both null: nothing to evaluate; use eval=ppl, zeroshot or full")
    if cfg.eval.ppl is not None and cfg.eval.ppl.max_windows is not None and cfg.eval.ppl.max_windows < 1:
        raise UserError(f"eval.ppl.max_windows={cfg.eval.ppl.max_windows} must be >= 1, or null for the whole test set")
    if cfg.eval.zeroshot is not None:
        from .evaluation.zeroshot import check_tasks

        check_tasks(list(cfg.eval.zeroshot.tasks))
        if cfg.eval.zeroshot.limit is not None and cfg.eval.zeroshot.limit < 1:
            raise UserError(f"eval.zeroshot.limit={cfg.eval.zeroshot.limit} must be >= 1, or null for every document")
        if cfg.eval.zeroshot.batch_size < 1:
            raise UserError(f"eval.zeroshot.batch_size={cfg.eval.zeroshot.batch_size} must be >= 1")
    if cfg.eval.ppl is not None and cfg.eval.ppl.batch_size < 1:
        raise UserError(f"eval.ppl.batch_size={cfg.eval.ppl.batch_size} must be >= 1")
    if not cfg.method.gptq.damp > 0:
        raise UserError(f"method.gptq.damp={cfg.method.gptq.damp} must be > 0 (GPTQ's Hessian dampening, "
                        f"a fraction of its mean diagonal; 0.01 is the usual value)")
    if cfg.method.gptq.block_size < 1:
        raise UserError(f"method.gptq.block_size={cfg.method.gptq.block_size} must be >= 1")
    nsamples = cfg.method.gptq.nsamples
    if nsamples is not None and nsamples < 1:
        raise UserError(f"method.gptq.nsamples={nsamples} must be >= 1 (the first N calibration windows), "
                        f"or null for all of them")
    validate_method(cfg)
    if cfg.get("load_quantized"):
        from .saving import read_manifest

        read_manifest(cfg.load_quantized)
        if cfg.get("save_quantized"):
            raise UserError(f"save_quantized=true with load_quantized={cfg.load_quantized}: that model is saved "
                            f"already; drop one of the two")


def validate_method(cfg) -> None:
    """method.algorithm names a registered method, the method config is built on that method's schema, and
    the method's own checks (its registered validate) pass."""
    name = cfg.method.algorithm
    if name not in METHODS:
        raise UserError(f"method.algorithm={name!r} is not registered; available: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    built_on = OmegaConf.get_type(cfg.method)
    if not (isinstance(built_on, type) and issubclass(built_on, method.schema)):
        raise UserError(f"method.algorithm={name} needs its schema: start the method's yaml with "
                        f"`defaults: [{method.schema_name}, _self_]` (this one is built on "
                        f"{getattr(built_on, '__name__', built_on)})")
    if method.validate is not None:
        method.validate(cfg)


GROUPS = ("model", "method", "quant", "calib", "eval", "launcher", "logger", "experiment")


def check_group_choices(argv: list[str], conf_dir) -> None:
    """One-line error for a config-group option that does not exist (Hydra's own message is a page long)."""
    from pathlib import Path

    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in GROUPS or value.startswith(("glob(", "range(", "choice(")):
            continue
        group_dir = Path(conf_dir, key)
        available = sorted(str(p.relative_to(group_dir).with_suffix("")) for p in group_dir.rglob("*.yaml"))
        for option in value.split(","):
            if option and option not in available:
                raise UserError(f"unknown {key} {option!r}; available: {', '.join(available)}")


def _chosen_option(argv: list[str], group: str, conf_dir) -> str | None:
    """The option of `group` that argv picks, else the default of conf/config.yaml; None when an experiment
    preset may pick it (only composing would tell)."""
    import yaml
    from pathlib import Path

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "experiment" and value not in ("", "null"):
            return None
        if key.lstrip("+~") == group:
            return value
    for entry in yaml.safe_load(Path(conf_dir, "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def check_overrides_under_null_sections(argv: list[str], conf_dir) -> None:
    """One-line error for an override inside an evaluation that the eval preset leaves out (e.g.
    eval.zeroshot.batch_size=16 with eval=ppl, whose zeroshot is null): Hydra stops with an assertion and a
    traceback there."""
    import yaml
    from pathlib import Path

    keys = [a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a and not a.startswith("-")]
    # keys inside an eval section (eval.<section>.<key>), unless the section itself is set too
    inside = [k for k in keys
              if k.startswith("eval.") and k.count(".") >= 2 and ".".join(k.split(".")[:2]) not in keys]
    if not inside:
        return
    option = _chosen_option(argv, "eval", conf_dir)
    if option is None or "," in option:
        return
    path = Path(conf_dir, "eval", f"{option}.yaml")
    preset = yaml.safe_load(path.read_text()) if path.is_file() else {}
    for key in inside:
        section = key.split(".")[1]
        value = preset[section] if section in preset else getattr(EvalConfig(name=option), section, ...)
        if value is None:
            raise UserError(f"{key}: eval={option} has no {section} evaluation (eval.{section} is null); choose "
                            f"an eval preset that has it (eval=full has ppl and zeroshot) or drop the override")
