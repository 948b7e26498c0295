"""The quantization methods. Every module (or package) in this folder is one method, which registers itself
with registry.register when imported; importing baseq.methods imports them all, so that METHODS (name ->
Method: schema, quantize, label, validate) is complete. Adding a method is adding its module here (and,
for named presets, yamls under conf/method/); see registry.py."""

import importlib
import pkgutil

from .registry import METHODS, Method, register

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "register"]
