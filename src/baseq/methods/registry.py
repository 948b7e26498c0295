"""The methods by name. A method module registers itself when imported, with one call at its bottom:

    register("toy", schema=ToyConfig, quantize=quantize, label="Toy", validate=validate)

and from then on config.register_configs stores its schema as method/toy_schema (a yaml under
conf/method/ starts with `defaults: [toy_schema, _self_]` and sets `algorithm: toy`), config.validate
checks a run config against it and calls its validate(cfg), the pipeline runs its quantize, and
analysis/tables.py names it by its label. Importing baseq.methods imports every method module in that
folder, so METHODS is complete.

This module imports no method and not baseq.config (both import it). A method module's top imports no
torch either: config composition imports every method for its schema, and config errors (and
analysis, planning) must not wait for torch and transformers; heavy steps are imported inside quantize."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .base import MethodConfig


@dataclass(frozen=True)
class Method:
    name: str                  # the value of method.algorithm that selects it
    schema: type               # its config dataclass: MethodConfig or a subclass with its own keys
    quantize: Callable         # quantize(model, family, ctx: MethodContext): edits the model in place
    label: str                 # its name in tables and plots (e.g. BASE-Q)
    # validate(cfg): a UserError for a value of the composed run config that its types cannot rule out
    validate: Optional[Callable[[Any], None]] = None

    @property
    def schema_name(self) -> str:
        return f"{self.name}_schema"


METHODS: dict[str, Method] = {}


def register(name: str, *, schema: type, quantize: Callable, label: str,
             validate: Optional[Callable[[Any], None]] = None) -> Method:
    if not (isinstance(schema, type) and issubclass(schema, MethodConfig)):
        raise TypeError(f"method {name!r}: its schema must be MethodConfig or a dataclass subclassing it")
    method = Method(name, schema, quantize, label, validate)
    registered = METHODS.get(name)
    # the same module imported again (e.g. reloaded) may register again; another module may not take the name
    if registered is not None and registered.quantize.__module__ != quantize.__module__:
        raise ValueError(f"method {name!r} is registered twice: by {registered.quantize.__module__} and by "
                         f"{quantize.__module__}")
    METHODS[name] = method
    return method
