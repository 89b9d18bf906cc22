"""Sparsity pictures: density per layer and head, and one layer's block mask with video/text ranges."""

from __future__ import annotations

import numpy as np


def save_sparsity_map(answer, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = answer.sparsity
    per_head = np.array(sp["per_head"], dtype=float)  # (layers, heads)
    masks = sp.get("masks") or {}
    fig, axes = plt.subplots(1, 2 if masks else 1, figsize=(12 if masks else 6, 5), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(per_head.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel("layer")
    ax.set_ylabel("query head")
    ax.set_xticks(range(per_head.shape[0]))
    ax.set_yticks(range(0, per_head.shape[1], max(1, per_head.shape[1] // 8)))
    ax.set_title(f"kept blocks / visible blocks ({answer.attention}, mean {sp['density']:.1%})")
    fig.colorbar(im, ax=ax)
    if masks:
        layer = max(masks)
        mask = masks[layer][0].numpy()
        ax = axes[0, 1]
        ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, origin="upper", interpolation="nearest")
        ax.set_title(f"layer {layer}, head 0: kept key blocks")
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        scale = mask.shape[1] / max(sp.get("num_tokens") or 1, 1)
        for start, end in sp.get("video_ranges", []):
            ax.axvspan(start * scale - 0.5, end * scale - 0.5, color="tab:orange", alpha=0.15, label="video tokens")
        ax.legend(loc="upper right")
    if not answer.trained:
        fig.suptitle("demo model, untrained")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
