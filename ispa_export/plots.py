"""Pictures people would rather look at than JSON: discrepancy curves, quality vs memory."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_discrepancy(report: dict, path: Path) -> Path:
    """Per layer: raw and held-out corrected discrepancy per warmup chunk (mean over passes)."""
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    cmap = plt.get_cmap("viridis", max(len(layers), 2))
    for layer in layers:
        chunks = sorted(int(c) for c in layer["curve"])
        if not chunks:
            continue
        raw = [sum(v["raw"] for v in layer["curve"][str(c)].values()) / len(layer["curve"][str(c)]) for c in chunks]
        cor = [sum(v["corrected"] for v in layer["curve"][str(c)].values()) / len(layer["curve"][str(c)]) for c in chunks]
        color = cmap(layer["index"])
        style = "-" if layer["mode"] == "L" else ":"
        ax.plot(chunks, raw, style, color=color, alpha=0.45)
        ax.plot(chunks, cor, style, color=color, marker="o", ms=3,
                label=f"layer {layer['index']} ({layer['mode']})")
    ax.axvline(report["transition_chunk"] - 0.5, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("warmup chunk")
    ax.set_ylabel("discrepancy  ||W_o(a_g - a_l)||² / ||W_o a_g||²")
    ax.set_title(f"raw (faint) vs held-out corrected (markers); transition at chunk {report['transition_chunk']}, "
                 f"{report['kv_reduction']:.0%} KV removed", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # a video whose warmup measured nothing has no curve
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_calibration(report: dict, path: Path) -> Path:
    """A build's decision: each candidate span's pooled predicted loss per layer (the chosen layout
    marked), and each challenger's measured gain over the uniform prior against its 2-SE bar."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, x in sorted(report["pooled"].items()):
        loss = [v if v is not None else float("nan") for v in x["loss"]]
        a.plot(range(len(loss)), loss, marker="o", ms=3, label=f"{name} ({x['source']})")
    chosen = [f"s{s['sink']}w{s['window']}" if s else "F" for s in report["layout"]]
    a.set_xlabel("layer")
    a.set_ylabel("pooled predicted loss")
    a.set_yscale("log")
    a.set_title("layout: " + " ".join(chosen), fontsize=8)
    a.legend(fontsize=7)
    sel = (report.get("selection") or {}).get("challengers") or []
    if sel:
        gains = [c["gain"] for c in sel]
        bars = [2 * c["se"] if c["se"] is not None else 0.0 for c in sel]
        b.bar(range(len(sel)), gains, yerr=bars, capsize=3, color="tab:blue")
        b.axhline(0, color="k", lw=0.8)
        b.set_xticks(range(len(sel)), ["/".join(sorted(set(c["spans"]))) for c in sel], rotation=45, fontsize=6,
                     ha="right")
    b.set_ylabel("paired gain over the uniform prior (error bar: 2 SE)")
    b.set_title(f"{len(report['videos'])} calibration videos; chosen: "
                f"{(report.get('selection') or {}).get('chosen', 'n/a')}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
