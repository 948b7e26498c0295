"""Lazy models: the skeleton on the meta device, each decoder block's weights read when the block is processed.

`load_lazy` builds the model with accelerate's `init_empty_weights` (parameters on the meta device, buffers such
as the rotary tables real), then reads only the tensors outside the blocks (embeddings, final norm, head) from
the checkpoint's safetensors. A `BlockStore` then knows where each block's current weights are: in the
checkpoint until the block is first processed, afterwards in one safetensors file per block in a scratch
folder. `blockwise.block_on_device` asks the store for a block, and gives it back (written or not) when the
step is done, so host memory holds one block plus the non-block tensors, never the model.

The store is found from the model through `block_store(model)`, a weak registry rather than an attribute, so
that a deep copy does not silently share one scratch folder with the original (a lazy model is reloaded
instead of copied).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from .families import family_of

log = logging.getLogger("baseq")

_STORES: "weakref.WeakKeyDictionary[nn.Module, BlockStore]" = weakref.WeakKeyDictionary()

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def block_store(model: nn.Module) -> "BlockStore | None":
    """The store of a lazily loaded model, None for a model whose weights are all in memory."""
    return _STORES.get(model)


def checkpoint_tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a checkpoint folder (sharded with an index, or one file)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SAFETENSORS_SINGLE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"model.lazy=true reads safetensors, and {folder} has neither {SAFETENSORS_INDEX} nor "
                    f"{SAFETENSORS_SINGLE}; convert the checkpoint (save_pretrained writes safetensors) or set "
                    f"model.lazy=false")


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to call
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed multi-megabyte chunks in its heap once its
    mmap threshold has adapted to them, and interleaved small allocations pin them: without this, a pass over
    a lazy model's blocks kept every block's worth of freed memory (measured: +16 MiB per block in host RSS)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, each once: a quantizer shared by q/k/v appears under the first name only, and
    setting that name sets the shared module."""
    tensors = dict(module.named_parameters(remove_duplicate=True))
    tensors.update(module.named_buffers(remove_duplicate=True))
    return tensors


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, copied out of the files: safetensors' tensors can be views of the file's memory map,
    and one kept alive (the embedding) would keep every page read since resident in the process."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in wanted:
                out[name] = f.get_tensor(name).clone()
    return out


class BlockStore:
    """Each block's weights outside memory: the checkpoint's tensors (`prefix`.<index>.<name>) until the block
    is first written back, then `scratch/block_<index>.safetensors`. Tensors a block has gained since (the
    quantizers' clips, biases, weight scales) are kept in memory with the block whenever they are real."""

    def __init__(self, files: dict[str, Path], prefix: str, dtype: torch.dtype, scratch_root: str | Path | None = None):
        self.files = files
        self.prefix = prefix
        self.dtype = dtype
        self.scratch = Path(tempfile.mkdtemp(prefix="baseq-blocks-", dir=scratch_root))
        self.written: dict[int, set[str]] = {}   # block index -> the names in its scratch file
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.scratch, True)

    def _scratch_file(self, index: int) -> Path:
        return self.scratch / f"block_{index}.safetensors"

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Put the block's weights on `device`: every meta tensor is read; real ones are moved."""
        tensors = _unique_tensors(block)
        missing = [name for name, t in tensors.items() if t.is_meta]
        if index in self.written:
            values = _read({name: self._scratch_file(index) for name in missing}, missing)
        else:
            keys = {name: f"{self.prefix}.{index}.{name}" for name in missing}
            absent = [key for key in keys.values() if key not in self.files]
            if absent:
                raise UserError(f"model.lazy=true: the checkpoint has no tensor {absent[0]} (its names do not "
                                f"follow the model's modules); set model.lazy=false")
            read = _read(self.files, list(keys.values()))
            values = {name: read[key].to(self.dtype) for name, key in keys.items()}
        for name, tensor in tensors.items():
            value = values.get(name, tensor)
            set_module_tensor_to_device(block, name, device, value=value)

    def offload(self, index: int, block: nn.Module, write: bool = True) -> None:
        """Give the block back: with `write`, its current tensors become its stored state; then every tensor
        that the store holds goes to the meta device."""
        tensors = _unique_tensors(block)
        if write:
            save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
                      str(self._scratch_file(index)))
            self.written[index] = set(tensors)
        for name, tensor in tensors.items():
            stored = (name in self.written[index] if index in self.written
                      else f"{self.prefix}.{index}.{name}" in self.files)
            if stored:
                set_module_tensor_to_device(block, name, "meta")
            elif tensor.device.type != "cpu":   # gained since the last write and not stored: keep it on the host
                set_module_tensor_to_device(block, name, "cpu")
        release_freed_host_memory()

    def materialize_all(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        """Every block onto `device`, and the model no longer lazy (for steps that need the whole model)."""
        for index, block in enumerate(blocks):
            self.load(index, block, device)
        _STORES.pop(model, None)
        self._cleanup()


def load_lazy(folder: Path, dtype: torch.dtype, scratch_root: str | Path | None = None) -> nn.Module:
    """The model with meta blocks: the non-block tensors read from `folder`'s safetensors, the blocks
    registered with a BlockStore."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = checkpoint_tensor_files(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    family = family_of(model)
    blocks_prefix = family.layers + "."
    outside = [name for name in files if not name.startswith(blocks_prefix)]
    for name, tensor in _read(files, outside).items():
        try:
            set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype))
        except (AttributeError, ValueError) as err:
            raise UserError(f"model.lazy=true: checkpoint tensor {name} has no place in the model ({err}); "
                            f"set model.lazy=false") from err
    head = model.get_submodule(family.lm_head)
    if head.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        head.weight = model.get_submodule(family.embed_tokens).weight
    unread = [name for name, t in _unique_tensors(model).items() if t.is_meta and not name.startswith(blocks_prefix)]
    if unread:
        raise UserError(f"model.lazy=true: the checkpoint in {folder} has no tensor for {unread[0]}; "
                        f"set model.lazy=false")
    _STORES[model] = BlockStore(files, family.layers, dtype, scratch_root)
    log.info("lazy model: %d blocks stay on disk until processed (scratch %s)", len(family.blocks(model)),
             _STORES[model].scratch)
    return model
