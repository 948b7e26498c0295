"""Save a quantized model and load it back without quantizing again (save_quantized / load_quantized).

A folder holds:
    model.safetensors   every tensor of the model's state_dict: weights (already fake-quantized), weight
                        scales, the quantizers' clips, biases and scales (each shared tensor once)
    manifest.json       how to rebuild the module structure before loading those tensors: the quantizer
                        arguments, and for every baseq module (QuantLinear, the activation/KV quantizers,
                        the attention quantizer) its class, its plain attributes (bits, online Hadamard and
                        R3 flags, ...) and which parameters/buffers it holds, with shape and dtype
    config.json, tokenizer files   the Hugging Face model config and the tokenizer

No pickle anywhere. Loading builds the model from its config, attaches the quantizers as a method does,
then makes every baseq module match the manifest (attributes set; parameters and buffers created,
removed or resized; a parameter can become a buffer and back), and loads the tensors with
load_state_dict(strict=True). The manifest is written by walking the module tree, not from a list of
attribute names, so it keeps working when a quantizer's parametrisation changes (a new optional
parameter, a per-head clip): whatever tensors a module holds are recorded and recreated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import UserError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
PLAIN_TYPES = (bool, int, float, str, type(None))


def _is_baseq_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("baseq.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_manifest(model: nn.Module) -> dict[str, dict]:
    """{qualified name: {class, attributes, tensors}} for every baseq module of the model. A module
    shared by several parents (the q/k/v quantizer) is listed under its first name only."""
    entries = {}
    for name, module in model.named_modules():   # named_modules lists a shared module once
        if not _is_baseq_module(module):
            continue
        attributes = {k: v for k, v in vars(module).items()
                      if not k.startswith("_") and k != "training" and isinstance(v, PLAIN_TYPES)}
        tensors: dict[str, Any] = {}
        for kind, slots in (("parameter", module._parameters), ("buffer", module._buffers)):
            for key, tensor in slots.items():
                if kind == "buffer" and key in module._non_persistent_buffers_set:
                    continue
                tensors[key] = {"kind": kind, "shape": None, "dtype": None} if tensor is None else \
                    {"kind": kind, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        entries[name] = {"class": type(module).__name__, "attributes": attributes, "tensors": tensors}
    return entries


def _deduplicated_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state_dict with each shared tensor once (safetensors stores no aliases), and {alias: kept name}."""
    state, aliases, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        state[key] = tensor.detach().contiguous()
    return state, aliases


def save_quantized_model(model: nn.Module, tokenizer, folder: str | Path, method: DictConfig, quant: DictConfig,
                         model_cfg: DictConfig, info: dict | None = None) -> Path:
    """Write the quantized model to `folder` (see the module docstring); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, aliases = _deduplicated_state(model)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": _dtype_name(next(model.parameters()).dtype),
        "method": OmegaConf.to_container(method, resolve=True, enum_to_str=True),
        "quant": OmegaConf.to_container(quant, resolve=True, enum_to_str=True),
        "model": OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True),
        "aliases": aliases,
        "modules": module_manifest(model),
        **(info or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"load_quantized={folder} holds no {MANIFEST}; give the folder a save_quantized=true run "
                        f"wrote (its record names it under quantized_model)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"load_quantized={folder} has format version {manifest.get('format_version')}, this baseq "
                        f"reads {FORMAT_VERSION}; quantize again with save_quantized=true")
    return manifest


def _match_tensor_slots(module: nn.Module, name: str, tensors: dict[str, dict]) -> None:
    """Give `module` exactly the parameters/buffers the manifest lists, with their shapes and dtypes; the
    values come from load_state_dict afterwards."""
    for key in list(module._parameters) + [b for b in module._buffers if b not in module._non_persistent_buffers_set]:
        if key not in tensors:
            raise UserError(f"the saved {name} has no {key!r}, which this baseq's {type(module).__name__} has; "
                            f"quantize again with this code version")
    for key, spec in tensors.items():
        module._parameters.pop(key, None)
        module._buffers.pop(key, None)
        if key in vars(module):
            delattr(module, key)
        if spec["shape"] is None:   # an optional tensor this module does not have (e.g. no bias)
            if spec["kind"] == "parameter":
                module.register_parameter(key, None)
            else:
                module.register_buffer(key, None)
            continue
        empty = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        if spec["kind"] == "parameter":
            module.register_parameter(key, nn.Parameter(empty, requires_grad=False))
        else:
            module.register_buffer(key, empty)


def load_quantized_model(folder: str | Path):
    """(model on the host, tokenizer, family, manifest) of a folder written by save_quantized_model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models.families import family_of
    from .quantize import attach_quantizers

    folder = Path(folder)
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"])).eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder)
    family = family_of(model)
    method, quant = manifest["method"], manifest["quant"]
    attach_quantizers(model, family, quant["a_bits"], quant["kv_bits"], method["act_clip_ratio"],
                      method["kv_clip_ratio"], learn_clip=bool(method.get("learn_clip", False)))
    built = {name for name, module in model.named_modules() if _is_baseq_module(module)}
    saved = manifest["modules"]
    if built != set(saved):
        extra, missing = sorted(built - set(saved)), sorted(set(saved) - built)
        raise UserError(f"load_quantized={folder}: the saved model's quantizer modules differ from what this baseq "
                        f"builds (saved only: {missing[:3]}, built only: {extra[:3]}); quantize again with this code")
    for name, entry in saved.items():
        module = model.get_submodule(name)
        if type(module).__name__ != entry["class"]:
            raise UserError(f"load_quantized={folder}: {name} was a {entry['class']}, this baseq builds a "
                            f"{type(module).__name__}; quantize again with this code")
        for key, value in entry["attributes"].items():
            setattr(module, key, value)
        _match_tensor_slots(module, name, entry["tensors"])
    state = load_file(folder / WEIGHTS)
    for alias, kept in manifest["aliases"].items():
        state[alias] = state[kept]
    model.load_state_dict(state, strict=True)
    return model, tokenizer, family, manifest
