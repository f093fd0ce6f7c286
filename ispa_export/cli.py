"""The `ispa` command line (DESIGN.md section 10). User errors: one line on stderr, exit status 2.

The lifecycle of DESIGN.md section 11, one command a stage: `ispa build` (once per model and
settings), `ispa absorb` (per video), `ispa run DEPLOY --instance INSTANCE`; `ispa export` is the
one-shot of the three for one video (build with that video as the calibration, then its absorb).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ispa_export.args import eval_arguments, fraction, layers, seeds
from ispa_export.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="preset: demo (trained, default), tiny, wan2.1-t2v-1.3b, wan2.1-t2v-14b")
    p.add_argument("--checkpoint", help="weights (.safetensors, sharded index, .pt/.pth) for the preset named by --config")
    p.add_argument("--config", help="preset whose architecture the checkpoint has")
    p.add_argument("--device", help="cpu | cuda | cuda:N: where the warmups, monitor and solve run "
                   "(default: cuda when PyTorch sees one)")


def _build_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--kv-reduction", type=fraction, default=0.5, help="fraction of steady-state KV bytes to remove")
    p.add_argument("--layers", type=layers, help="explicit L-layers (comma-separated) instead of --kv-reduction")
    p.add_argument("--window", type=int, help="recent frames an L-layer keeps (default: the policy picks the span "
                   "from one chunk up to half the full cache)")
    p.add_argument("--sink", type=int, help="first frames of the video an L-layer keeps (default: 1 where the "
                   "full cache keeps frame 0 for the whole stream, else 0; with --window alone, 0)")
    p.add_argument("--stream-frames", type=int, help="frames the deployment generates (default: unbounded); at most "
                   "the full cache's capacity means nothing is ever evicted, so L-layers may keep a sink frame")
    p.add_argument("--per-layer-spans", action=argparse.BooleanOptionalAction, default=True,
                   help="let the per-layer DP (one cache group per distinct span) challenge the uniform layout")
    p.add_argument("--no-gate", dest="gate", action="store_false", help="keep every L-layer's correction, "
                   "even where it does not lower the held-out discrepancy")
    p.add_argument("--corrections", default="auto", help="the deployment's verdict on per-video corrections: auto "
                   "(the output gate on the calibration videos decides), on (each video's per-layer gate alone), off")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="weigh every layer's "
                   "discrepancy alike instead of by its measured effect on the prediction")
    p.add_argument("--holdout-gap", type=int, default=1, help="chunks between a fit and the warmup chunk that "
                   "scores it (default 1: a staler fit, as after the transition)")
    p.add_argument("--warmup-chunks", type=int, default=8, help="most chunks generated before the transition")
    p.add_argument("--tol", type=float, default=0.05, help="convergence tolerance of the held-out corrected discrepancy")
    p.add_argument("--variant", default="full", help="full | per_pass | bias | none")
    p.add_argument("--site", default="wo", help="wo (fold into W_o) | adapter (parallel linear from the attention input)")
    p.add_argument("--rank", type=int, help="rank-k truncation of each correction")
    p.add_argument("--rho", type=float, help="ridge strength (default: chosen per layer on held-out warmup chunks)")
    p.add_argument("--modulation", default="input", help="input (graph inputs, default: one engine serves several "
                   "videos at once) | baked (refittable constants)")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16: the graph's dtype, and the warmup's "
                   "on a GPU (on a CPU the warmup runs in fp32)")
    p.add_argument("--vae", metavar="DIR", help="a Wan2.1 VAE (diffusers AutoencoderKLWan: a Wan diffusers root with "
                   "vae/, or the vae folder): its streaming decoder is exported beside the DiT (DEPLOY/decoder), so "
                   "runs write video.mp4")


def _context_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", help="text embeddings: safetensors file with tensor 'context' [B, tokens, text_dim] "
                   "(default: the demo's fixed prompt, or seeded random embeddings for other presets)")
    p.add_argument("--prompt", help="a prompt, encoded by --text-encoder (umT5) as diffusers' WanPipeline does")
    p.add_argument("--text-encoder", metavar="DIR", help="a umT5 encoder and its tokenizer (a Wan diffusers "
                   "checkpoint's root, or one directory holding both)")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="ispa", description="Instance-Specific Parametric Absorption: halve the KV cache of a streaming "
               "video DiT and deploy it as a static graph, built once and absorbed per video.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    b = sub.add_parser("build", help="once per model and settings: calibration warmups -> one layout -> graph")
    _build_arguments(b)
    b.add_argument("--calibration-seeds", type=seeds, default=[0, 1, 2, 3],
                   help="seeds of the calibration warmups (default 0,1,2,3)")
    b.add_argument("--calibration-contexts", metavar="FILES", help="comma-separated context files for the "
                   "calibration warmups (default: the model's default context); video i takes seed i and context i, "
                   "each list repeating as needed")
    b.add_argument("--engine", action="store_true", help="also build the TensorRT engine (ispa engine DEPLOY)")
    b.add_argument("--out", required=True, help="deployment directory (replaced atomically)")

    a = sub.add_parser("absorb", help="per video: warmup on the deployment's layout, solve, gates -> INSTANCE")
    a.add_argument("deployment", metavar="DEPLOY")
    _context_arguments(a)
    a.add_argument("--seed", type=int, required=True)
    a.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when PyTorch sees one)")
    a.add_argument("--out", required=True, help="instance directory (replaced atomically)")

    e = sub.add_parser("export", help="one-shot: build with one video as the calibration, then absorb it into DIR/instance")
    _build_arguments(e)
    _context_arguments(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True, help="directory (replaced atomically): a deployment and DIR/instance")

    c = sub.add_parser("encode", help="a prompt -> umT5 text embeddings (the --context file), as WanPipeline "
                       "makes them")
    c.add_argument("prompt")
    c.add_argument("--text-encoder", metavar="DIR", required=True, help="a umT5 encoder and its tokenizer (a Wan "
                   "diffusers checkpoint's root, or one directory holding both)")
    c.add_argument("--out", required=True, help="safetensors file with tensor 'context' [1, max_length, d_model]")
    c.add_argument("--max-length", type=int, default=512, help="tokens (padded, truncated), 512 as Wan (default)")
    c.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")

    d = sub.add_parser("decode", help="a finished latent run (its frames.npy) -> H.264 mp4, with the PyTorch "
                       "streaming decode of a Wan VAE")
    d.add_argument("frames", metavar="FRAMES.npy")
    d.add_argument("--vae", metavar="DIR", required=True, help="a Wan2.1 VAE (a Wan diffusers root with vae/, or "
                   "the vae folder)")
    d.add_argument("--out", required=True, help="the mp4 to write (replaced atomically at the end)")
    d.add_argument("--chunk-frames", type=int, default=3, help="latent frames decoded a step (default 3; the "
                   "pixels do not depend on it)")
    d.add_argument("--fps", type=float, default=16.0, help="frame rate (default 16, Wan's)")
    d.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when PyTorch sees one)")

    r = sub.add_parser("run", help="generate a video's chunks from its instance")
    r.add_argument("deployment", metavar="DEPLOY")
    r.add_argument("--instance", metavar="INSTANCE", help="from `ispa absorb` (default: DEPLOY/instance, as "
                   "`ispa export` leaves it)")
    r.add_argument("--backend", default="ort", help="torch | ort | trt")
    r.add_argument("--chunks", type=int, help="chunks to generate (with --resume: the run's own when left out)")
    r.add_argument("--out", required=True)
    r.add_argument("--device", help="torch backend: cpu | cuda | cuda:N (default: cuda when PyTorch sees one)")
    r.add_argument("--compile", action="store_true", help="torch backend: run the step through torch.compile")
    r.add_argument("--engine", help="trt backend: engine file (default: the one listed in the manifest)")
    r.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="store the stream state every N chunks for --resume (0: never)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last snapshot")
    r.add_argument("--vae", metavar="DIR", help="decode the chunks into OUT/video.mp4 with this Wan2.1 VAE in "
                   "PyTorch (default: with DEPLOY's exported decoder, torch-free, when it has one)")
    r.add_argument("--no-video", action="store_true", help="write no video.mp4")

    i = sub.add_parser("inspect", help="configuration, layer modes, exact KV bytes (preset, deployment or instance)")
    i.add_argument("target", metavar="PRESET|DEPLOY|INSTANCE")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kv-reduction", type=fraction, default=0.5)
    i.add_argument("--window", type=int)
    i.add_argument("--sink", type=int)
    i.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")

    eval_arguments(sub.add_parser("eval", help="quality of ISPA vs token dropping on the demo model"))

    s = sub.add_parser("bench", help="memory, latency and scaling benchmarks")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--out", default="artifacts/bench")
    s.add_argument("--device", help="cpu | cuda | cuda:N: cuda also times the real-size model (default: cuda when "
                   "PyTorch sees one)")
    s.add_argument("--stream", metavar="DEPLOY", default=None,
                   help="instead: resident memory of a 10,000-chunk ONNX Runtime stream of DEPLOY's instance "
                        "(python -m ispa_export.lab.bench_stream; its section goes into --out/BENCHMARKS.md)")

    g = sub.add_parser("engine", help="build a TensorRT engine beside the ONNX")
    g.add_argument("deployment", metavar="DEPLOY")
    g.add_argument("--workspace-gib", type=float, default=4.0)

    f = sub.add_parser("verify", help="parity of the exported graph with the golden PyTorch step")
    f.add_argument("deployment", metavar="DEPLOY")
    f.add_argument("--trt", action="store_true", help="compare TensorRT against ONNX Runtime as well")
    f.add_argument("--instance", metavar="INSTANCE", help="check a video instead of the golden step: its next pass "
                   "with its own caches and modulation, PyTorch run now against the engines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (UserError, FileNotFoundError) as e:
        print(f"ispa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # runtimes' ArtifactError and the driver's shape checks are ValueErrors with one-line messages.
        if type(e).__name__ in ("ArtifactError", "RunError", "VideoError"):
            print(f"ispa {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    except RuntimeError as e:
        if type(e).__name__ == "BackendError":
            print(f"ispa {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _options(args):
    from ispa_export.builder.calibrate import IspaOptions

    return IspaOptions(kv_reduction=None if args.layers else args.kv_reduction, layers=args.layers,
                       window=args.window, sink=args.sink, warmup_chunks=args.warmup_chunks, tol=args.tol,
                       rho=args.rho, variant=args.variant, site=args.site, rank=args.rank, gate=args.gate,
                       calibrate=args.calibrate, per_layer_spans=args.per_layer_spans, holdout_gap=args.holdout_gap,
                       stream_frames=args.stream_frames, corrections=args.corrections)


def _context(args, name: str, cfg, seed: int):
    """The video's text embeddings: --prompt through --text-encoder, --context, or the default."""
    from ispa_export.models import load_context

    if args.prompt is not None or args.text_encoder is not None:
        if args.context:
            raise UserError("--context and --prompt: expected one of them, found both")
        if args.prompt is None or args.text_encoder is None:
            raise UserError("--prompt/--text-encoder: expected both (a prompt and the umT5 directory that encodes it)")
        from ispa_export.text import clean, load_text_encoder

        if not clean(args.prompt):
            raise UserError(f"--prompt: empty after cleaning ({args.prompt[:40]!r}); expected a description of the video")
        encoder = load_text_encoder(args.text_encoder, text_dim=cfg.text_dim)
        ctx = encoder.encode(args.prompt, max_length=cfg.text_len).float().cpu()
        return ctx, f"prompt {args.prompt!r} ({args.text_encoder})"
    return load_context(args.context, name, cfg, seed)


def _model(args):
    from ispa_export.models import DTYPE_NAMES, load_model, resolve_device, warmup_dtype

    if args.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype: expected one of {sorted(DTYPE_NAMES)}, got {args.dtype!r}")
    if args.modulation not in ("input", "baked"):
        raise UserError(f"--modulation: expected 'input' or 'baked', got {args.modulation!r}")
    device = resolve_device(args.device)
    # A preset without weights gets random ones of seed 0: the deployment's, whatever video comes.
    name, model = load_model(args.model, args.checkpoint, args.config, 0)
    return name, model.to(device).cast(warmup_dtype(device, args.dtype)), device


def _vae(args, cfg):
    """--vae loaded on the CPU (the decoder is traced there) and checked against the DiT, before any
    slow work; None without --vae."""
    if not getattr(args, "vae", None):
        return None
    from ispa_export.vae import check_vae, load_vae

    vae = load_vae(args.vae)
    check_vae(vae, cfg.in_dim)
    return vae


def _progress(total: int, desc: str):
    from ispa_export.models import Progress
    return Progress(total, desc)


def _log(s: str) -> None:
    print(s, file=sys.stderr)


def cmd_build(args) -> int:
    from ispa_export.builder.pipeline import Video, build
    from runtimes.files import atomic_directory

    name, model, _ = _model(args)
    vae = _vae(args, model.cfg)
    opts = _options(args)
    files = [f for f in (args.calibration_contexts or "").split(",") if f] or [None]
    n = max(len(args.calibration_seeds), len(files))
    videos = []
    for k in range(n):
        seed = args.calibration_seeds[k % len(args.calibration_seeds)]
        ctx, src = _context(argparse.Namespace(context=files[k % len(files)], prompt=None, text_encoder=None),
                            name, model.cfg, seed)
        videos.append(Video(ctx.to(next(model.parameters()).device), seed, src))
    bar = _progress(n * 2 * opts.warmup_chunks, f"calibration warmups ({n} videos)")
    out = Path(args.out)
    with _writable(out), atomic_directory(out) as tmp:
        built = build(model, videos, opts, tmp, preset=name, modulation=args.modulation, dtype=args.dtype,
                      progress=bar, log=_log, vae=vae)
    bar.close()
    print(f"built {out}: {''.join('F' if s is None else 'L' for s in built.layout)}, "
          f"{built.manifest['calibration']['kv_reduction']:.1%} KV removed, corrections "
          f"{'allowed' if built.rule.allowed else 'off'}; absorb a video with `ispa absorb {out} --seed N --out DIR`")
    if args.engine:
        from ispa_export.builder.engine import build_for_artifact
        build_for_artifact(out, workspace_bytes=4 << 30)
    return 0


def cmd_absorb(args) -> int:
    import time

    from ispa_export.deployment import Deployment
    from ispa_export.plots import plot_discrepancy

    t0 = time.perf_counter()
    dep = Deployment.open(args.deployment, backend=None, device=args.device)
    cfg_name = dep.artifact.manifest["model"]["preset"]
    from graphs.config import WanConfig

    ctx, src = _context(args, cfg_name, WanConfig.from_dict(dep.artifact.manifest["model"]["config"]), args.seed)
    out = Path(args.out)
    with _writable(out):
        bar = _progress(dep.rule.warmup_chunks, "warmup (chunks)")
        absorbed = dep.absorb(ctx, args.seed, progress=bar)
        bar.close()
        record = dep.write(absorbed, out, context_source=src,
                           extras={"discrepancy.png": lambda p: plot_discrepancy(absorbed.report, p)})
    s = absorbed.seconds
    print(f"absorbed {out}: transition at chunk {absorbed.transition_chunk} ({absorbed.report['transition_reason']}), "
          f"corrections kept on {len(record['kept_corrections'])} of {len(absorbed.report['selected_layers'])} "
          f"L-layers; warmup {s['warmup']:.2f} s, solve {s['solve']:.3f} s, cut {s['cut']:.3f} s, write "
          f"{s['write']:.2f} s (total {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_export(args) -> int:
    from ispa_export.builder.pipeline import Video, build
    from ispa_export.plots import plot_discrepancy
    from ispa_export.video.absorb import complete, write_instance
    from runtimes.files import atomic_directory, sha256_file

    name, model, _ = _model(args)
    vae = _vae(args, model.cfg)
    opts = _options(args)
    ctx, src = _context(args, name, model.cfg, args.seed)
    out = Path(args.out)
    bar = _progress(2 * opts.warmup_chunks, "warmups (chunks)")
    with _writable(out), atomic_directory(out) as tmp:
        built = build(model, [Video(ctx.to(next(model.parameters()).device), args.seed, src)], opts, tmp, preset=name,
                      modulation=args.modulation, dtype=args.dtype, progress=bar, log=_log, keep_warmups=True,
                      vae=vae)
        bar.close()
        dtype = built.manifest["dtype"]
        absorbed = complete(built.model, built.layout, built.warmups[0], built.rule, modulation=args.modulation,
                            dtype=dtype)
        write_instance(absorbed, tmp / "instance", deployment=out, deployment_sha256=sha256_file(tmp / "manifest.json"),
                       dtype=dtype, context_source=src, atomic=False,
                       extras={"discrepancy.png": lambda p: plot_discrepancy(absorbed.report, p)})
    rep = absorbed.report
    groups = ", ".join(f"{g['name']} {g['layers']}" for g in built.manifest["caches"])
    print(f"exported {out}: {len(rep['selected_layers'])}/{model.cfg.num_layers} layers local (cache groups {groups}), "
          f"transition at chunk {rep['transition_chunk']} ({rep['transition_reason']}), KV bytes "
          f"{rep['kv_bytes_before']} -> {rep['kv_bytes_after']} ({rep['kv_reduction']:.1%} removed), corrections kept "
          f"on {len(rep['kept_corrections'])} layers"
          + (f"; VAE decoder in {out / 'decoder'}" if vae is not None else ""))
    return 0


class _writable:
    """An --out whose parent cannot be created or written is one line, before any work is lost."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        import os

        parent = self.out.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot create {parent} ({e.strerror})") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--out {self.out}: expected a writable directory {parent}, found it read-only")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: expected a directory (new or to replace), found a file")
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            raise UserError(f"--out {self.out}: {error.strerror or error}; nothing was written") from None
        return False


def _torch_decoder(args):
    """--vae: the PyTorch streaming decode (ispa_export.vae) for `runtimes.run`, checked against the
    deployment's latents before anything runs."""
    from ispa_export.models import resolve_device
    from ispa_export.vae import TorchVideoDecoder, check_vae, load_vae, weights_sha256
    from runtimes.artifact import load_artifact
    from runtimes.run import VideoDecoder

    geo = load_artifact(args.deployment, verify_checksums=False, check_onnx=False).geometry
    vae = load_vae(args.vae, device=resolve_device(args.device))
    check_vae(vae, geo.channels)
    dec = TorchVideoDecoder(vae, batch=geo.batch, latent_height=geo.height, latent_width=geo.width)
    return VideoDecoder(dec, "torch", str(Path(args.vae).resolve()), weights_sha256(args.vae), dec.width * geo.batch,
                        dec.height)


def cmd_run(args) -> int:
    from runtimes import run as rt

    argv = [str(args.deployment), "--out", str(args.out), "--snapshot-every", str(args.snapshot_every)]
    argv += ["--chunks", str(args.chunks)] if args.chunks is not None else []
    argv += ["--resume"] if args.resume else []
    argv += ["--instance", str(args.instance)] if args.instance else []
    argv += ["--no-video"] if args.no_video else []
    if args.vae and args.no_video:
        raise UserError("--vae and --no-video: expected one of them, found both")
    decoder = _torch_decoder(args) if args.vae else None
    if args.backend in ("ort", "trt"):
        argv += ["--backend", args.backend] + (["--engine", args.engine] if args.engine else [])
        rt.generate(rt.parser().parse_args(argv), decoder=decoder)
        return 0
    if args.backend != "torch":
        raise UserError(f"--backend: expected torch, ort or trt, got {args.backend!r}")
    from ispa_export.deployment import Deployment

    dep = Deployment.open(args.deployment, backend="torch", device=args.device, compile=args.compile)
    rt_args = rt.parser().parse_args(argv)
    rt_args.backend = "torch"
    rt.generate(rt_args, deployment=dep.runtime, decoder=decoder)
    return 0


def cmd_encode(args) -> int:
    from transformers.utils import logging as transformers_logging

    from ispa_export.models import resolve_device
    from ispa_export.text import encode_to_file

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: the summary line says it

    info = encode_to_file(args.prompt, args.text_encoder, args.out, device=resolve_device(args.device),
                          max_length=args.max_length)
    print(f"encoded {info['path']}: context {info['shape']}, {info['tokens']} tokens"
          f"{' (truncated)' if info['truncated'] else ''}; encoder loaded in {info['load_seconds']:.2f} s, "
          f"prompt encoded in {info['seconds']:.3f} s")
    return 0


def cmd_decode(args) -> int:
    from ispa_export.vae import decode_run

    info = decode_run(args.frames, args.vae, args.out, chunk_frames=args.chunk_frames, fps=args.fps,
                      device=args.device, log=_log)
    print(f"decoded {info['path']}: {info['frames']} frames {info['width']}x{info['height']} at {info['fps']:g} fps "
          f"from {info['latent_frames']} latent frames ({info['seconds']:.1f} s)")
    return 0


def cmd_inspect(args) -> int:
    from ispa_export.inspect import inspect
    info = inspect(args.target, args.kv_reduction, args.window, args.sink, args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for line in info["text"]:
            print(line)
    return 0


def cmd_eval(args) -> int:
    from ispa_export.lab.evaluate import main as eval_main
    return eval_main(args)


def cmd_bench(args) -> int:
    if args.stream:
        import subprocess
        # A process of its own: the RSS it reports is the runtime's, not this one's PyTorch.
        out = Path(args.out)
        return subprocess.call([sys.executable, "-m", "ispa_export.lab.bench_stream", "--artifact", args.stream,
                                "--out", str(out / "stream"), "--markdown", str(out / "BENCHMARKS.md")])
    from ispa_export.lab.bench import main as bench_main
    return bench_main(args)


def cmd_engine(args) -> int:
    from ispa_export.builder.engine import build_for_artifact
    build_for_artifact(Path(args.deployment), workspace_bytes=int(args.workspace_gib * 2**30))
    return 0


def cmd_verify(args) -> int:
    from ispa_export.builder.verify import verify
    return verify(Path(args.deployment), trt=args.trt, instance=args.instance)


COMMANDS = {"build": cmd_build, "absorb": cmd_absorb, "export": cmd_export, "run": cmd_run, "encode": cmd_encode,
            "decode": cmd_decode, "inspect": cmd_inspect,
            "eval": cmd_eval, "bench": cmd_bench, "engine": cmd_engine, "verify": cmd_verify}

if __name__ == "__main__":
    sys.exit(main())
