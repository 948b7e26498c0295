"""Plan a calibration run before making it: the predicted peak device memory and peak host memory, and (from
a measured run record) the projected calibration time. No weights are read or downloaded.

    python -m baseq.planning model=llama-2-70b method=baseq
    python -m baseq.planning model=llama-2-70b --from-record experiments/results/.../runs/<run>.json
    python -m baseq.planning model=local model.path=/models/llama --json plan.json
    python -m baseq.planning model=local model.path=x --shape hidden_size=4096,intermediate_size=11008,...

The arguments are run.py's Hydra overrides; without a device= override the plan is for device=cuda (a GPU
run planned on any machine). The model's shape comes from --shape, else from a local folder's config.json,
else from the presets' table (baseq.model_shapes).

Every number below is a formula of the shape and the composed config, one named term at a time; each
term's docstring says which code path holds that memory. Memory is not summed over the whole run: a run
goes through phases (rotation, capturing the first block's inputs, forward passes over the calibration set,
training steps, GPTQ, evaluation), the terms of one phase are alive together, and the peak is the largest
phase. Counted are tensors, not the CUDA caching allocator's slack, the CUDA context, or the Python/torch
runtime's own host memory (a few GiB).

Checked on an H200 (torch 2.11, compiled training step), planned vs measured peak device memory in GiB:
Qwen2.5-Coder-0.5B (GGUF, fp32) BASE-Q, full protocol, 7.84 vs 7.88 (its session-4 record; with
method.train_step=eager 8.59 vs 8.54), QuaRot quantize 4.57 vs 4.73, perplexity 4.67 vs 4.75; SmolLM2-135M
BASE-Q 4.38 vs 4.57, QuaRot 2.47 vs 2.53; phase by phase on Qwen2.5-0.5B's shape with 16 windows
(experiments/planning_probe.py) within 0.2 GiB, GPTQ 3.93 vs 3.97. Not measured: larger shapes, 16-bit
models under BASE-Q, host memory. Those checks ran the code before BASE-Q and QuaRot's GPTQ dropped their
reference to block 0's inputs (one [nsamples, seqlen, hidden] tensor in the load dtype less from the second
block on: 0.94 GiB for Qwen2.5-0.5B in fp32); the terms follow the new code, which no GPU has measured yet.
Time: a linear FLOP scaling of a measured block; on the same shape it
matched stage 2 and the block passes, while stage 1 and GPTQ carry fixed per-block costs it scales too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError
from .model_shapes import MODEL_SHAPES

GIB = 2**30
FP32 = 4
FP64 = 8
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# methods whose quantize() calls methods.quarot.apply_rotations, which unties the embedding and the head
ROTATING_ALGORITHMS = ("quarot", "baseq")
# methods that calibrate nothing: only evaluation touches the device
NO_CALIBRATION_ALGORITHMS = ("fp",)


# --------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """What the memory and FLOP formulas need of a decoder (Llama/Qwen2 layout: models.families)."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool = False
    checkpoint_dtype: str | None = None   # as config.json declares it; None: not declared
    head_dim: int | None = None           # None: hidden_size // num_attention_heads
    attention_bias: bool = False          # q/k/v biases (Qwen2)
    wikitext2_windows: int | None = None  # 2048-token WikiText-2 test windows, where a record measured them
    source: str = ""                      # where the numbers come from

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of the seven linears of a block."""
        d, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.dim_per_head, self.num_key_value_heads * self.dim_per_head
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}

    def group_inputs(self) -> list[tuple[tuple[str, ...], int]]:
        """ModelFamily.sequential_groups with each group's input width (its Hessian is in x in)."""
        heads_width = self.num_attention_heads * self.dim_per_head
        return [(("q_proj", "k_proj", "v_proj"), self.hidden_size), (("o_proj",), heads_width),
                (("gate_proj", "up_proj"), self.hidden_size), (("down_proj",), self.intermediate_size)]

    def linear_parameter_count(self) -> int:
        return sum(out * inp for out, inp in self.linear_shapes().values())

    def block_parameter_count(self) -> int:
        """Every parameter of one decoder layer: the seven linears, Qwen2's q/k/v biases, the two RMSNorms."""
        shapes = self.linear_shapes()
        biases = shapes["q_proj"][0] + shapes["k_proj"][0] + shapes["v_proj"][0] if self.attention_bias else 0
        return self.linear_parameter_count() + biases + 2 * self.hidden_size

    def non_block_parameter_count(self, head_untied: bool) -> int:
        """Embedding, final norm, and the head when it has a weight of its own."""
        embeddings = self.vocab_size * self.hidden_size
        return embeddings * (2 if head_untied else 1) + self.hidden_size

    def forward_flops_per_token(self, seqlen: int) -> int:
        """Matmul FLOPs of one token through one block: 2 per weight of the linears, plus q.k and p.v over
        the whole window (2 * seqlen * heads * head_dim each)."""
        attention = 4 * seqlen * self.num_attention_heads * self.dim_per_head
        return 2 * self.linear_parameter_count() + attention


SHAPE_KEYS = {f.name: f.type for f in fields(ModelShape) if f.name != "source"}
REQUIRED_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                       "vocab_size")


def parse_shape_options(options: list[str]) -> dict[str, Any]:
    """--shape hidden_size=4096,intermediate_size=11008 (repeatable) -> {key: value}."""
    values: dict[str, Any] = {}
    for option in options:
        for item in filter(None, (part.strip() for part in option.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or key not in SHAPE_KEYS:
                raise UserError(f"--shape {item!r}: give KEY=VALUE with KEY one of {', '.join(SHAPE_KEYS)}")
            if key in ("tie_word_embeddings", "attention_bias"):
                if raw.lower() not in ("true", "false"):
                    raise UserError(f"--shape {key}={raw}: use true or false")
                values[key] = raw.lower() == "true"
            elif key == "checkpoint_dtype":
                if raw not in DTYPE_BYTES:
                    raise UserError(f"--shape checkpoint_dtype={raw}: use one of {', '.join(DTYPE_BYTES)}")
                values[key] = raw
            else:
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise UserError(f"--shape {key}={raw}: expected an integer") from None
                if values[key] < 1:
                    raise UserError(f"--shape {key}={raw}: must be >= 1")
    return values


def _preset_shape(name: str, path: str) -> tuple[dict, str] | None:
    for preset, entry in MODEL_SHAPES.items():
        if name == preset or path == entry["hub_id"]:
            values = {k: v for k, v in entry.items() if k != "hub_id"}
            return values, f"the built-in table (baseq/model_shapes.py: {preset}, {entry['hub_id']})"
    return None


def _folder_shape(path: str) -> tuple[dict, str] | None:
    """A local Hugging Face folder's config.json, through transformers.AutoConfig (nothing downloaded)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    declared = config.to_dict()
    dtype = declared.get("dtype") or declared.get("torch_dtype")
    values = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "num_attention_heads": config.num_attention_heads,
              "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
              "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
              "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
              "checkpoint_dtype": dtype if dtype in DTYPE_BYTES else None,
              "head_dim": getattr(config, "head_dim", None),
              "attention_bias": config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))}
    return values, f"{folder / 'config.json'}"


def model_shape(model_cfg: dict, shape_options: dict[str, Any] | None = None) -> ModelShape:
    """The model's shape: a local folder's config.json, else the presets' table, with --shape on top; or
    --shape alone. model.num_layers (keep the first N blocks) is applied."""
    shape_options = shape_options or {}
    path, name = str(model_cfg.get("path") or ""), str(model_cfg.get("name") or "")
    if path == "???":
        raise UserError(f"model={name} needs model.path=... (a local folder, a .gguf file or a hub id)")
    found = _folder_shape(path) if path else None
    found = found or _preset_shape(name, path)
    if found is None:
        missing = [k for k in REQUIRED_SHAPE_KEYS if k not in shape_options]
        if missing:
            raise UserError(f"no shape known for model {name!r} (path {path!r}): it is no built-in preset and no "
                            f"local folder with a config.json; pass --shape {','.join(f'{k}=...' for k in missing)}")
        values, source = {}, "--shape"
    else:
        values, source = found
        if shape_options:
            source += " with --shape " + ",".join(f"{k}={v}" for k, v in shape_options.items())
    values = {**values, **shape_options}
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    num_layers = model_cfg.get("num_layers")
    if num_layers is not None:
        if not 1 <= num_layers <= values["num_hidden_layers"]:
            raise UserError(f"model.num_layers={num_layers} but the model has {values['num_hidden_layers']} "
                            f"blocks; use 1..{values['num_hidden_layers']}")
        values["num_hidden_layers"] = num_layers
        source += f", first {num_layers} blocks (model.num_layers)"
    return ModelShape(**values, source=source)


def load_dtype(model_cfg: dict, device_type: str, shape: ModelShape) -> tuple[str, str]:
    """(dtype name, why): the rule of models.loading.choose_dtype, from the declared dtype instead of the
    checkpoint."""
    chosen = str(model_cfg.get("dtype") or "auto")
    if chosen != "auto":
        return chosen, "model.dtype"
    if str(model_cfg.get("path") or "").endswith(".gguf"):
        return "float32", "a GGUF file loads in float32"
    if device_type == "cpu":
        return "float32", "dtype=auto on a CPU"
    if shape.checkpoint_dtype:
        return shape.checkpoint_dtype, "the checkpoint's declared dtype"
    return "float16", "the checkpoint declares no dtype: choose_dtype falls back to float16"


# ------------------------------------------------------------------------------------------ the terms


@dataclass
class Term:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class Phase:
    name: str
    code: str             # the code path the phase is
    terms: list[Term] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.terms)


def block_weights(shape: ModelShape, dtype_bytes: int) -> int:
    """One decoder block's parameters on the device. blockwise.iterate_blocks moves one block at a time;
    BASE-Q then calls block.float(), so it trains and runs GPTQ on an fp32 block (dtype_bytes=4) whatever
    the load dtype; QuaRot and RTN keep the load dtype."""
    return shape.block_parameter_count() * dtype_bytes


def non_block_weights(shape: ModelShape, dtype_bytes: int, head_untied: bool) -> int:
    """Embedding, final norm and head, in the load dtype. blockwise.capture_block_inputs moves them to the
    device and leaves them there for the rest of the calibration; rotation.untie_embeddings (QuaRot, BASE-Q)
    gives a tied head its own copy first."""
    return shape.non_block_parameter_count(head_untied) * dtype_bytes


def baseq_trained_parameters(shape: ModelShape, m: dict) -> dict[str, dict[str, int]]:
    """{stage: {group: parameter count}}: what methods.baseq.steps.train_stage1/train_stage2 hand train_block
    for one block, group by group.
    stage 1: the paired scales of equivalence.BlockTransforms (v->o: kv_heads * head_dim, up->down:
      intermediate), R_v (HeadRotations: one head_dim x head_dim matrix per KV head, or one), and the
      learned clips (one per activation quantizer, four per block; one per KV quantizer, or one per KV head).
    stage 2: the activation biases and unpaired scales of the four activation quantizers (their input widths:
      hidden, heads * head_dim, hidden, intermediate), the K/V biases (kv_heads x head_dim each) with
      kv_bias, and the same clips."""
    hd, kv = shape.dim_per_head, shape.num_key_value_heads
    quantizer_widths = [width for _, width in shape.group_inputs()]
    clips = (len(quantizer_widths) + 2 * (kv if m.get("kv_clip_per_head") else 1)) if m.get("learn_clip") else 0
    stages: dict[str, dict[str, int]] = {}
    if (m.get("paired_scale") or m.get("learn_rv") or m.get("learn_clip")) and m.get("stage1_epochs", 0) > 0:
        stages["stage1"] = {
            "scale": (kv * hd + shape.intermediate_size) if m.get("paired_scale") else 0,
            "rotation": ((kv if m.get("rv_per_kv_head") else 1) * hd * hd) if m.get("learn_rv") else 0,
            "clip": clips}
    if (m.get("bias") or m.get("unpaired_scale") or m.get("learn_clip") or m.get("kv_bias")) \
            and m.get("stage2_epochs", 0) > 0:
        stages["stage2"] = {
            "bias": (sum(quantizer_widths) if m.get("bias") else 0) + (2 * kv * hd if m.get("kv_bias") else 0),
            "scale": sum(quantizer_widths) if m.get("unpaired_scale") else 0,
            "clip": clips}
    return stages


def trained_parameters_with_adam(count: int) -> int:
    """training.train_block: the trained tensors in fp32, their gradients, and AdamW's exp_avg and
    exp_avg_sq: 16 bytes a parameter. Only these get gradients: every other block parameter is frozen."""
    return count * (FP32 + FP32 + 2 * FP32)


def attention_scores(shape: ModelShape, batch_size: int, seqlen: int, compute_bytes: int) -> int:
    """SDPA's [batch, heads, seqlen, seqlen] scores and probabilities, where they exist. transformers'
    sdpa_attention_forward asks for enable_gqa when the model has fewer KV heads than heads (and no mask is
    needed); in fp32 no fused kernel takes that (flash has no fp32, memory-efficient no GQA), so torch runs
    its math kernel, which holds both matrices. A 16-bit block (flash) or one without grouped KV heads
    (memory-efficient, fp32) holds none. Seen on an H200 for Qwen2.5-0.5B's shape in fp32 (experiments/
    planning_probe.py); the rest of the rule is read from the code, not measured."""
    grouped = shape.num_key_value_heads < shape.num_attention_heads
    if compute_bytes != FP32 or not grouped:
        return 0
    return 2 * batch_size * shape.num_attention_heads * seqlen * seqlen * FP32


def forward_micro_batch_workspace(shape: ModelShape, batch_size: int, seqlen: int, compute_bytes: int) -> int:
    """One no-grad forward of a micro-batch (blockwise.block_forward): attention_scores, plus the MLP's
    largest moment, two intermediate-sized and two hidden-sized values per token. For Qwen2.5-0.5B's shape
    (fp32, 4 x 2048 tokens) this gives 2.10 GiB; the probe measured about 2.1 GiB."""
    mlp = batch_size * seqlen * (2 * shape.intermediate_size + 2 * shape.hidden_size) * compute_bytes
    return attention_scores(shape, batch_size, seqlen, compute_bytes) + mlp


# What a training step keeps per token besides attention_scores, in fp32 values. The block's weights are
# frozen, so no matmul input is kept for a weight gradient; what remains is what the elementwise backward
# needs: the MLP's gate, up and SiLU (intermediate-sized), the quantizers' inputs for the clip, bias and scale
# gradients, and q/k/v. Compiled (torch.compile, the default on CUDA): fitted to one measurement, the probe's
# 2.3 GiB for Qwen2.5-0.5B's shape at 4 x 2048 tokens. Eager: fitted to the H200 record of the same model
# with method.train_step=eager (8.54 GiB peak). Rough outside those shapes.
TRAIN_FLOATS_PER_TOKEN = {
    "compiled": {"intermediate": 3, "hidden": 2, "qkv": 1},
    "eager": {"intermediate": 12, "hidden": 8, "qkv": 4},
}


def training_micro_batch_workspace(shape: ModelShape, batch_size: int, seqlen: int, train_step: str) -> int:
    """One step of training.train_block on a micro-batch of train_batch_size windows (fp32 block): the
    attention matrices autograd keeps (attention_scores: the probabilities and, in the backward, their
    gradient), and TRAIN_FLOATS_PER_TOKEN for the rest."""
    qkv = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.dim_per_head
    per = TRAIN_FLOATS_PER_TOKEN[train_step]
    per_token = (per["intermediate"] * shape.intermediate_size + per["hidden"] * shape.hidden_size
                 + per["qkv"] * qkv)
    return attention_scores(shape, batch_size, seqlen, FP32) + batch_size * seqlen * per_token * FP32


# Stage 1 recomputes weights every step: RTN fake quantization (quant.RTNWeightQuantizer, with STE) of all
# seven linears, and the paired-scale / R_v parametrizations of v, o, up and down, whose outputs and
# gradients autograd keeps. In weight-sized fp32 tensors: per linear weight, and again per transformed one.
# Counted from the code, not measured (the probe's Qwen2.5-0.5B block is too small to show it).
STAGE1_COPIES_PER_WEIGHT = 1
STAGE1_COPIES_PER_TRANSFORMED_WEIGHT = 2


def stage1_weight_workspace(shape: ModelShape, m: dict) -> int:
    """Stage 1 only (methods.baseq.steps.train_stage1): the fake-quantized weights of every linear, saved for the
    backward, and the transformed v/o/up/down weights of equivalence.BlockTransforms with their gradients."""
    shapes = shape.linear_shapes()
    transformed = 0
    if m.get("paired_scale") or m.get("learn_rv"):
        transformed += shapes["v_proj"][0] * shapes["v_proj"][1] + shapes["o_proj"][0] * shapes["o_proj"][1]
    if m.get("paired_scale"):
        transformed += shapes["up_proj"][0] * shapes["up_proj"][1] + shapes["down_proj"][0] * shapes["down_proj"][1]
    return (STAGE1_COPIES_PER_WEIGHT * shape.linear_parameter_count()
            + STAGE1_COPIES_PER_TRANSFORMED_WEIGHT * transformed) * FP32


def bias_means_fp64_copy(shape: ModelShape, batch_size: int, seqlen: int) -> int:
    """methods.baseq.steps.input_channel_means: each quantizer input of a micro-batch is summed in float64; the
    widest (down_proj's, intermediate-sized) copy is the largest."""
    return batch_size * seqlen * _largest_input(shape) * FP64


def _largest_input(shape: ModelShape) -> int:
    return max(width for _, width in shape.group_inputs())


def gptq_hessians(shape: ModelShape) -> int:
    """quantize.gptq_block: one gptq.HessianAccumulator, [in, in] fp32, for the linear group being
    quantized (the groups go one after another; the largest input is down_proj's, the intermediate size)."""
    return _largest_input(shape) ** 2 * FP32


def hessian_update_workspace(shape: ModelShape, batch_size: int, seqlen: int) -> int:
    """gptq.HessianAccumulator.add for one micro-batch of the widest group input: its scaled fp32 copy and
    the product x^T x before it is added to H."""
    width = _largest_input(shape)
    return (batch_size * seqlen * width + width ** 2) * FP32


def gptq_factorization_workspace(shape: ModelShape) -> int:
    """gptq.gptq_quantize: next to the accumulated Hessian, three more [in, in] fp32 matrices at once: the
    dampened copy h, and the Cholesky factor and inverse on the way to H^-1's upper factor (or the identity
    temporary of the dampening)."""
    return 3 * _largest_input(shape) ** 2 * FP32


def gptq_weight_workspace(shape: ModelShape, clip_search: str) -> int:
    """gptq.gptq_quantize for the largest linear: the weight's fp32 working copy and the quantized result,
    plus the weight-sized temporaries of the clip search (quant.mse_weight_scale: about three alive at once;
    plain max scaling: one)."""
    largest = max(out * inp for out, inp in shape.linear_shapes().values())
    temporaries = 3 if clip_search == "mse" else 1
    return (2 + temporaries) * largest * FP32


def rtn_weight_workspace(shape: ModelShape, clip_search: str) -> int:
    """quantize.quantize_block_rtn for the largest linear: its fp32 copy, the fake-quantized result and the
    clip search's temporaries (as gptq_weight_workspace)."""
    return gptq_weight_workspace(shape, clip_search)


def rotation_fp64_copies(shape: ModelShape) -> int:
    """rotation.rotate_residual: the embedding (then the head) in float64 on the device and its product
    with R1, plus R1 itself (hidden x hidden, float64). Nothing else is on the device then."""
    return (2 * shape.vocab_size * shape.hidden_size + shape.hidden_size ** 2) * FP64


def rotation_block_fp64_copies(shape: ModelShape) -> int:
    """rotation.fuse_norms_into_linears / rotate_block_residual, quantize.add_online_down_hadamard: the
    largest linear of the block on the device in float64 and its rotated product, plus R1."""
    largest = max(out * inp for out, inp in shape.linear_shapes().values())
    return (2 * largest + shape.hidden_size ** 2) * FP64


def eval_model_weights(shape: ModelShape, dtype_bytes: int, head_untied: bool) -> int:
    """evaluation.perplexity.window_nlls: model.to(device), the whole model in its load dtype."""
    return (shape.num_hidden_layers * shape.block_parameter_count()
            + shape.non_block_parameter_count(head_untied)) * dtype_bytes


def eval_logits(shape: ModelShape, dtype_bytes: int, batch_size: int, seqlen: int) -> int:
    """Perplexity's logits for one batch of windows: the head's output [batch, seqlen, vocab] in the load
    dtype, its fp32 copy for cross_entropy (none when already fp32), and cross_entropy's fp32 log-softmax."""
    values = batch_size * seqlen * shape.vocab_size
    fp32_copy = FP32 if dtype_bytes != FP32 else 0
    return values * (dtype_bytes + fp32_copy + FP32)


def eval_hidden_states(shape: ModelShape, dtype_bytes: int, windows: int, seqlen: int) -> int:
    """evaluation.perplexity.window_nlls_blockwise: every window's hidden states [windows, seqlen, hidden]
    in the load dtype stay on the device while the blocks stream past."""
    return windows * seqlen * shape.hidden_size * dtype_bytes


def baseq_calibration_activations(moment: str, dtype_bytes: int, n: int, seqlen: int, hidden: int) -> list[Term]:
    """The [nsamples, seqlen, hidden] tensors of methods.baseq.steps.quantize that stay alive through a moment of
    the block loop, from the second block on (the first has no previous block's outputs). moment: "stage"
    (training steps, and the passes inside the stages), "gptq", or "loop pass" (the passes of the loop
    itself: y_fp at its top, the final MSE and y_q at its end).
    The loop keeps x_fp and x_q (the fp and quantized models' block inputs) in the load dtype, the fp block's
    outputs y_fp in fp32 and, until the next block overwrites it, y_q (fp32). Training, GPTQ and the passes
    read x_fp/x_q themselves and cast a micro-batch at a time to the fp32 block, so no fp32 copy of the inputs
    exists; train_x is a view, which keeps the previous x_q alive through the next block's first pass. With an
    fp32 model y_fp/y_q become the next x_fp/x_q without a copy."""
    full = n * seqlen * hidden
    if dtype_bytes == FP32:
        third = "y_fp" if moment != "loop pass" else "y_fp, or the previous x_q (train_x)"
        return [Term("x_fp", FP32 * full), Term("x_q", FP32 * full), Term(third, FP32 * full)]
    live = [Term("x_fp (load dtype)", dtype_bytes * full), Term("x_q (load dtype)", dtype_bytes * full),
            Term("y_fp (fp32)", FP32 * full), Term("y_q of the previous block (fp32)", FP32 * full)]
    if moment == "loop pass":
        live.append(Term("the previous x_q (train_x, load dtype)", dtype_bytes * full))
    return live


def _activation_term(terms: list[Term]) -> Term:
    return Term("calibration_activations", sum(t.bytes for t in terms), ", ".join(t.name for t in terms))


def pass_phases(label: str, code: str, resident: list[Term], outputs: int, workspace: Term,
                extra: list[Term] | None = None) -> list[Phase]:
    """A forward pass over a set (blockwise.run_block) peaks either during its last micro-batch (the outputs
    collected so far, about all of them, plus the micro-batch's workspace) or when torch.cat joins them (the
    outputs twice): both moments are phases."""
    collected = Term("pass_outputs", outputs, "the micro-batches' outputs, before torch.cat")
    return [Phase(f"{label}: last micro-batch", code, [*resident, collected, workspace, *(extra or [])]),
            Phase(f"{label}: concatenation", code,
                  [*resident, collected, Term("pass_outputs_concatenated", outputs, "torch.cat's result")])]


# ------------------------------------------------------------------------------------------- phases


@dataclass
class RunFacts:
    """The config values the formulas read, flattened from the composed run config."""
    algorithm: str
    method_name: str
    method: dict
    quant: dict
    calib: dict
    eval_ppl: dict | None
    dtype: str
    dtype_bytes: int
    device_type: str

    @property
    def rotates(self) -> bool:
        return self.algorithm in ROTATING_ALGORITHMS

    @property
    def train_step(self) -> str:
        """method.train_step as methods.baseq.steps.train_step resolves it (auto: compiled on CUDA)."""
        step = self.method.get("train_step", "auto")
        return step if step != "auto" else ("compiled" if self.device_type == "cuda" else "eager")


def _gptq_phases(resident: list[Term], shape: ModelShape, clip_search: str, workspace: Term, batch_size: int,
                 seqlen: int) -> list[Phase]:
    """quantize.gptq_block: per group, forward passes that stop at the group's input and fill its Hessian,
    then gptq_quantize for each linear of the group."""
    hessian = Term("gptq_hessians", gptq_hessians(shape), "fp32")
    update = Term("hessian_update_workspace", hessian_update_workspace(shape, batch_size, seqlen), "fp32")
    return [Phase("GPTQ: Hessian passes", "quantize.gptq_block -> gptq.HessianAccumulator",
                  [*resident, hessian, workspace, update]),
            Phase("GPTQ: solve", "quantize.gptq_block -> gptq.gptq_quantize",
                  [*resident, hessian,
                   Term("gptq_factorization_workspace", gptq_factorization_workspace(shape), "fp32"),
                   Term("gptq_weight_workspace", gptq_weight_workspace(shape, clip_search), "fp32")])]


def calibration_phases(shape: ModelShape, facts: RunFacts) -> list[Phase]:
    """The device phases of the method's quantize() (evaluation apart)."""
    m, a = facts.method, facts.dtype_bytes
    if facts.algorithm in NO_CALIBRATION_ALGORITHMS or (facts.algorithm == "rtn" and facts.quant.get("w_bits", 16) >= 16):
        return []
    head_untied = facts.rotates or not shape.tie_word_embeddings
    n, seqlen, d = facts.calib["nsamples"], facts.calib["seqlen"], shape.hidden_size
    clip_search = facts.quant.get("w_clip_search", "mse")
    weights = m.get("weights", "rtn")
    non_block = Term("non_block_weights", non_block_weights(shape, a, head_untied), facts.dtype)
    phases: list[Phase] = []
    if facts.rotates:
        phases.append(Phase("rotation: embedding and head", "rotation.rotate_residual",
                            [Term("rotation_fp64_copies", rotation_fp64_copies(shape), "float64")]))
        phases.append(Phase("rotation: blocks", "rotation.fuse_norms_into_linears, rotate_block_residual",
                            [Term("block_weights", block_weights(shape, a), facts.dtype),
                             Term("rotation_block_fp64_copies", rotation_block_fp64_copies(shape), "float64")]))
    if facts.algorithm == "rtn" or (facts.algorithm == "quarot" and weights == "rtn"):
        phases.append(Phase("RTN weights", "quantize.quantize_block_rtn",
                            [Term("block_weights", block_weights(shape, a), facts.dtype),
                             Term("rtn_weight_workspace", rtn_weight_workspace(shape, clip_search), "fp32")]))
        return phases
    if facts.algorithm == "quarot":
        g = m.get("gptq", {})
        n_gptq = min(g.get("nsamples") or n, n)
        captured = n_gptq * seqlen * d * a
        batch = facts.calib.get("batch_size", 1)
        block = Term("block_weights", block_weights(shape, a), facts.dtype)
        # quantize_weights_gptq's `hidden`; the next block's inputs are counted by the passes
        resident = [non_block, block, Term("calibration_activations", captured, "hidden (load dtype)")]
        workspace = Term("forward_micro_batch_workspace", forward_micro_batch_workspace(shape, batch, seqlen, a),
                         f"{batch} x {seqlen} tokens, {facts.dtype}")
        phases.append(Phase("capture", "blockwise.capture_block_inputs",
                            [non_block, Term("calibration_activations", 2 * captured,
                                             "captured rows and their concatenation (load dtype)")]))
        phases += _gptq_phases(resident, shape, clip_search, workspace, batch, seqlen)
        phases += pass_phases("block passes", "blockwise.run_block (the next block's inputs)", resident, captured,
                              workspace)
        return phases
    if facts.algorithm != "baseq":
        raise UserError(f"no memory model for method.algorithm={facts.algorithm!r}; planned: fp, rtn, quarot, baseq")
    # BASE-Q (methods.baseq.steps.quantize): every block computes in fp32 (block.float())
    n_train = n - m.get("heldout_samples", 0)
    batch = m.get("train_batch_size", 1)
    block = Term("block_weights", block_weights(shape, FP32), "fp32 (block.float())")
    trained = baseq_trained_parameters(shape, m)
    forward = Term("forward_micro_batch_workspace", forward_micro_batch_workspace(shape, batch, seqlen, FP32),
                   f"{batch} x {seqlen} tokens, fp32")
    stage_resident = [non_block, block,
                      _activation_term(baseq_calibration_activations("stage", a, n, seqlen, d))]
    loop_resident = [non_block, block,
                     _activation_term(baseq_calibration_activations("loop pass", a, n, seqlen, d))]
    phases.append(Phase("capture", "blockwise.capture_block_inputs",
                        [non_block, Term("calibration_activations", 2 * n * seqlen * d * a,
                                         "captured rows and their concatenation (load dtype)")]))
    phases += pass_phases("block passes", "blockwise.run_block: y_fp, the final MSE, y_q", loop_resident,
                          n * seqlen * d * FP32, forward)
    if "stage2" in trained and (m.get("bias") or m.get("kv_bias")) and m.get("bias_init", "mean") == "mean":
        # only its last micro-batch: its concatenation is the loop passes' one, with fewer tensors around
        phases += pass_phases("stage 2 bias means", "methods.baseq.steps.input_channel_means", stage_resident,
                              n_train * seqlen * d * FP32, forward,
                              [Term("bias_means_fp64_copy", bias_means_fp64_copy(shape, batch, seqlen), "float64")])[:1]
    for stage, label in (("stage1", "stage 1 training steps"), ("stage2", "stage 2 training steps")):
        if stage not in trained:
            continue
        count = sum(trained[stage].values())
        terms = [*stage_resident,
                 Term("trained_parameters_with_adam", trained_parameters_with_adam(count),
                      f"{count:,} parameters (" + ", ".join(f"{k} {v:,}" for k, v in trained[stage].items()) + ")"),
                 Term("training_micro_batch_workspace",
                      training_micro_batch_workspace(shape, batch, seqlen, facts.train_step),
                      f"{batch} x {seqlen} tokens, fp32, {facts.train_step} step")]
        if stage == "stage1":
            terms.append(Term("stage1_weight_workspace", stage1_weight_workspace(shape, m), "fp32"))
        phases.append(Phase(label, f"methods.baseq.steps.train_{stage} -> training.train_block", terms))
    gptq_resident = [non_block, block,
                     _activation_term(baseq_calibration_activations("gptq", a, n, seqlen, d))]
    if weights == "gptq":
        phases += _gptq_phases(gptq_resident, shape, clip_search, forward, batch, seqlen)
    else:
        phases.append(Phase("RTN weights", "methods.baseq.steps.quantize_block_weights -> quantize.quantize_block_rtn",
                            [*gptq_resident,
                             Term("rtn_weight_workspace", rtn_weight_workspace(shape, clip_search), "fp32")]))
    return phases


def eval_phases(shape: ModelShape, facts: RunFacts, windows: int | None, zeroshot: bool) -> dict[str, Phase | None]:
    """{"eager": whole-model perplexity, "lazy": block-by-block perplexity (None: the window count is not
    known), "zeroshot": the zero-shot evaluation's weights}; None where the config has no such evaluation."""
    a, head_untied = facts.dtype_bytes, facts.rotates or not shape.tie_word_embeddings
    # lm-eval runs the whole model on the device, a lazy one too (pipeline.materialize reads its blocks first);
    # its batches are sized from the memory left free (evaluation/bounded_hflm.py), so only the weights count
    zeroshot_phase = Phase("eval_zeroshot (whole model)", "evaluation.zeroshot.evaluate_zeroshot",
                           [Term("eval_model_weights", eval_model_weights(shape, a, head_untied), facts.dtype)]) \
        if zeroshot else None
    if facts.eval_ppl is None:
        return {"eager": None, "lazy": None, "zeroshot": zeroshot_phase}
    seqlen, batch = facts.eval_ppl["seqlen"], facts.eval_ppl.get("batch_size", 1)
    logits = Term("eval_logits", eval_logits(shape, a, batch, seqlen), f"{batch} x {seqlen} x {shape.vocab_size}")
    eager = Phase("eval_ppl (whole model)", "evaluation.perplexity.window_nlls",
                  [Term("eval_model_weights", eval_model_weights(shape, a, head_untied), facts.dtype), logits])
    lazy = None
    if windows is not None:
        lazy = Phase("eval_ppl (block by block)", "evaluation.perplexity.window_nlls_blockwise",
                     [Term("non_block_weights", non_block_weights(shape, a, head_untied), facts.dtype),
                      Term("block_weights", block_weights(shape, a), facts.dtype),
                      Term("eval_hidden_states", eval_hidden_states(shape, a, windows, seqlen),
                           f"{windows} windows"), logits])
    return {"eager": eager, "lazy": lazy, "zeroshot": zeroshot_phase}


# --------------------------------------------------------------------------------------------- host


def host_rows(shape: ModelShape, facts: RunFacts, compare_facts: list[RunFacts],
              whole_model_steps: list[str]) -> dict[str, list[Term]]:
    """Peak host memory, two ways of holding the model.
    eager (models.loading.load_model): the whole model in host RAM in the load dtype; a rotating method
      unties a tied head (one more vocab x hidden). pipeline._run_stages runs each comparison method
      (compare_with) on copy.deepcopy(model) first: the original and one copy are alive together.
    lazy (model.lazy=true, models.lazy): the skeleton plus the non-block tensors, and one block at a time,
      read from the checkpoint (or the scratch folder) into host memory on its way to the device and written
      back through a host copy. A comparison reloads the lazy model instead of copying it: one more set of
      non-block tensors. Zero-shot, the kernels' perplexity and save_quantized need the whole model:
      pipeline.materialize reads every block into host memory first (whole_model_steps names them)."""
    a = facts.dtype_bytes

    def whole_model(rotates: bool) -> int:
        untied = rotates or not shape.tie_word_embeddings
        return (shape.num_hidden_layers * shape.block_parameter_count()
                + shape.non_block_parameter_count(untied)) * a

    loaded = whole_model(False)
    main_model = whole_model(facts.rotates)
    eager = [Term("model_weights", main_model, f"{shape.num_hidden_layers} blocks + embeddings, {facts.dtype}")]
    if compare_facts:
        copy_bytes = max(whole_model(c.rotates) for c in compare_facts)
        # while a comparison runs the original is as loaded (not yet untied by the main method)
        extra = max(0, loaded + copy_bytes - main_model)
        eager.append(Term("compare_with_copy", extra, "copy.deepcopy(model) for " + ", ".join(
            c.method_name for c in compare_facts)))
    head_untied = facts.rotates or not shape.tie_word_embeddings
    lazy = [Term("non_block_weights", non_block_weights(shape, a, head_untied), facts.dtype),
            Term("block_weights", block_weights(shape, a), f"one block in host memory, {facts.dtype}")]
    if compare_facts:
        lazy.append(Term("compare_with_reload", non_block_weights(shape, a, not shape.tie_word_embeddings),
                         "the comparison's own lazy model"))
    if whole_model_steps:
        lazy.append(Term("all_blocks_materialized", (shape.num_hidden_layers - 1) * block_weights(shape, a),
                         "pipeline.materialize for " + ", ".join(whole_model_steps)))
    return {"eager": eager, "lazy": lazy}


# --------------------------------------------------------------------------------------------- time


def _stage_flops(shape: ModelShape, m: dict, calib: dict, algorithm: str) -> dict[str, float]:
    """Matmul FLOPs of one block in each timed sub-stage of quantize (records' timings_s), from the code's
    passes over the calibration set. Forward+backward counts as three forwards."""
    n, seqlen = calib["nsamples"], calib["seqlen"]
    per_token = shape.forward_flops_per_token(seqlen)
    shapes = shape.linear_shapes()

    def gptq(tokens: int) -> float:
        # the Hessian passes stop at each group's input (quantize.gptq_block raises StopForward there)
        attention = 4 * seqlen * shape.num_attention_heads * shape.dim_per_head
        linear = {name: 2 * out * inp for name, (out, inp) in shapes.items()}
        qkv = linear["q_proj"] + linear["k_proj"] + linear["v_proj"]
        up_to_o, up_to_mlp = qkv + attention, qkv + attention + linear["o_proj"]
        up_to_down = up_to_mlp + linear["gate_proj"] + linear["up_proj"]
        passes = tokens * (up_to_o + up_to_mlp + up_to_down)
        hessian_products = sum(2 * tokens * width ** 2 for _, width in shape.group_inputs())
        block_size = m.get("gptq", {}).get("block_size", 128)
        # per linear: the Cholesky factorizations and inverse (~in^3), the lazy column updates (~out in^2)
        solves = sum(inp ** 3 + out * inp ** 2 + out * inp * block_size for out, inp in shapes.values())
        return passes + hessian_products + solves

    if algorithm == "baseq":
        n_train = n - m.get("heldout_samples", 0)
        n_gptq = min(m.get("gptq", {}).get("nsamples") or n_train, n_train)
        stage1 = stage2 = 0.0
        trained = baseq_trained_parameters(shape, m)
        if "stage1" in trained:   # the MSE before, then the epochs
            stage1 = (1 + 3 * m["stage1_epochs"]) * n_train * seqlen * per_token
        if "stage2" in trained:   # the bias means (when initialised from them), the MSE before, the epochs
            means = 1 if (m.get("bias") or m.get("kv_bias")) and m.get("bias_init", "mean") == "mean" else 0
            stage2 = (means + 1 + 3 * m["stage2_epochs"]) * n_train * seqlen * per_token
        weights = gptq(n_gptq * seqlen) if m.get("weights") == "gptq" else shape.linear_parameter_count()
        # outside the sub-stages, per block: y_fp (all windows), the final MSE on fp inputs (training and
        # held-out windows), y_q (all windows)
        other = 3 * n * seqlen * per_token
        return {"stage1": stage1, "gptq": weights, "stage2": stage2, "other": other}
    if algorithm == "quarot" and m.get("weights") == "gptq":
        n_gptq = min(m.get("gptq", {}).get("nsamples") or n, n)
        # GPTQ, then the pass that makes the next block's inputs
        return {"quantize": gptq(n_gptq * seqlen) + n_gptq * seqlen * per_token}
    if algorithm in ("quarot", "rtn"):
        # RTN: elementwise over the weights (the clip search); the weight count stands in for FLOPs
        return {"quantize": float(shape.linear_parameter_count())}
    raise UserError(f"no time model for method.algorithm={algorithm!r}")


def _record_blocks(record: dict, shape: ModelShape) -> int:
    reported = record.get("metrics", {}).get("method_report", {}).get("blocks")
    return len(reported) if reported else shape.num_hidden_layers


def project_calibration_time(record: dict, record_name: str, shape: ModelShape, facts: RunFacts) -> dict:
    """Seconds per block of each quantize sub-stage in the record (its timings_s over its number of blocks),
    times the ratio of the target's per-block matmul FLOPs to the record's, times the target's blocks."""
    config = record.get("config") or {}
    timings = record.get("timings_s") or {}
    if "quantize" not in timings:
        raise UserError(f"--from-record {record_name}: the record has no timings_s.quantize (its quantize stage "
                        f"did not finish); use a record of a run that got past quantize")
    if not all(k in config for k in ("model", "method", "calib")):
        raise UserError(f"--from-record {record_name}: the record has no config.model/method/calib")
    record_algorithm = config["method"].get("algorithm")
    if record_algorithm != facts.algorithm:
        raise UserError(f"--from-record {record_name} is a {record_algorithm} run; the plan is for "
                        f"{facts.algorithm}: a time projection needs a record of the same method")
    if config["method"].get("weights") != facts.method.get("weights"):
        raise UserError(f"--from-record {record_name} quantized its weights with {config['method'].get('weights')}, "
                        f"the plan with {facts.method.get('weights')}: use a record with the same method.weights")
    try:
        record_shape = model_shape(config["model"])
    except UserError:
        raise UserError(f"--from-record {record_name}: no shape known for the record's model "
                        f"{config['model'].get('name')!r} (path {config['model'].get('path')!r}); use a record of a "
                        f"built-in preset or of a local folder with a config.json") from None
    blocks = _record_blocks(record, record_shape)
    measured = _stage_flops(record_shape, config["method"], config["calib"], record_algorithm)
    target = _stage_flops(shape, facts.method, facts.calib, facts.algorithm)
    if "stage1" in measured:
        substages = {k: timings.get(f"quantize.{k}", 0.0) for k in ("stage1", "gptq", "stage2")}
        seconds = {**substages, "other": max(0.0, timings["quantize"] - sum(substages.values()))}
    else:
        seconds = {"quantize": timings["quantize"]}
    stages = {}
    for name, flops in target.items():
        per_block = seconds[name] / blocks
        if measured[name] > 0:
            ratio = flops / measured[name]
        elif flops == 0:
            ratio = 0.0
        else:
            raise UserError(f"--from-record {record_name}: its {name} stage did no work (0 FLOPs) and the plan's "
                            f"does; use a record of a run with that stage")
        stages[name] = {"record_seconds_per_block": per_block, "record_flops_per_block": measured[name],
                        "flops_per_block": flops, "flop_ratio": ratio, "seconds_per_block": per_block * ratio,
                        "seconds": per_block * ratio * shape.num_hidden_layers}
    notes = []
    for key in ("train_step", "train_precision", "train_batch_size"):
        if key in config["method"] and config["method"].get(key) != facts.method.get(key):
            notes.append(f"method.{key}: record {config['method'].get(key)}, plan {facts.method.get(key)} "
                         f"(the projection assumes the same speed per FLOP)")
    environment = record.get("environment", {})
    return {"record": record_name, "record_model": config["model"].get("name"), "record_blocks": blocks,
            "record_device": environment.get("gpu") or environment.get("device"),
            "blocks": shape.num_hidden_layers, "stages": stages,
            "seconds": sum(s["seconds"] for s in stages.values()), "notes": notes,
            "method": "linear FLOP scaling of a measured block"}


# --------------------------------------------------------------------------------------------- config


@contextlib.contextmanager
def planning_resolvers():
    """by_device and protocol_name resolved from the device the config names: device=cuda plans a GPU run
    on a machine without one (the run's own resolvers refuse that). device=auto resolves as the run would
    on this machine. The run's resolvers are put back afterwards."""
    from omegaconf import OmegaConf

    from .config import enum_value, register_configs, resolve_device

    def device_type(device) -> str:   # ${device} arrives as the config's Device enum
        name = enum_value(device)
        return name if name in ("cpu", "cuda") else resolve_device(name).type

    OmegaConf.register_new_resolver("by_device", lambda device, cpu, gpu: cpu if device_type(device) == "cpu"
                                    else gpu, replace=True)
    OmegaConf.register_new_resolver("protocol_name", lambda device: "cpu-preset" if device_type(device) == "cpu"
                                    else "full", replace=True)
    try:
        yield
    finally:
        for name in ("by_device", "protocol_name"):
            OmegaConf.clear_resolver(name)
        register_configs()


def compose_run_config(overrides: list[str]) -> tuple[dict, dict[str, dict]]:
    """(the resolved run config, {comparison method name: its resolved method config}) as plain dicts."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import check_group_choices, register_configs

    if not CONF_DIR.is_dir():
        raise UserError(f"no Hydra config folder at {CONF_DIR}: run from a checkout of the project")
    check_group_choices(overrides, CONF_DIR)
    register_configs()
    try:
        with planning_resolvers(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True, enum_to_str=True)
            check_group_choices([f"method={name}" for name in cfg["compare_with"]], CONF_DIR)
            others = [o for o in overrides if not o.lstrip("+~").startswith("method")]
            compare = {name: OmegaConf.to_container(compose("config", overrides=[*others, f"method={name}"]).method,
                                                    resolve=True, enum_to_str=True)
                       for name in cfg["compare_with"] if name != cfg["method"]["name"]}
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(str(err).strip().splitlines()[0]) from None
    return cfg, compare


def run_facts(cfg: dict, method: dict, shape: ModelShape) -> RunFacts:
    from .config import resolve_device

    device = cfg["device"]
    device_type = device if device in ("cpu", "cuda") else resolve_device(device).type
    dtype, _ = load_dtype(cfg["model"], device_type, shape)
    return RunFacts(algorithm=method["algorithm"], method_name=method["name"], method=method, quant=cfg["quant"],
                    calib=cfg["calib"], eval_ppl=(cfg.get("eval") or {}).get("ppl"), dtype=dtype,
                    dtype_bytes=DTYPE_BYTES[dtype], device_type=device_type)


# --------------------------------------------------------------------------------------------- the plan


def _phase_json(phase: Phase) -> dict:
    return {"name": phase.name, "code": phase.code, "bytes": phase.bytes, "gib": phase.bytes / GIB,
            "terms": [{**asdict(t), "gib": t.bytes / GIB} for t in phase.terms]}


def _peak(phases: list[Phase]) -> dict | None:
    if not phases:
        return None
    top = max(phases, key=lambda p: p.bytes)
    return {"phase": top.name, "bytes": top.bytes, "gib": top.bytes / GIB}


def make_plan(overrides: list[str], shape_options: dict | None = None, record_path: Path | None = None,
              eval_windows: int | None = None) -> dict:
    """Everything the CLI prints, as a JSON-ready dict (bytes and seconds)."""
    if not any(o.split("=", 1)[0].lstrip("+~") == "device" for o in overrides):
        overrides = [*overrides, "device=cuda"]
    cfg, compare_methods = compose_run_config(overrides)
    shape = model_shape(cfg["model"], shape_options)
    facts = run_facts(cfg, cfg["method"], shape)
    compare_facts = [run_facts(cfg, method, shape) for method in compare_methods.values()]
    _, dtype_reason = load_dtype(cfg["model"], facts.device_type, shape)

    phases = calibration_phases(shape, facts)
    for other in compare_facts:   # a comparison's own calibration runs on the device too
        phases += [Phase(f"{p.name} ({other.method_name})", p.code, p.terms) for p in calibration_phases(shape, other)]
    ppl = facts.eval_ppl
    windows = eval_windows
    if windows is None and ppl is not None:
        windows = ppl.get("max_windows") or (shape.wikitext2_windows if ppl["seqlen"] == 2048 else None)
    evaluation_cfg = cfg.get("eval") or {}
    zeroshot = evaluation_cfg.get("zeroshot") is not None
    evaluation = eval_phases(shape, facts, windows, zeroshot)
    device_peak = {mode: _peak(phases + [p for p in (evaluation[mode], evaluation["zeroshot"]) if p is not None])
                   for mode in ("eager", "lazy")}
    # what pipeline.materialize reads a lazy model whole for
    whole_model_steps = (["zero-shot"] if zeroshot else []) \
        + (["the kernels' perplexity"] if evaluation_cfg.get("kernels") and ppl is not None
           and facts.algorithm != "fp" else []) + (["save_quantized"] if cfg.get("save_quantized") else [])
    host = host_rows(shape, facts, compare_facts, whole_model_steps)
    notes = []
    if ppl is not None and evaluation["lazy"] is None:
        notes.append("the block-by-block perplexity (lazy model) needs the number of WikiText-2 windows: pass "
                     "--eval-windows N; its phase is left out of the lazy device peak")
    if facts.device_type == "cpu":
        notes.append("device=cpu: the device phases run in host memory and add to the host rows")
    if (cfg.get("eval") or {}).get("zeroshot") is not None:
        notes.append("zero-shot evaluation sizes its batches from the device memory left free by the weights "
                     "(evaluation/bounded_hflm.py): only its weights are planned")
    if str(cfg["model"].get("path", "")).endswith(".gguf"):
        notes.append("a GGUF file is dequantized while loading: the load itself may take more host memory")
    plan = {
        "model": cfg["model"]["name"], "model_path": cfg["model"].get("path"), "method": facts.method_name,
        "algorithm": facts.algorithm, "quant": cfg["quant"]["name"], "protocol": cfg.get("protocol"),
        "device": cfg["device"], "compare_with": [c.method_name for c in compare_facts],
        "model_lazy": bool(cfg["model"].get("lazy", False)),
        "shape": {k: v for k, v in asdict(shape).items()}, "load_dtype": facts.dtype, "load_dtype_reason": dtype_reason,
        "calib": cfg["calib"], "eval_ppl": ppl, "eval_windows": windows,
        "device_phases": [_phase_json(p) for p in phases],
        "eval_phases": {k: _phase_json(p) if p is not None else None for k, p in evaluation.items()},
        "device_peak": device_peak,
        "host": {mode: {"terms": [{**asdict(t), "gib": t.bytes / GIB} for t in terms],
                        "bytes": sum(t.bytes for t in terms), "gib": sum(t.bytes for t in terms) / GIB}
                 for mode, terms in host.items()},
        "time": None, "notes": notes,
    }
    if record_path is not None:
        plan["time"] = project_calibration_time(read_record(record_path), str(record_path), shape, facts)
    return plan


def read_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--from-record {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--from-record {path}: not a readable JSON record ({err})") from None
    if not isinstance(record, dict):
        raise UserError(f"--from-record {path}: not a run record (a JSON object)")
    return record


# --------------------------------------------------------------------------------------------- output


def _gib(value: int | float) -> str:
    return f"{value / GIB:9.2f}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def format_plan(plan: dict) -> str:
    s = plan["shape"]
    head_dim = s["head_dim"] or s["hidden_size"] // s["num_attention_heads"]
    calib = plan["calib"]
    lines = [f"plan: {plan['model']} ({plan['model_path']}), method {plan['method']}, quant {plan['quant']}, "
             f"device {plan['device']}, protocol {plan['protocol']}"
             + (f", compare_with {plan['compare_with']}" if plan["compare_with"] else ""),
             f"shape: {s['num_hidden_layers']} blocks, hidden {s['hidden_size']}, intermediate "
             f"{s['intermediate_size']}, {s['num_attention_heads']} heads ({s['num_key_value_heads']} KV, head_dim "
             f"{head_dim}), vocab {s['vocab_size']}, {'tied' if s['tie_word_embeddings'] else 'untied'} head; from "
             f"{s['source']}",
             f"loaded as {plan['load_dtype']} ({plan['load_dtype_reason']}); calibration {calib['nsamples']} x "
             f"{calib['seqlen']} tokens", "",
             "device memory by phase (GiB; the terms of a phase are alive together)"]
    eval_phases = [p for p in plan["eval_phases"].values() if p is not None]
    for phase in plan["device_phases"] + eval_phases:
        lines.append(f"  {phase['name']:<52}{_gib(phase['bytes'])}   {phase['code']}")
        for term in phase["terms"]:
            lines.append(f"      {term['name']:<48}{_gib(term['bytes'])}   {term['detail']}")
    if not plan["device_phases"] and not eval_phases:
        lines.append("  nothing: this method calibrates nothing and there is no perplexity evaluation")
    lines.append("")
    peak = plan["device_peak"]
    this_run = "lazy" if plan["model_lazy"] else "eager"
    for mode, label in (("eager", "eager model (perplexity on the whole model)"),
                        ("lazy", "lazy model (block-by-block perplexity)")):
        if peak[mode] is not None:
            lines.append(f"device peak, {label}: {peak[mode]['gib']:.2f} GiB, in {peak[mode]['phase']}"
                         + ("   <- this config" if mode == this_run else ""))
    for mode, label in (("eager", "eager model (whole model in host memory)"),
                        ("lazy", "lazy model (model.lazy=true, one block at a time)")):
        row = plan["host"][mode]
        lines.append(f"host peak, {label}: {row['gib']:.2f} GiB = " + " + ".join(
            f"{t['name']} {t['gib']:.2f}" for t in row["terms"]) + ("   <- this config" if mode == this_run else ""))
    lines.append("  (tensors only: the Python/torch/CUDA process itself adds a few GiB of host memory)")
    time = plan["time"]
    lines.append("")
    if time is None:
        lines.append("time: not projected (pass --from-record RECORD.json, a run record of the same method)")
    else:
        lines.append(f"time: {_duration(time['seconds'])} of calibration for {time['blocks']} blocks, a "
                     f"{time['method']}: {time['record']} ({time['record_model']}, {time['record_blocks']} blocks, "
                     f"{time['record_device']})")
        lines.append(f"  {'sub-stage':<10}{'record s/block':>16}{'FLOP ratio':>13}{'s/block':>11}{'total':>11}")
        for name, stage in time["stages"].items():
            lines.append(f"  {name:<10}{stage['record_seconds_per_block']:>16.2f}{stage['flop_ratio']:>13.2f}"
                         f"{stage['seconds_per_block']:>11.1f}{_duration(stage['seconds']):>11}")
        lines += [f"  note: {note}" for note in time["notes"]]
        lines.append("  note: fixed per-block costs (stage 1's re-trace of the compiled step, GPTQ's column loop) are "
                     "scaled as if they were FLOPs: from a much smaller model this overestimates")
    lines += [f"note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baseq.planning", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run.py's Hydra overrides (model=..., method=..., ...)")
    parser.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                        help="the model's architecture, or changes to the known one: " + ", ".join(SHAPE_KEYS))
    parser.add_argument("--from-record", type=Path, metavar="RECORD.json",
                        help="a run record (results/runs/*.json) whose per-block times are scaled to this plan")
    parser.add_argument("--eval-windows", type=int, metavar="N",
                        help="WikiText-2 test windows, for the block-by-block perplexity of a lazy model")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the plan's numbers as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        plan = make_plan(args.overrides, parse_shape_options(args.shape), args.from_record, args.eval_windows)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
