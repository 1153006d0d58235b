"""Figures for the comparison report (matplotlib, Agg backend: no display needed).

- :func:`plot_stream_curves`: log-perplexity against tokens streamed, one panel per model and one
  line per cache configuration (StreamingLLM Figs. 3 and 5).
- :func:`plot_attention_maps`: per-layer attention averaged over short inputs, one row per model
  (StreamingLLM Fig. 7).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def moving_average(values: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over ``window`` tokens (shorter at the start), same length as ``values``."""
    values = values.double()
    window = max(1, min(window, values.numel()))
    csum = torch.cat([torch.zeros(1, dtype=values.dtype), values.cumsum(0)])
    idx = torch.arange(1, values.numel() + 1)
    lo = (idx - window).clamp(min=0)
    return ((csum[idx] - csum[lo]) / (idx - lo)).float()


def plot_stream_curves(
    curves: dict[str, dict[str, torch.Tensor]],
    path: str | Path,
    window: int | None = None,
    cache_size: int | None = None,
    title: str = "Log perplexity while streaming",
) -> Path:
    """``curves[model][config]`` = per-token NLL (N,) -> one panel per model, a line per config.

    Each line is the trailing ``window``-token mean NLL (log perplexity); default window: the
    panel's longest run / 50.
    A dotted vertical line marks where the cache first fills (``cache_size``).
    """
    path = Path(path)
    names = list(curves)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        longest = max((nll.numel() for nll in curves[name].values()), default=0)
        w = window or max(1, longest // 50)  # one window per panel so the lines compare
        for config, nll in curves[name].items():
            if nll.numel() == 0:
                continue
            ax.plot(torch.arange(1, nll.numel() + 1), moving_average(nll, w), label=config, linewidth=1.2)
        if cache_size:
            ax.axvline(cache_size, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel("log PPL (moving mean NLL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attention_maps(
    maps: torch.Tensor,
    path: str | Path,
    title: str = "",
    max_layers: int = 8,
) -> Path:
    """``maps`` (L, T, T) averaged attention -> a row of heatmaps, at most ``max_layers`` (spread)."""
    path = Path(path)
    num_layers = maps.shape[0]
    if num_layers > max_layers:
        picks = sorted({round(i * (num_layers - 1) / (max_layers - 1)) for i in range(max_layers)})
    else:
        picks = list(range(num_layers))
    fig, axes = plt.subplots(1, len(picks), figsize=(2.8 * len(picks), 3.0), squeeze=False)
    for ax, layer in zip(axes[0], picks):
        image = ax.imshow(maps[layer].numpy(), cmap="viridis", vmin=0.0, vmax=float(maps[layer].max()))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
