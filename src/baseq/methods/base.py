"""What every method shares: the generic method schema (MethodConfig, which a method's own schema extends)
and what a method's quantize(model, family, ctx) receives (MethodContext).

Nothing here imports torch, the big config module or any method: config.py and every method module import
this one (config composition must not load torch; see registry.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Optional

import logging

from omegaconf import MISSING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("baseq")


def enum_value(value: Any) -> str:
    """The plain string of a config enum (OmegaConf returns Enum members for typed fields)."""
    return value.value if isinstance(value, Enum) else str(value)


class WeightAlgorithm(Enum):
    gptq = "gptq"
    rtn = "rtn"


class OProjHadamard(Enum):
    none = "none"                # BASE-Q's Figure 4: only the per-head R2 at the o_proj input
    cross_heads = "cross_heads"  # QuaRot's code: an online Hadamard across heads (full where heads have none)
    full = "full"                # one online Hadamard of the whole o_proj input


@dataclass
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    # divide every token by its RMS before it enters the Hessian (the BASE-Q authors' code; not standard GPTQ)
    normalize_tokens: bool = False
    # GPTQ on the first N calibration windows (the BASE-Q authors: 128 of their 256); null or more than there
    # are: all of them
    nsamples: Optional[int] = None


@dataclass
class MethodConfig:
    """The keys every method config has (stored as method/method_schema). A method with keys of its own
    subclasses it; the subclass is stored as method/<name>_schema (config.register_configs)."""
    name: str = MISSING        # the label in records and tables (e.g. baseq_ablation/rv)
    algorithm: str = MISSING   # the registered method that runs (baseq.methods.registry.METHODS)
    rotate: bool = False
    weights: WeightAlgorithm = WeightAlgorithm.rtn
    act_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    o_proj_hadamard: OProjHadamard = OProjHadamard.none
    gptq: GPTQConfig = field(default_factory=GPTQConfig)


@dataclass
class MethodContext:
    method: Any                   # the method's config node
    quant: Any                    # the quant preset
    device: torch.device
    seed: int
    load_calibration: Callable[[], torch.Tensor]
    calib_batch_size: int = 1
    # what the method wants in the run record (per-block losses, per-stage times): filled in by the method
    report: dict = field(default_factory=dict)

    def note(self, message: str) -> None:
        """A step that could not apply as configured (and what was done instead): logged, and kept in the
        record under method_report.notes. Repeated notes are kept once."""
        notes = self.report.setdefault("notes", [])
        if message not in notes:
            log.warning(message)
            notes.append(message)

    @cached_property
    def calibration(self) -> torch.Tensor:
        """Calibration token windows [nsamples, seqlen], loaded on first use only."""
        return self.load_calibration()

    def quantize_weights(self, model, family) -> None:
        from ..quantize import quantize_weights_gptq, quantize_weights_rtn

        clip_search = enum_value(self.quant.w_clip_search)
        if enum_value(self.method.weights) == "gptq":
            g = self.method.gptq
            quantize_weights_gptq(model, family, self.calibration[:g.nsamples], self.quant.w_bits, clip_search,
                                  self.device, g.block_size, g.damp, g.act_order, self.calib_batch_size,
                                  g.normalize_tokens)
        else:
            quantize_weights_rtn(model, family, self.quant.w_bits, clip_search, self.device)
