"""Triton kernels for real W4A4 inference (imported as `baseq_kernels`, from kernels/baseq_kernels/). The import
name avoids the unrelated `kernels` package on PyPI, and kernels/ has no __init__.py so that running from the
checkout never finds that folder as `kernels` (transformers probes for it; see tests/test_packaging.py).

Data layout shared by the kernels (the contract `baseq.runtime` builds on):

* activation codes: int8 [M, Kp], the per-token asymmetric 4-bit code minus 8 (so -8..7), one per byte;
  Kp = K rounded up to PACK_GROUP, padded with 0. Per token: fp32 `scale` and `offset = scale * (8 - zero)`,
  so that the dequantized value (code + 8 - zero) * scale equals scale * stored + offset.
* weights: per-output-channel symmetric int4 codes (-8..7), packed two per byte in groups of PACK_GROUP
  along K: byte j of a group holds k = j in its low nibble and k = j + PACK_GROUP/2 in its high nibble, so
  a tile unpacks into two K-halves with two shifts and no shuffle.
* KV cache: per token and head, asymmetric 4-bit codes of (x - bias), packed two per byte along head_dim
  (even index low nibble), with fp32 scale and zero point; the clip ratio is one for the layer or one per head.
"""

from .activation import OnlineHadamard, quantize_activations
from .common import PACK_GROUP, interpreting
from .gemm import pack_int4, unpack_int4_codes, unpack_int4_reference, w4a4_matmul
from .kv_cache import dequantize_kv, kv_cache_round_trip, quantize_kv, rotate_heads

__all__ = ["PACK_GROUP", "interpreting", "OnlineHadamard", "quantize_activations", "pack_int4", "unpack_int4_codes",
           "unpack_int4_reference", "w4a4_matmul", "quantize_kv", "dequantize_kv", "kv_cache_round_trip",
           "rotate_heads"]
