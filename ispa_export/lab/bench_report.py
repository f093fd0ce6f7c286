"""Plots and BENCHMARKS.md of `ispa bench` (ispa_export/bench.py), from the bench.json dict."""
from __future__ import annotations

from pathlib import Path


def plots(result: dict, out: Path) -> list[str]:
    """kv_growth.png, latency_capacity.png, latency_history.png into `out`; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for name, draw in (("kv_growth.png", _plot_growth), ("latency_capacity.png", _plot_capacity),
                       ("latency_history.png", _plot_history)):
        fig = draw(plt, result)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        names.append(name)
    return names


def _by(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def _plot_growth(plt, result: dict):
    g = result["growth"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    gb = [x / 1e9 for x in g["full"]]
    ax.plot(g["frames"], gb, "k-", drawstyle="steps-post", label="full cache (valid frames)")
    for key, style in (("earliest", "C0-"), ("latest", "C1--")):
        ax.plot(g["frames"], [x / 1e9 for x in g[f"ispa_{key}"]], style, drawstyle="steps-post",
                label=f"ISPA, transition at frame {g['transition_frame'][key]}")
    ax.axhline(g["allocated_full"] / 1e9, color="k", ls=":", lw=0.8, label="allocated, fixed graph: full")
    ax.axhline(g["allocated_ispa"] / 1e9, color="C0", ls=":", lw=0.8, label="allocated, fixed graph: ISPA")
    ax.set(xlabel="video length (latent frames generated)", ylabel="self-attention KV (GB, fp32)",
           title=f"{g['config']}: KV cache vs video length")
    ax.legend(fontsize=7)
    return fig


def _plot_capacity(plt, result: dict):
    groups = _by([r for r in result["latency"] if r["history"] == r["capacity"]], "config")
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), dpi=110, squeeze=False)
    for j, (name, rows) in enumerate(groups.items()):
        top, bottom = axes[0, j], axes[1, j]
        for k, (backend, rs) in enumerate(sorted(_by(rows, "backend").items())):
            rs = sorted(rs, key=lambda r: r["capacity"])
            m, ratio = [r["capacity"] for r in rs], [r["ratio"] for r in rs]
            for mode, style in (("full", "-o"), ("ispa", "--s")):
                top.plot(m, [r[mode]["median"] * 1e3 for r in rs], style, color=f"C{k}", label=f"{backend} {mode}")
            err = [[x["median"] - x["q1"] for x in ratio], [x["q3"] - x["median"] for x in ratio]]
            bottom.errorbar(m, [x["median"] for x in ratio], yerr=err, fmt="-o", color=f"C{k}", label=backend)
        rs = sorted({r["capacity"]: r for r in rows}.values(), key=lambda r: r["capacity"])
        bottom.plot([r["capacity"] for r in rs], [r["flops"]["predicted_ratio"] for r in rs], "k:", label="FLOP ratio")
        top.set(title=f"{name}: step latency vs capacity M", ylabel="ms per chunk step", yscale="log")
        bottom.set(xlabel="cache capacity M (frames)", ylabel="ISPA / full (paired median, IQR)")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    return fig


def _plot_history(plt, result: dict):
    groups = _by([r for r in result["latency"] if r["capacity"] == r["preset_capacity"]], "config")
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), dpi=110, squeeze=False)
    for ax, (name, rows) in zip(axes[0], sorted(groups.items())):
        for k, (backend, rs) in enumerate(sorted(_by(rows, "backend").items())):
            rs = sorted(rs, key=lambda r: r["history"])
            for mode, style in (("full", "-o"), ("ispa", "--s")):
                ax.plot([r["history"] for r in rs], [r[mode]["median"] * 1e3 for r in rs], style, color=f"C{k}",
                        label=f"{backend} {mode}")
        ax.set(title=f"{name}: fixed graph, M = {rows[0]['capacity']}", xlabel="valid history frames",
               ylabel="ms per chunk step", ylim=(0, None))
        ax.legend(fontsize=7)
    return fig


def _table(headers: list[str], rows: list[list], caption: str) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{caption}\n"


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.2f} ({s['iqr'] * 1e3:.2f})"


def _x(s: dict) -> str:
    return f"{s['median']:.3f} ({s['iqr']:.3f})"


def markdown(res: dict) -> str:
    m = res["machine"]
    device = m.get("cuda_device", "no CUDA device")
    cap = (f"_`{res['command']}` · {m['cpu']}, {m['cores']} cores, {m['threads']} threads · torch {m['torch']} · "
           f"onnxruntime {m['onnxruntime']} · {device}_")
    head = (f"# Benchmarks\n\nCommand: `{res['command']}` ({res['mode']} mode, {res['wall_seconds']:.0f} s). Machine: "
            f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, onnxruntime "
            f"{m['onnxruntime']} (providers {', '.join(m['ort_providers'])}), {device}. Load average (1 min) at "
            f"start / end: {m['load_average_start'][0]:.1f} / {m['load_average_end'][0]:.1f}; with other jobs on "
            "the CPU the absolute times are noisy, the paired ratios are the numbers to read. Random weights "
            "throughout: time and bytes do not depend on weight values.\n")
    parts = [head, _md_summary(res), _md_memory(res, cap), _md_latency(res, cap), _md_transition(res, cap),
             _md_export(res, cap), "## Plots\n\n" + "".join(f"![{p}]({p})\n" for p in res["plots"])]
    return "\n".join(parts)


def _md_summary(res: dict) -> str:
    lines = ["## Summary\n"]
    for r in res["kv"]["rows"]:
        if r["config"] in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b") and r["dtype"] == "float16":
            lines.append(f"- {r['config']} KV cache (bf16): {r['full_bytes'] / 1e9:.2f} GB -> "
                         f"{r['ispa_bytes'] / 1e9:.2f} GB ({r['removed']:.1%} removed, {r['local_layers']} L-layers)")
    for r in res["latency"]:
        if r["capacity"] == r["history"] == r["preset_capacity"]:
            lines.append(f"- step latency ISPA/full, {r['config']} M={r['capacity']}, {r['backend']}: "
                         f"{_x(r['ratio'])} (FLOP ratio {r['flops']['predicted_ratio']:.3f})")
    for v in res["ort_vs_torch"]:
        lines.append(f"- {v['ort']}/{v['ort'].replace('ort', 'torch')}, {v['config']} M={v['capacity']} {v['mode']}: "
                     f"{_x(v['ratio'])}")
    mo = res["transition"]["monitor"]
    lines.append(f"- warmup with/without monitor ({mo['config']}): {_x(mo['ratio'])}")
    for s in res["transition"]["solve"]:
        if "model" in s:
            lines.append(f"- solve, D={s['D']}: {s['seconds_per_layer']:.2f} s per layer, "
                         f"{s['seconds_all_layers']:.1f} s for the {s['local_layers']} L-layers of {s['model']}")
    e = res["export"]
    lines.append(f"- export ({e['config']}): write_artifact {e['write_artifact_s']:.1f} s, {e['total_bytes']:,} bytes")
    return "\n".join(lines) + "\n"


def _md_memory(res: dict, cap: str) -> str:
    out = ["## 1. Steady-state KV bytes (exact)\n\nF-layers hold M frames, L-layers sink 1 + window (one chunk). "
           "16-bit is fp16 and bf16 alike. Text K/V is the cross-attention cache (fixed, one prompt).\n"]
    out.append(_table(["config", "dtype", "target", "L-layers", "full bytes", "ISPA bytes", "removed",
                       "text K/V bytes"],
                      [[r["config"], "fp32" if r["dtype"] == "float32" else "fp16/bf16", f"{r['target']:.0%}",
                        f"{r['local_layers']}/{r['layers']}", f"{r['full_bytes']:,}", f"{r['ispa_bytes']:,}",
                        f"{r['removed']:.2%}", f"{r['cross_kv_bytes']:,}"] for r in res["kv"]["rows"]], cap))
    out.append("Cross-check: bytes of the cache buffers the streaming driver allocates vs `kv_bytes` (also asserted "
               "for every latency case below).\n")
    out.append(_table(["config", "modes", "dtype", "allocated", "kv_bytes", "equal"],
                      [[c["config"], c["modes"], c["dtype"], f"{c['allocated']:,}", f"{c['kv_bytes']:,}", c["equal"]]
                       for c in res["kv"]["crosscheck"]], cap))
    g, t = res["growth"], res["growth"]["transition_frame"]
    out.append(f"### Growth with video length ({g['config']}, fp32)\n\nValid K/V when the chunk starting at frame "
               f"n runs. The warmup is all-F, so ISPA holds the full cache until its transition: earliest the policy "
               f"allows, frame {t['earliest']}; latest (maximum warmup, or the full cache about to evict the sink), "
               f"frame {t['latest']}. Peak memory during the warmup is the full cache's. The fixed graph allocates "
               f"{g['allocated_full']:,} bytes (full) / {g['allocated_ispa']:,} (ISPA) from the start. See "
               "kv_growth.png.\n")
    keep = [i for i, n in enumerate(g["frames"]) if n in (3, 6, 12, 15, 18, 21, 24, 30, 45, 60)]
    out.append(_table(["frames", "full", "ISPA (earliest)", "ISPA (latest)"],
                      [[g["frames"][i], f"{g['full'][i]:,}", f"{g['ispa_earliest'][i]:,}", f"{g['ispa_latest'][i]:,}"]
                       for i in keep], cap))
    return "\n".join(out)


def _md_latency(res: dict, cap: str) -> str:
    lat = res["latency"]
    out = ["## 2. Chunk-step latency, full vs ISPA\n\nOne chunk step of the fixed-shape graph (history = M: every "
           "slot valid); the same layer modes at every M. ms: median (IQR) of n interleaved repetitions (after "
           "warmup; fast steps get more, up to a few seconds per case); ISPA/full: median (IQR) of per-repetition "
           "ratios. FLOP ratio: analytic ISPA/full FLOPs of the step's GEMMs and "
           "attention products, the ratio if time followed them (mask, softmax and copies over the keys are left "
           "out; they shrink with ISPA too). attn share: attention's share of one F-layer's FLOPs at this M, the "
           "most an L-layer can save of its own cost. See latency_capacity.png.\n"]
    out.append(_table(["config", "backend", "M", "L-layers", "KV removed", "n", "full ms", "ISPA ms", "ISPA/full",
                       "FLOP ratio", "attn share"],
                      [[r["config"], r["backend"], r["capacity"], f"{r['local_layers']}/{r['layers']}",
                        f"{r['kv_removed']:.0%}", r["ratio"]["n"], _ms(r["full"]), _ms(r["ispa"]), _x(r["ratio"]),
                        f"{r['flops']['predicted_ratio']:.3f}", f"{r['flops']['f_layer_attention_share']:.0%}"]
                       for r in lat if r["history"] == r["capacity"]], cap))
    out.append("Latency vs valid history at the preset M: the fixed graph attends over every slot and masks the "
               "empty ones, so its cost is flat in history for both (see latency_history.png).\n")
    rows = sorted((r for r in lat if r["capacity"] == r["preset_capacity"]),
                  key=lambda r: (r["config"], r["backend"], r["history"]))
    out.append(_table(["config", "backend", "M", "valid frames", "full ms", "ISPA ms", "ISPA/full"],
                      [[r["config"], r["backend"], r["capacity"], r["history"], _ms(r["full"]), _ms(r["ispa"]),
                        _x(r["ratio"])] for r in rows], cap))
    out.append("ONNX Runtime vs PyTorch eager, same graph and inputs (per-repetition ratio).\n")
    out.append(_table(["config", "M", "graph", "backends", "ORT/torch"],
                      [[v["config"], v["capacity"], v["mode"], f"{v['ort']} / {v['ort'].replace('ort', 'torch')}",
                        _x(v["ratio"])] for v in res["ort_vs_torch"]], cap))
    notes = [f"- {s['config']}: {s['reason']}" for s in res["skipped"]] + [f"- {n}" for n in res["notes"]]
    if notes:
        out.append("Not measured, and notes:\n\n" + "\n".join(notes) + "\n")
    return "\n".join(out)


def _md_transition(res: dict, cap: str) -> str:
    t, mo = res["transition"], res["transition"]["monitor"]
    out = ["## 3. Transition cost\n\nWarmup wall time with the monitor attached (a_g and a_l per F-layer, float64 "
           "statistics, a refit per chunk), as `ispa export` runs it, vs the same chunks without it.\n"]
    out.append(_table(["config", "chunks (monitored)", "without s", "with s", "with/without"],
                      [[mo["config"], f"{mo['chunks']} ({mo['monitored_chunks']})", f"{mo['plain']['median']:.3f}",
                        f"{mo['monitor']['median']:.3f}", _x(mo["ratio"])]], cap))
    out.append("Solve (`solver.solve_timing`: full variant, Cholesky, median): per L-layer, and times the number of "
               "L-layers the model needs for 50% KV reduction (solved one after another).\n")
    out.append(_table(["D", "s per layer", "model", "L-layers", "s all L-layers"],
                      [[s["D"], f"{s['seconds_per_layer']:.3f}", s.get("model", "-"), s.get("local_layers", "-"),
                        f"{s['seconds_all_layers']:.2f}" if "seconds_all_layers" in s else "-"]
                       for s in t["solve"]], cap))
    return "\n".join(out)


def _md_export(res: dict, cap: str) -> str:
    e = res["export"]
    head = (f"## 4. Export ({e['config']})\n\nWarmup + solve + bake {e['warmup_and_solve_s']:.1f} s (transition "
            f"at chunk {e['transition_chunk']}, L-layers {e['local_layers']}); `write_artifact` "
            f"{e['write_artifact_s']:.1f} s, of which the ONNX export {e['onnx_export_s']:.1f} s. Artifact files:\n")
    rows = [[k, f"{v:,}"] for k, v in sorted(e["files"].items())] + [["total", f"{e['total_bytes']:,}"]]
    return head + "\n" + _table(["file", "bytes"], rows, cap)
