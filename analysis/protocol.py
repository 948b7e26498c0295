"""Which evaluation protocol a run record follows, so that tables never mix runs of different protocols.

A record is run under one of PROTOCOLS, chosen by its device (record["protocol"]: `full` on a GPU, the
paper's sizes; `cpu-preset` on a CPU, the quick sizes): the `${by_device:${device},<cpu>,<gpu>}` values in
conf/ and in the schemas (src/baseq/config.py, the methods' own in src/baseq/methods/). It counts as that
protocol only when its resolved config equals the protocol's defaults in everything that can change a
number; otherwise it is `custom`, with the keys that differ as the reason (e.g. "method.stage1_epochs=1 (full: 3)").

The defaults are composed from conf/ with Hydra's compose API for the record's own model, method, quant and
eval choices, with each by_device value taken for the protocol. Every key is compared except NEUTRAL_KEYS
(where things are written, logging, batch sizes). A key only one side has is not compared: an option added
after the record was written (its old behaviour is the new default) or one removed since. A model, method
or quant without a preset in conf/ (model=local renamed, records of a method this checkout lacks) has its
own section left uncompared; the rest still is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PROTOCOLS = ("full", "cpu-preset")
CUSTOM = "custom"

# Keys that do not change any number a table shows (prefixes cover the keys below them).
NEUTRAL_KEYS = (
    "results_dir", "data_root", "resume", "compare_with", "logger", "launcher", "device", "protocol",
    "model.path",              # the same model (model.name) read from another place
    "method.name",             # the label; the method's settings are compared key by key
    "eval.name",               # ppl / zeroshot / full only choose which metrics are measured
    "eval.kernels",            # adds the runtime's ppl next to the fake-quant one, which it does not change
    "calib.batch_size", "eval.ppl.batch_size", "eval.zeroshot.batch_size",   # same data, other batching
    "method.train_step",       # eager or compiled training: the same numbers up to reassociation
    "model.lazy", "model.scratch_dir",   # where the blocks wait between steps: the same numbers (tests/test_lazy.py)
    "fused_quantizers",        # the quantizers compiled or eager: the same code, float noise (a few values in 10^7)
)

BY_DEVICE = re.compile(r"^\$\{by_device:\$\{device\},([^,]*),([^,]*)\}$")


@dataclass(frozen=True)
class Verdict:
    protocol: str                  # one of PROTOCOLS, or CUSTOM
    started_under: str | None      # the protocol the record was run under (record["protocol"])
    differences: tuple[str, ...]   # why it is custom: "key=value (protocol: default)" per differing key

    @property
    def reason(self) -> str:
        return "; ".join(self.differences)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists, None and empty dicts are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def _for_protocol(value: Any, protocol: str) -> Any:
    """A by_device interpolation -> its value under `protocol`; anything else as it is."""
    match = BY_DEVICE.match(value) if isinstance(value, str) else None
    if not match:
        return value
    return yaml.safe_load(match.group(1 if protocol == "cpu-preset" else 2))


def has_preset(group: str, name: str) -> bool:
    return (CONF_DIR / group / f"{name}.yaml").is_file()


@lru_cache(maxsize=None)
def defaults(protocol: str, choices: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The flattened default config under `protocol` for the group choices ((group, option), ...), composed
    from conf/."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from baseq.config import register_configs

    register_configs()
    overrides = [f"{group}={option}" for group, option in choices]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    tree = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return {key: _for_protocol(value, protocol) for key, value in flatten(tree).items()}


def classify(record: dict, compared_method: str | None = None) -> Verdict:
    """The protocol of a record, or of the comparison method `compared_method` inside it (metrics.compare).
    A comparison method runs at its own defaults (run.py composes it without the job's method overrides)
    under the job's other settings, so only the record's non-method keys are compared for it."""
    config = record.get("config") or {}
    started = record.get("protocol") or {"cuda": "full", "cpu": "cpu-preset"}.get(config.get("device"))
    if started not in PROTOCOLS:
        return Verdict(CUSTOM, started, (f"run under protocol {started!r}, not one of {', '.join(PROTOCOLS)}",))
    if not config:
        return Verdict(CUSTOM, started, ("the record has no config to compare with the protocol",))
    wanted = {"model": record["model"], "method": compared_method or record["method"], "quant": record["quant"],
              "eval": (config.get("eval") or {}).get("name", "ppl")}
    choices = tuple((group, name) for group, name in wanted.items() if has_preset(group, name))
    unchecked = {group for group in wanted if (group, wanted[group]) not in choices}
    if compared_method:
        unchecked.add("method")
    expected = defaults(started, choices)
    actual = flatten(config)
    differences = []
    for key in sorted(actual.keys() & expected.keys()):
        if _is_neutral(key) or key.split(".", 1)[0] in unchecked:
            continue
        if actual[key] != expected[key]:
            differences.append(f"{key}={_show(actual[key])} ({started}: {_show(expected[key])})")
    return Verdict(CUSTOM if differences else started, started, tuple(differences))


def _show(value: Any) -> str:
    return "null" if value is None else str(value)
