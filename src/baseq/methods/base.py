"""What a method receives. A method is a function `quantize(model, family, ctx)` that edits the model in
place; it is registered in baseq.methods.METHODS under its config name."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import logging

import torch

from ..config import enum_value

log = logging.getLogger("baseq")


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
