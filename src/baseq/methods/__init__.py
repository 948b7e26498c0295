"""Method registry: config name -> quantize(model, family, ctx). Adding a method = one module + one line."""

from . import baseq, fp, quarot, rtn

METHODS = {
    "fp": fp.quantize,
    "rtn": rtn.quantize,
    "quarot": quarot.quantize,
    "baseq": baseq.quantize,
}
