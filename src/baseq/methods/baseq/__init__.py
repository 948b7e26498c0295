"""BASE-Q (He et al., 2025; DESIGN.md section 5): QuaRot's rotations plus, per decoder block, learned paired
scales, R_v and clips (stage 1), GPTQ, then learned activation biases, unpaired scales and clips (stage 2).
Every component is a switch of BaseQConfig, so the paper's ablation ladder is a set of configs
(conf/method/baseq_ablation/) and the authors' public-code recipe is another (conf/method/baseq_authors.yaml).

This module is the method: its schema, its checks and its registration. The steps, which need torch and the
model code, are in steps.py, imported when a run quantizes (see baseq/methods/registry.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from ...errors import UserError
from ..base import MethodConfig, WeightAlgorithm
from ..registry import register


class ResidualRotation(Enum):
    hadamard = "hadamard"                    # random Hadamard H D (QuaRot)
    hadamard_unsigned = "hadamard_unsigned"  # H without random signs (the BASE-Q authors' plain Sylvester)
    pca_hadamard = "pca_hadamard"            # weight-PCA basis, then the random Hadamard (the paper's Eq. 13)


class BlockInputs(Enum):
    fp = "fp"                  # the full-precision model's activations
    quantized = "quantized"    # the quantized model's own activations


class ValueRotationInit(Enum):
    hadamard = "hadamard"      # R_v starts at the per-head Hadamard R2 (the paper)
    identity = "identity"      # R_v starts at I and no R2 is fused (the authors' code, in effect)


class Stage1Quantizers(Enum):
    all = "all"                # every activation and KV quantizer on while stage 1 trains
    down_proj = "down_proj"    # only the down_proj input quantized in stage 1, KV off (the authors' code)


class BlockLoss(Enum):
    mse = "mse"                                    # MSE of the block output, as the paper
    token_normalized_mse = "token_normalized_mse"  # each token's squared error over its fp output's energy


class TrainStep(Enum):
    auto = "auto"              # compiled on CUDA, eager elsewhere
    eager = "eager"
    compiled = "compiled"      # torch.compile of the block's forward and backward


class TrainPrecision(Enum):
    fp32 = "fp32"                    # the block and every step in float32
    tf32 = "tf32"                    # float32 tensors, the matmuls on TF32 tensor cores (a GPU's; fp32 on a CPU):
                                     # training and BASE-Q's other block passes (targets, MSEs, next inputs, the
                                     # forwards feeding GPTQ), not GPTQ's Hessians and solve
    fp16_autocast = "fp16_autocast"  # fp16 autocast, the block kept in fp32, GradScaler (the authors' code)
    bf16_autocast = "bf16_autocast"  # bf16 autocast, the block kept in fp32 (no scaler needed)


@dataclass
class LearningRates:
    scale: float = 1e-2
    clip: float = 1e-2
    bias: float = 1e-3
    rotation: float = 3e-3
    # cosine decay to this absolute rate, shared by every group (the authors: 3e-5 and 3e-6);
    # null: each group decays to 1% of its own rate
    eta_min_stage1: Optional[float] = None
    eta_min_stage2: Optional[float] = None


@dataclass
class BaseQConfig(MethodConfig):
    """BASE-Q (DESIGN.md section 5). Defaults are the full method with the paper's hyperparameters."""
    rotate: bool = True
    weights: WeightAlgorithm = WeightAlgorithm.gptq
    act_clip_ratio: float = 0.9      # initial value when learn_clip
    kv_clip_ratio: float = 0.95
    residual_rotation: ResidualRotation = ResidualRotation.hadamard
    learn_rv: bool = True
    rv_per_kv_head: bool = True
    rv_init: ValueRotationInit = ValueRotationInit.hadamard
    bias: bool = True
    bias_init: str = "mean"          # mean | zero
    kv_bias: bool = False
    unpaired_scale: bool = True
    paired_scale: bool = True
    learn_clip: bool = True
    kv_clip_per_head: bool = True    # a learned KV clip per KV head (else one per quantizer)
    # the paper's 3 and 5 epochs; the quick CPU preset trains one epoch per stage
    stage1_epochs: int = "${by_device:${device},1,3}"  # type: ignore[assignment]
    stage2_epochs: int = "${by_device:${device},1,5}"  # type: ignore[assignment]
    stage1_quantizers: Stage1Quantizers = Stage1Quantizers.all
    train_batch_size: int = 4        # not given in the paper
    loss: BlockLoss = BlockLoss.mse
    # Inputs of block l while training and for its GPTQ Hessians: the full-precision model's activations or
    # the quantized model's own (blocks 0..l-1 quantized). Targets are always the fp block on fp inputs.
    # The paper does not say; "quantized" is the default by measurement (docs/results.md).
    train_inputs: BlockInputs = BlockInputs.quantized
    gptq_inputs: BlockInputs = BlockInputs.quantized
    # the last N calibration windows are not trained on; the record gives each block's MSE on them
    heldout_samples: int = 0
    # how a training step runs: the same numbers up to floating-point reassociation, compiled is faster on
    # a GPU (small blocks are bound by kernel launches) and slow to start on a CPU
    train_step: TrainStep = TrainStep.auto
    # fp32 as the paper's reading; the autocast modes run the matmuls in 16 bit (faster; other numbers).
    # With fp16 a GradScaler skips steps whose gradients overflow; steps with a non-finite loss are counted
    # in the record (stage*_nonfinite_steps) and left out of the epoch's mean loss.
    train_precision: TrainPrecision = TrainPrecision.fp32
    lr: LearningRates = field(default_factory=LearningRates)


def validate(cfg) -> None:
    """What BaseQConfig's types cannot rule out (config.validate calls this for method.algorithm=baseq)."""
    m = cfg.method
    if m.bias_init not in ("mean", "zero"):
        raise UserError(f"method.bias_init={m.bias_init!r}; use 'mean' or 'zero'")
    if m.learn_clip and m.stage1_epochs + m.stage2_epochs > 0:
        for key in ("act_clip_ratio", "kv_clip_ratio"):
            if m[key] >= 1:
                raise UserError(f"method.{key}={m[key]} with learn_clip=true: a learned clip is a sigmoid "
                                f"and must start below 1; use e.g. 0.9, or learn_clip=false")
    if m.heldout_samples:
        held, n = m.heldout_samples, cfg.calib.nsamples
        if not 0 <= held < n:
            raise UserError(f"method.heldout_samples={held} must be in [0, calib.nsamples={n})")
    for key, value in m.lr.items():
        if value is not None and not value > 0:
            raise UserError(f"method.lr.{key}={value} must be > 0")
    for key in ("stage1_epochs", "stage2_epochs"):
        if m[key] < 0:
            raise UserError(f"method.{key}={m[key]} must be >= 0 (0 skips the stage)")
    if m.train_batch_size < 1:
        raise UserError(f"method.train_batch_size={m.train_batch_size} must be >= 1")


def quantize(model, family, ctx) -> None:
    from . import steps

    steps.quantize(model, family, ctx)


register("baseq", schema=BaseQConfig, quantize=quantize, label="BASE-Q", validate=validate)
