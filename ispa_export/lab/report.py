"""Outputs of the quality evaluation (ispa_export.lab.evaluate): aggregation over seeds, the key
lines, EVAL.md, quality_vs_memory.png and the side-by-side GIFs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ispa_export.errors import UserError
from ispa_export.lab.methods import ALT_METHODS, BASELINES, HEADLINE, MAIN_METHODS
from ispa_export.lab.metrics import METRICS


def mean_std(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate(per_seed: list[dict], protocol: str) -> dict:
    """reduction -> method -> metric -> mean/std/n over seeds (plus KV bytes, span, layers per seed)."""
    out: dict = {}
    for res in per_seed:
        for r, red in res["protocols"].get(protocol, {}).get("reductions", {}).items():
            for name, row in red["methods"].items():
                slot = out.setdefault(r, {}).setdefault(name, {
                    "kv_bytes": row["kv_bytes"], "kv_reduction": row["kv_reduction"], "sink": row["sink"],
                    "window": row["window"], "values": {k: [] for k in METRICS}, "layers": []})
                for k in METRICS:
                    slot["values"][k].append(row[k])
                slot["layers"].append(row["layers"])
    for r in out:
        for name, slot in out[r].items():
            values = slot.pop("values")
            slot.update({k: mean_std(v) for k, v in values.items()})
            slot["psnr_per_seed"] = values["psnr"]
    return out


def best_baseline(agg_r: dict) -> str | None:
    names = [n for n in BASELINES if n in agg_r]
    return max(names, key=lambda n: agg_r[n]["psnr"]["mean"]) if names else None


def _versus(a: dict, name: str, best: str, n_seeds: int) -> str:
    """How `name` compares with `best`: difference of the means and the per-seed (paired) record."""
    diff = a[name]["psnr"]["mean"] - a[best]["psnr"]["mean"]
    pairs = np.array(a[name]["psnr_per_seed"]) - np.array(a[best]["psnr_per_seed"])
    how = (f"{diff:.2f} dB closer to the reference than" if diff > 0
           else f"{-diff:.2f} dB further from the reference than" if diff < 0 else "level with")
    spread = f", paired difference std {pairs.std(ddof=1):.2f} dB" if len(pairs) > 1 else ""
    return f"{how} {best} (better on {int((pairs > 0).sum())}/{n_seeds} seeds{spread})"


PROTOCOL_TITLES = {"free": "free-running after the transition", "teacher": "teacher-forced after the transition"}


def key_line(agg: dict, n_seeds: int, protocol: str = "free") -> str:
    """The headline: ISPA's PSNR against the reference vs the best drop baseline's, at 50%."""
    r = str(HEADLINE)
    if r not in agg or "ispa" not in agg[r]:
        return f"{PROTOCOL_TITLES[protocol]}: no result at {HEADLINE:.0%} KV reduction"
    a = agg[r]
    best = best_baseline(a)
    pm = lambda s: f" ± {s['std']:.2f}" if s["n"] > 1 else ""  # noqa: E731
    psnr = lambda n: f"{a[n]['psnr']['mean']:.2f}{pm(a[n]['psnr'])} dB"  # noqa: E731
    span = lambda n: f"sink {a[n]['sink']} + window {a[n]['window']}"  # noqa: E731
    fewer = (f", with fewer KV bytes ({a[best]['kv_bytes']:,})" if a[best]["kv_bytes"] < a["ispa"]["kv_bytes"]
             else "")
    parts = [f"{PROTOCOL_TITLES[protocol].capitalize()}, at {HEADLINE:.0%} KV reduction (target; "
             f"{a['ispa']['kv_reduction']:.1%} removed, {a['ispa']['kv_bytes']:,} KV bytes), PSNR against the "
             f"full-cache reference: ISPA ({span('ispa')}) {psnr('ispa')}, best drop baseline {best} ({span(best)}"
             f"{fewer}) {psnr(best)}: ISPA is {_versus(a, 'ispa', best, n_seeds)}"]
    for alt in (n for n in ALT_METHODS if n in a):
        what = "without the sink frame" if alt == "ispa-nosink" else "with a sink frame"
        parts.append(f"ISPA {what} ({span(alt)}) {psnr(alt)}: {_versus(a, alt, best, n_seeds)}")
    if "ispa-nocorr" in a:
        parts.append(f"ISPA's layers without the correction give {psnr('ispa-nocorr')}")
    variants = [n for n in a if n.startswith("ispa") and n not in ("ispa", "ispa-nocorr", *ALT_METHODS)]
    if variants:
        top = max(variants, key=lambda n: a[n]["psnr"]["mean"])
        parts.append(f"the best ISPA variant, picked after the fact on these seeds, is {top} "
                     f"({span(top)}) {psnr(top)}: {_versus(a, top, best, n_seeds)}")
    return "; ".join(parts) + "."


def _fmt(s: dict, digits: int) -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def sweep_lines(sweep: list[dict]) -> list[str]:
    """Per protocol and span: ISPA's PSNR minus the best drop baseline's at the same bytes."""
    out = []
    for proto, setting in dict.fromkeys((r["protocol"], r["setting"]) for r in sweep if "note" not in r):
        rows = {r["method"]: r for r in sweep if (r.get("protocol"), r["setting"]) == (proto, setting)}
        best = rows.get("ispa", {}).get("best_baseline")
        if not best:
            continue
        for name in ("ispa", *ALT_METHODS):
            if name in rows:
                diff = rows[name]["psnr"]["mean"] - rows[best]["psnr"]["mean"]
                out.append(f"{proto}, {setting}: {name} {rows[name]['psnr']['mean']:.2f} dB vs best baseline {best} "
                           f"{rows[best]['psnr']['mean']:.2f} dB ({diff:+.2f} dB)")
    return out


def write_markdown(path: Path, summary: dict) -> None:
    per_seed = summary["seeds"]
    s0 = per_seed[0]
    lines = [f"# Quality at equal KV bytes ({summary['model']}, {len(per_seed)} seed(s)"
             f"{', quick' if summary['quick'] else ''})", "",
             "This is `ispa eval` without `--regime`: one fixed span and layer count for every seed. The policy's "
             "layout against every drop baseline in both regimes: `ispa eval --regime R` (REGIMES.md); how the "
             "policy decides and what was tried: POLICY.md.", ""]
    lines += [f"- {summary['key_lines'][p]}" for p in summary["protocols"]] + [""]
    if summary.get("weights"):
        lines += [f"Weights: {summary['weights']['file']} (sha256 {summary['weights']['sha256']}).", ""]
    lines += [
        f"Reference: full-cache rollout ({summary['full_kv_bytes']:,} KV bytes) from the same warmup with the same "
        f"noise. Span: sink {summary['settings']['sink']} + window {summary['settings']['window']} frames of a "
        f"{summary['config']['max_frames']}-frame cache. Transition chunks per seed: "
        f"{[s['transition_chunk'] for s in per_seed]} (frames {[s['transition_frame'] for s in per_seed]}); "
        f"{s0['frames_after_transition']} frames scored after the transition per run"
        + (" (warmup teacher-forced with a procedural video)" if s0["teacher_forced_warmup"] else "")
        + f"; warmups of at most {s0.get('warmup_limit_chunks', summary['settings']['warmup_chunks'])} chunks, "
        "so that the sink frames of the sink baselines are still in the full cache at the transition.",
        "",
        "PSNR/SSIM against the reference (higher is better); flicker = frame-difference energy / the "
        "reference's (1 is best); drift = PSNR(last quarter) - PSNR(first quarter); recall = identity "
        "recall of returning objects against the ground-truth video. Mean ± std over seeds.",
    ]
    for proto in summary["protocols"]:
        agg = summary["aggregate"][proto]
        ref = summary["reference"][proto]
        lines += ["", f"## {PROTOCOL_TITLES[proto].capitalize()}", "",
                  f"The reference itself: PSNR against the ground-truth video {_fmt(ref['psnr_vs_truth'], 2)} dB, "
                  f"identity recall {_fmt(ref['recall'], 3)}.", "",
                  "| KV reduction | method | KV bytes | PSNR dB | SSIM | flicker | drift dB | recall | layers (seed 0) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(agg, key=float):
            order = [n for n in MAIN_METHODS if n in agg[r]] + [n for n in agg[r] if n not in MAIN_METHODS]
            for name in order:
                a = agg[r][name]
                lines.append(f"| {float(r):.0%} ({a['kv_reduction']:.1%}) | {name} | {a['kv_bytes']:,} | "
                             f"{_fmt(a['psnr'], 2)} | {_fmt(a['ssim'], 3)} | {_fmt(a['flicker'], 3)} | "
                             f"{_fmt(a['drift'], 2)} | {_fmt(a['recall'], 3)} | {a['layers'][0]} |")
    notes = sorted({n for s in per_seed for p in s["protocols"].values() for red in p["reductions"].values()
                    for n in red["notes"]} | {f"{r}: {why}" for s in per_seed for r, why in s["skipped_reductions"].items()})
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if summary.get("sweep"):
        lines += ["", f"## Other spans at {HEADLINE:.0%} KV reduction", "",
                  "Each span has its own warmup and transition, so its reference frames differ; compare "
                  "methods within a span (equal KV bytes there).", "",
                  "| protocol | span | method | KV bytes | PSNR dB | SSIM | recall | layers (seed 0) |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for row in summary["sweep"]:
            if "note" in row:
                lines.append(f"| | {row['setting']} | not run: {row['note']} | | | | | |")
                continue
            lines.append(f"| {row['protocol']} | {row['setting']} | {row['method']} | {row['kv_bytes']:,} "
                         f"({row['kv_reduction']:.1%}) | {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'], 3)} | "
                         f"{_fmt(row['recall'], 3)} | {row['layers'][0]} |")
        lines += [""] + [f"- {line}" for line in sweep_lines(summary["sweep"])]
    lines += ["", "Files of the run: eval.json (every number, per seed and per frame), quality_vs_memory.png, "
              + ", ".join(f"{name} ({caption})" for name, caption in summary.get("gifs", {}).items()) + "."]
    path.write_text("\n".join(lines) + "\n")


def plot_quality(path: Path, aggs: dict[str, dict], full_bytes: int) -> None:
    """PSNR vs KV bytes, one line per main method, one panel per protocol; ISPA variants as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ispa": ("C3", "o", "-"), "ispa-nosink": ("C5", "P", "-"), "ispa-sink1": ("C5", "P", "--"),
              "ispa-nocorr": ("C1", "s", "--"),
              "drop": ("C0", "v", "-"), "sink-window": ("C2", "^", "-"), "uniform": ("C4", "D", ":"),
              "uniform-nosink": ("C9", "d", ":")}
    protos = list(aggs)
    fig, axes = plt.subplots(1, len(protos), figsize=(5.2 * len(protos) + 2.2, 4.5), dpi=110, squeeze=False)
    for ax, proto in zip(axes[0], protos):
        agg = aggs[proto]
        for name in MAIN_METHODS:
            pts = sorted((agg[r][name]["kv_bytes"], agg[r][name]["psnr"]["mean"], agg[r][name]["psnr"]["std"])
                         for r in agg if name in agg[r])
            if not pts:
                continue
            x, y, e = (np.array(v) for v in zip(*pts))
            c, mk, ls = styles[name]
            ax.errorbar(x / 2**20, y, yerr=e, color=c, marker=mk, ls=ls, capsize=3, label=name)
        extra = [(agg[r][n]["kv_bytes"], agg[r][n]["psnr"]["mean"]) for r in agg for n in agg[r] if n not in MAIN_METHODS]
        if extra:
            x, y = zip(*extra)
            ax.scatter(np.array(x) / 2**20, y, s=12, color="0.45", marker="x", zorder=3,
                       label=f"ISPA variants ({len(extra)})")
        ax.axvline(full_bytes / 2**20, color="k", lw=0.8, ls=":", label="full cache")
        ax.set_xlabel("steady-state KV bytes (MiB)")
        ax.set_ylabel("PSNR vs full-cache reference (dB)")
        ax.set_title(PROTOCOL_TITLES[proto], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("quality vs memory: frames after the transition, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_gif(path: Path, panels: list[np.ndarray], scale: int = 4) -> Path:
    """Panels [T, C, H, W] side by side, separated by white bars, as an upscaled GIF."""
    from ispa_export.lab.videos import save_preview

    t = min(len(p) for p in panels)
    rgb = [p[:t, :3] if p.shape[1] >= 3 else np.repeat(p[:t, :1], 3, axis=1) for p in panels]
    bar = np.ones(rgb[0].shape[:3] + (1,), np.float32)
    parts = []
    for i, p in enumerate(rgb):
        parts += ([bar] if i else []) + [p]
    return save_preview(np.concatenate(parts, axis=3), path, scale=scale)


def render(out: Path) -> dict:
    """Rewrite EVAL.md and quality_vs_memory.png from an earlier run's eval.json (no generation)."""
    path = out / "eval.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the evaluation first") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if "aggregate" not in summary or "protocols" not in summary:
        raise UserError(f"{path}: fields 'aggregate'/'protocols' missing; not an eval.json of this version")
    plot_quality(out / "quality_vs_memory.png", summary["aggregate"], summary["full_kv_bytes"])
    write_markdown(out / "EVAL.md", summary)
    return summary
