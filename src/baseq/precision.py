"""The float32 matmul precision (torch.set_float32_matmul_precision) of one stage, restored after it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """"highest": full fp32 matmuls; "high": TF32 tensor cores on a GPU that has them (10-bit mantissa
    products, fp32 accumulation); the previous setting is restored after. Also a decorator."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
