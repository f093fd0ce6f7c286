"""The stages behind the command line: load a model, warm up and bake, export, run an artifact, inspect."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graphs.config import WanConfig, preset
from graphs.wan import Absorption, WanModel, parameter_count
from runtimes.groups import Span, cache_groups, group_name

from ispa_export.errors import UserError
from ispa_export.build.calibrate import IspaOptions, report, transition
from ispa_export.kv import kv_bytes, layers_for_target, uniform_layout
from ispa_export.video.torch_runner import TORCH_DTYPES

DATA = Path(__file__).parent / "data"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BAKED = "torch_model.safetensors"


def get_preset(name: str) -> WanConfig:
    try:
        return preset(name)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None


def load_model(name: str | None, checkpoint: str | None = None, config: str | None = None, seed: int = 0) -> tuple[str, WanModel]:
    """A preset with its weights: the shipped demo weights, a checkpoint, or seeded random weights."""
    from ispa_export.checkpoint import load_into

    if checkpoint:
        name = config or name
        if not name:
            raise UserError("--checkpoint needs --config PRESET (the architecture of the checkpoint)")
    cfg = get_preset(name)
    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    if checkpoint:
        load_into(model, checkpoint)
    elif name == "demo":
        path = DATA / "demo.safetensors"
        if not path.exists():
            raise UserError(f"{path}: the demo weights are missing from the package; reinstall ispa-export")
        load_into(model, str(path))
    return name, model


def load_context(path: str | None, name: str, cfg: WanConfig, seed: int) -> tuple[torch.Tensor, str]:
    """Text embeddings [B, tokens, text_dim]: a file, the demo's fixed prompt, or seeded noise."""
    if path:
        try:
            ctx = load_file(path)["context"]
        except KeyError:
            raise UserError(f"{path}: field 'context' missing; expected a tensor [B, tokens, {cfg.text_dim}]") from None
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
        if ctx.dim() != 3 or ctx.shape[2] != cfg.text_dim or ctx.shape[1] > cfg.text_len:
            raise UserError(f"{path}: field 'context' has shape {list(ctx.shape)}; expected "
                            f"[B, <= {cfg.text_len}, {cfg.text_dim}]")
        return ctx.float(), path
    if name == "demo":
        from ispa_export.demo import demo_context
        return demo_context(), "demo prompt (fixed)"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, min(cfg.text_len, 16), cfg.text_dim, generator=g), f"random embeddings (seed {seed})"


def save_baked(model: WanModel, path: Path) -> None:
    """The baked PyTorch weights (absorbed corrections included), for `ispa run --backend torch`."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"layout": json.dumps([None if s is None else s._asdict() for s in model.layout]),
            "sites": ",".join(b.self_attn.ispa_site for b in model.blocks)}
    save_file(sd, str(path), metadata=meta)


def load_baked(cfg: WanConfig, path: Path) -> WanModel:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "layout" not in meta:
        raise UserError(f"{path}: metadata field 'layout' missing; expected a baked ispa-export model "
                        "(an older one: re-export it)")
    sd = load_file(str(path))
    model = WanModel(cfg).eval()
    model.set_layout([None if s is None else Span(**s) for s in json.loads(meta["layout"])])
    for i, (block, site) in enumerate(zip(model.blocks, meta["sites"].split(","))):
        pre = f"blocks.{i}.self_attn."
        if pre + "ispa_bias" in sd:
            block.self_attn.absorb(Absorption(site, sd.get(pre + "ispa_weight"), sd[pre + "ispa_bias"]))
    model.load_state_dict(sd, strict=True)
    return model


def resolve_device(text: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N; default cuda when PyTorch sees one. A one-line error otherwise."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: this PyTorch sees no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: expected an index below {torch.cuda.device_count()} (CUDA devices here)")
    return device


def warmup_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The warmup's dtype: the export dtype on a GPU (bf16 is what Wan runs in), float32 on a CPU, where
    half-precision matmuls are slow and the statistics gain nothing from them."""
    return TORCH_DTYPES[DTYPE_NAMES[dtype]] if device.type == "cuda" else torch.float32


def default_window(cfg: WanConfig, window: int | None) -> int:
    return cfg.chunk_frames if window is None else window


class Progress:
    """A tqdm bar on stderr (progress for long stages without a dependency in the hot path)."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, disable=None)

    def __call__(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def export_pipeline(args) -> dict:
    from ispa_export.build.export import write_artifact
    from ispa_export.plots import plot_discrepancy

    if args.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype: expected one of {sorted(DTYPE_NAMES)}, got {args.dtype!r}")
    device = resolve_device(args.device)
    name, model = load_model(args.model, args.checkpoint, args.config, args.seed)
    model = model.to(device).cast(warmup_dtype(device, args.dtype))
    cfg = model.cfg
    ctx, ctx_source = load_context(args.context, name, cfg, args.seed)
    opts = IspaOptions(kv_reduction=None if args.layers else args.kv_reduction, layers=args.layers,
                       window=args.window, sink=args.sink, warmup_chunks=args.warmup_chunks,
                       tol=args.tol, rho=args.rho, variant=args.variant, site=args.site, rank=args.rank,
                       gate=getattr(args, "gate", True), calibrate=getattr(args, "calibrate", True),
                       per_layer_spans=getattr(args, "per_layer_spans", True),
                       holdout_gap=getattr(args, "holdout_gap", 1),
                       stream_frames=getattr(args, "stream_frames", None))
    if args.warmup_chunks < 1:
        raise UserError(f"--warmup-chunks: expected >= 1, got {args.warmup_chunks}")
    bar = Progress(args.warmup_chunks, "warmup (chunks)")
    stream, monitor, tr = transition(model, ctx, args.seed, opts, progress=bar)
    bar.close()
    rep = report(model, monitor, tr, opts, dtype=DTYPE_NAMES[args.dtype])
    rep["model"], rep["context"], rep["device"] = name, ctx_source, str(device)
    out = Path(args.out)
    extras = {"discrepancy.png": lambda p: plot_discrepancy(rep, p), BAKED: lambda p: save_baked(model, p)}
    manifest = write_artifact(out, model, stream, rep, preset=name, modulation=args.modulation, dtype=args.dtype,
                              progress=lambda s: print(s, file=sys.stderr), extras=extras)
    spans = ", ".join(f"{g.name} {list(g.layers)}" for g in model.cache_groups())
    print(f"exported {out}: {len(tr.layers)}/{cfg.num_layers} layers local (cache groups {spans}), transition at chunk "
          f"{tr.chunk} ({tr.reason}), KV bytes {rep['kv_bytes_before']} -> {rep['kv_bytes_after']} "
          f"({rep['kv_reduction']:.1%} removed)")
    return manifest


def run_artifact(directory: Path, backend: str, chunks: int | None, out: Path, device: str | None = None,
                 compile: bool = False, resume: bool = False, snapshot_every: int = 0) -> dict:
    """`ispa run`: the torch backend runs the baked PyTorch model, ort/trt go through runtimes."""
    from runtimes import run as rt

    argv = [str(directory), "--out", str(out), "--snapshot-every", str(snapshot_every)]
    argv += ["--chunks", str(chunks)] if chunks is not None else []
    argv += ["--resume"] if resume else []
    if backend in ("ort", "trt"):
        code = rt.main([*argv, "--backend", backend])
        if code:
            raise SystemExit(code)
        return json.loads((out / "run.json").read_text())
    if backend != "torch":
        raise UserError(f"--backend: expected torch, ort or trt, got {backend!r}")
    from runtimes.artifact import load_artifact

    from ispa_export.video.torch_runner import TorchRunner

    args = rt.parser().parse_args(argv)
    args.backend = "torch"
    art = load_artifact(directory, check_onnx=False)
    cfg = WanConfig.from_dict(art.manifest["model"]["config"])
    # The torch backend runs in the graph's dtype: the handoff caches are stored in it.
    model = load_baked(cfg, directory / BAKED).cast(TORCH_DTYPES[art.geometry.dtype])
    return rt.generate(args, runner=TorchRunner(model, device=resolve_device(device), compile=compile))


def inspect(target: str, reduction: float, window: int | None, sink: int, dtype: str) -> dict:
    names = DTYPE_NAMES
    if dtype not in names:
        raise UserError(f"--dtype: expected fp32, fp16 or bf16, got {dtype!r}")
    path = Path(target)
    if path.is_dir():
        from runtimes.artifact import load_artifact

        art = load_artifact(path, verify_checksums=False, check_onnx=False)
        man = art.manifest
        cfg = WanConfig.from_dict(man["model"]["config"])
        layout, batch = art.geometry.layout, art.geometry.batch
        dtype_name = man["dtype"]
        title = f"artifact {path} ({man['model']['preset']})"
    else:
        cfg = get_preset(target)
        window = default_window(cfg, window)
        try:
            n = layers_for_target(cfg, reduction, window, sink)
        except ValueError as e:
            raise UserError(f"--kv-reduction/--window/--sink: {e}") from None
        # Which layers go local is decided per video at export; the bytes are not.
        layout, batch = uniform_layout(cfg.num_layers, range(cfg.num_layers - n, cfg.num_layers), sink, window), 1
        dtype_name = names[dtype]
        title = f"preset {target} at {reduction:.0%} KV reduction (window {window}, sink {sink})"
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
            f"  text cross-attention K/V (fixed per prompt): {full.cross:,} bytes"]
    return {"config": cfg.to_dict(), "modes": modes, "spans": spans, "groups": groups,
            "layer_groups": [group_name(s) for s in layout], "parameters": params, "dtype": dtype_name,
            "kv_bytes_full": full.total, "kv_bytes_ispa": ispa.total, "kv_bytes_per_layer": ispa.per_layer,
            "kv_reduction": 1 - ispa.total / full.total, "cross_kv_bytes": full.cross, "text": text}


def _meta_params(cfg: WanConfig) -> int:
    with torch.device("meta"):
        return parameter_count(WanModel(cfg))
