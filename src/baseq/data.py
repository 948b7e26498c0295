"""Evaluation and calibration text: WikiText-2 from the Hugging Face hub, or from a local data root
(`data_root=PATH` or BASEQ_DATA_ROOT) laid out as <root>/wikitext2/wiki.test.raw."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

WIKITEXT_TEST = "wikitext2/wiki.test.raw"
# Only a 1 MB prefix of WikiText-2 train exists offline; it is good enough for calibration and is recorded
# as such in every run that uses it.
WIKITEXT_TRAIN_CANDIDATES = ("wikitext2/wiki.train.raw", "wikitext2/partial_unverified/wikitext2_train_prefix_1MB.txt")


# Searched, in order, when neither data_root nor BASEQ_DATA_ROOT is set: a data/ folder in the checkout, and
# a shared/data folder beside it (how offline workplaces mount the copies). Otherwise the hub is used.
_REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOTS = (_REPO / "data", _REPO.parent / "shared" / "data")


def resolve_data_root(data_root: str | None) -> Path | None:
    root = data_root or os.environ.get("BASEQ_DATA_ROOT")
    if not root:
        return next((p for p in DEFAULT_DATA_ROOTS if (p / WIKITEXT_TEST).is_file()), None)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data_root {path} is not a directory; point data_root (or BASEQ_DATA_ROOT) at the "
                        f"folder that holds wikitext2/, or unset it to use the Hugging Face hub")
    return path


def _hub_rows(split: str) -> list[str]:
    try:
        import datasets
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except ImportError as err:
        raise UserError("loading WikiText-2 from the hub needs the `datasets` package (pip install datasets), "
                        "or set data_root to a local copy") from err
    except Exception as err:  # network, offline mode, missing cache
        raise UserError(f"could not load wikitext-2-raw-v1 {split} from the Hugging Face hub ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}); set data_root to a local copy") from err


def raw_file_rows(path: Path) -> list[str]:
    """Rows as the hub dataset stores them: one per line with its newline; lines holding a single
    space (the raw file's blank lines) are empty rows."""
    rows = []
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            rows.append("" if line.strip() == "" else line)
    return rows


def wikitext2_file(split: str, root: Path) -> Path:
    """The local WikiText-2 file of `split` under data root `root` (the first candidate that exists)."""
    candidates = (WIKITEXT_TEST,) if split == "test" else WIKITEXT_TRAIN_CANDIDATES
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    raise UserError(f"no WikiText-2 {split} file under {root} (looked for {', '.join(candidates)}); "
                    f"fix data_root or unset it to use the hub")


def wikitext2_text(split: str, data_root: str | None) -> tuple[str, str]:
    """("\\n\\n".join(rows), source description)."""
    root = resolve_data_root(data_root)
    if root is None:
        return "\n\n".join(_hub_rows(split)), f"hub:wikitext-2-raw-v1/{split}"
    path = wikitext2_file(split, root)
    return "\n\n".join(raw_file_rows(path)), f"local:{path}"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def perplexity_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen]; the tail shorter than seqlen is dropped (GPTQ protocol)."""
    n = token_ids.numel() // seqlen
    if n == 0:
        raise UserError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[: n * seqlen].reshape(n, seqlen)


def calibration_samples(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (GPTQ's sampling), reproducible under seed."""
    if token_ids.numel() <= seqlen:
        raise UserError(f"calibration text has {token_ids.numel()} tokens, not enough for calib.seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen - 1, (nsamples,), generator=gen)
    return torch.stack([token_ids[s: s + seqlen] for s in starts.tolist()])


def train_bpe_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE trained on `text` (a second or so for a small vocabulary): random-weight models (tests,
    scale benchmarks) get a real tokenizer without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
