"""`ispa inspect PRESET|DEPLOY|INSTANCE`: configuration, layer modes, exact KV bytes, memory of a warmup.

For a preset it predicts what `ispa build` will choose where that is decided by rule, and says
what only the calibration warmups decide. For a deployment it reads the manifest; for an instance,
instance.json and its report.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from graphs.config import WanConfig
from graphs.wan import WanModel, parameter_count
from runtimes.groups import as_layout, cache_groups, group_name

from . import memory
from .errors import UserError
from .kv import kv_bytes, layers_for_target, uniform_layout
from .method.monitor import GATE_CHUNKS, Placement
from .method.policy import candidate_spans, reference_keeps_sink, uniform
from .models import DTYPE_NAMES, get_preset


def _predicted(cfg: WanConfig, reduction: float, window: int | None, sink: int | None) -> tuple[list, str, int]:
    """(layout, how the build decides it, candidate spans searched) for a preset."""
    if window is None:
        sinks = [k for k in (0, 1) if (sink is None or k == sink) and reference_keeps_sink(k, cfg.max_frames,
                                                                                          cfg.full_sink, None)]
        if not sinks:
            raise UserError(f"--sink {sink}: the full cache of this preset does not keep frame 0 for the whole stream, "
                            "so no local sink is a candidate")
        prior = uniform(cfg, reduction, max(sinks))
        n_spans = len([s for s in candidate_spans(cfg, tuple(sinks), (reduction,))])
        if prior is None:
            raise UserError(f"--kv-reduction {reduction}: out of reach for a uniform layout of this preset")
        s = prior.spans[0]
        return (as_layout(prior.spans), f"the policy's uniform prior (every layer at sink {s.sink} + window {s.window}); the "
                f"build keeps it unless an allocation of the {n_spans} candidate spans beats it by more than 2 standard "
                "errors on the calibration warmups' chains", n_spans)
    sink = sink or 0
    try:
        n = layers_for_target(cfg, reduction, window, sink)
    except ValueError as e:
        raise UserError(f"--kv-reduction/--window/--sink: {e}") from None
    layout = uniform_layout(cfg.num_layers, range(cfg.num_layers - n, cfg.num_layers), sink, window)
    return (layout, f"{n} of {cfg.num_layers} layers at sink {sink} + window {window} (the bytes are fixed; which "
            "layers, the calibration warmups decide: shown here as the last ones)", 1)


def inspect(target: str, reduction: float, window: int | None, sink: int | None, dtype: str) -> dict:
    if dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype: expected fp32, fp16 or bf16, got {dtype!r}")
    path = Path(target)
    extra: list[str] = []
    info: dict = {}
    if path.is_dir() and (path / "instance.json").is_file() and not (path / "manifest.json").is_file():
        return _instance(path)
    if path.is_dir():
        from runtimes.artifact import load_artifact

        art = load_artifact(path, verify_checksums=False, check_onnx=False)
        man = art.manifest
        cfg = WanConfig.from_dict(man["model"]["config"])
        layout, batch = art.geometry.layout, art.geometry.batch
        dtype_name = man["dtype"]
        title = f"deployment {path} ({man['model']['preset']}, modulation {man['modulation']})"
        corr, cal = man.get("correction", {}), man.get("calibration", {})
        videos = ", ".join("seed {} ({})".format(v["seed"], v["context"]) for v in cal.get("videos", []))
        extra = [f"  correction: variant {corr.get('variant')}, site {corr.get('site')}, corrections "
                 f"{'allowed on ' + str(len(corr.get('allowed', []))) + ' L-layers' if corr.get('allowed') else 'off'} "
                 f"({cal.get('corrections')})",
                 f"  calibration videos: {videos}"]
        if art.default_instance is not None:
            extra.append(f"  instance: {art.default_instance} (the video `ispa export` absorbed)")
        info = {"correction": corr, "calibration": cal}
    else:
        cfg = get_preset(target)
        dtype_name = DTYPE_NAMES[dtype]
        layout, how, n_spans = _predicted(cfg, reduction, window, sink)
        batch = 1
        title = f"preset {target} at {reduction:.0%} KV reduction: {how}"
        extra = _memory_lines(cfg, layout, dtype_name, n_spans)
    modes = ["F" if s is None else "L" for s in layout]
    spans = [None if s is None else s._asdict() for s in layout]
    full = kv_bytes(cfg, None, dtype=dtype_name, batch=batch)
    ispa = kv_bytes(cfg, layout, dtype=dtype_name, batch=batch)
    groups = [{"name": g.name, "layers": list(g.layers), "capacity_frames": g.capacity, "sink_frames": g.sink,
               "bytes": ispa.by_group()[g.name]} for g in cache_groups(layout, cfg.max_frames, cfg.full_sink)]
    params = _meta_params(cfg)
    text = [title,
            f"  dim {cfg.dim}, ffn {cfg.ffn_dim}, heads {cfg.num_heads} x {cfg.head_dim}, layers {cfg.num_layers}, "
            f"{params:,} parameters",
            f"  {cfg.tokens_per_frame} tokens/frame, chunk {cfg.chunk_frames} frames, full cache {cfg.max_frames} frames",
            f"  layer modes: {''.join(modes)}",
            "  layer spans: " + " ".join(
                (f"{i}:F" if sp is None else f"{i}:L(sink {sp['sink']} + window {sp['window']})") + f"->{group_name(s)}"
                for i, (sp, s) in enumerate(zip(spans, layout))),
            "  cache groups: " + "; ".join(f"{g['name']} layers {g['layers']} ({g['capacity_frames']} frames, "
                                           f"{g['bytes']:,} bytes)" for g in groups),
            f"  KV bytes ({dtype_name}): full cache {full.total:,} ({full.full_layer:,} per layer); "
            f"ISPA {ispa.total:,}; removed {1 - ispa.total / full.total:.2%}",
            f"  text cross-attention K/V (fixed per prompt): {full.cross:,} bytes", *extra]
    return {"config": cfg.to_dict(), "modes": modes, "spans": spans, "groups": groups,
            "layer_groups": [group_name(s) for s in layout], "parameters": params, "dtype": dtype_name,
            "kv_bytes_full": full.total, "kv_bytes_ispa": ispa.total, "kv_bytes_per_layer": ispa.per_layer,
            "kv_reduction": 1 - ispa.total / full.total, "cross_kv_bytes": full.cross, "text": text, **info}


def _memory_lines(cfg: WanConfig, layout, dtype: str, n_spans: int) -> list[str]:
    """What a build's span search and a video's absorb hold, per placement (ispa_export.memory)."""
    n_local = sum(s is not None for s in layout)
    gib = 2 ** 30
    lines = []
    for label, kw in (("a video's absorb", dict(monitored_layers=n_local, spans=1, per_kind=False, gate_chunks=0,
                                                track_fit=False)),
                      (f"the build's search ({n_spans} spans)", dict(monitored_layers=cfg.num_layers, spans=n_spans,
                                                                     per_kind=True, gate_chunks=GATE_CHUNKS,
                                                                     track_fit=True))):
        for placement, where in ((Placement(), "float64 with the activations"),
                                 (memory.HOST_PLACEMENT, "float32 partials on the GPU, float64 totals on the host")):
            b = memory.budget(cfg, dtype, holdout_gap=1, site="wo", placement=placement, **kw)
            lines.append(f"  memory of {label}, {where}: {b.device / gib:.1f} GiB on the device (weights "
                         f"{b.weights / gib:.1f}, cache {b.cache / gib:.1f}, statistics {b.statistics.device / gib:.1f},"
                         f" activations ~{b.activations / gib:.1f}), {b.host / gib:.1f} GiB on the host")
    return lines


def _instance(path: Path) -> dict:
    record = json.loads((path / "instance.json").read_text())
    report = json.loads((path / "report.json").read_text()) if (path / "report.json").is_file() else {}
    text = [f"instance {path}: seed {record.get('seed')}, context {record.get('context')}",
            f"  deployment {record.get('deployment')} (manifest sha256 {record.get('deployment_manifest_sha256')})",
            f"  transition at chunk {record.get('transition_chunk')} ({report.get('transition_reason')}), "
            f"frame {record.get('frame_index')}",
            f"  corrections kept on layers {record.get('kept_corrections')} of L-layers {report.get('selected_layers')}",
            f"  seconds: {json.dumps(record.get('seconds'))}"]
    return {"instance": record, "text": text}


def _meta_params(cfg: WanConfig) -> int:
    with torch.device("meta"):
        return parameter_count(WanModel(cfg))
