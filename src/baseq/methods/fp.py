"""Full precision: the reference every other method is measured against."""

from .base import MethodConfig
from .registry import register


def quantize(model, family, ctx) -> None:
    pass


register("fp", schema=MethodConfig, quantize=quantize, label="Full precision")
