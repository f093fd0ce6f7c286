"""The `ispa` command line (DESIGN.md section 10). User errors: one line on stderr, exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ispa_export.args import eval_arguments, fraction, layers
from ispa_export.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ispa", description="Instance-Specific Parametric Absorption: "
                                "halve the KV cache of a streaming video DiT and export it as a static graph.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="warmup, solve, bake, export ONNX + handoff state")
    e.add_argument("--model", default="demo", help="preset: demo (trained, default), tiny, wan2.1-t2v-1.3b, wan2.1-t2v-14b")
    e.add_argument("--checkpoint", help="weights (.safetensors, sharded index, .pt/.pth) for the preset named by --config")
    e.add_argument("--config", help="preset whose architecture the checkpoint has")
    e.add_argument("--context", help="text embeddings: safetensors file with tensor 'context' [B, tokens, text_dim]")
    e.add_argument("--kv-reduction", type=fraction, default=0.5, help="fraction of steady-state KV bytes to remove")
    e.add_argument("--layers", type=layers, help="explicit L-layers (comma-separated) instead of --kv-reduction")
    e.add_argument("--window", type=int, help="recent frames an L-layer keeps (default: the policy picks the span "
                   "from one chunk up to half the full cache)")
    e.add_argument("--sink", type=int, help="first frames of the video an L-layer keeps (default: 1 where the "
                   "full cache keeps frame 0 for the whole stream, else 0; with --window alone, 0)")
    e.add_argument("--stream-frames", type=int, help="frames the deployment generates (default: unbounded); at most "
                   "the full cache's capacity means nothing is ever evicted, so L-layers may keep a sink frame")
    e.add_argument("--per-layer-spans", action=argparse.BooleanOptionalAction, default=True,
                   help="let the per-layer DP (one cache group per distinct span) challenge the uniform layout")
    e.add_argument("--no-gate", dest="gate", action="store_false", help="keep every L-layer's correction, "
                   "even where it does not lower the held-out discrepancy")
    e.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="weigh every layer's "
                   "discrepancy alike instead of by its measured effect on the prediction")
    e.add_argument("--holdout-gap", type=int, default=1, help="chunks between a fit and the warmup chunk that "
                   "scores it (default 1: a staler fit, as after the transition)")
    e.add_argument("--warmup-chunks", type=int, default=8, help="most chunks generated before the transition")
    e.add_argument("--tol", type=float, default=0.05, help="convergence tolerance of the held-out corrected discrepancy")
    e.add_argument("--variant", default="full", help="full | per_pass | bias | none")
    e.add_argument("--site", default="wo", help="wo (fold into W_o) | adapter (parallel linear from the attention input)")
    e.add_argument("--rank", type=int, help="rank-k truncation of each correction")
    e.add_argument("--rho", type=float, help="ridge strength (default: chosen per layer on held-out warmup chunks)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--modulation", default="baked", help="baked (refittable constants) | input (graph inputs)")
    e.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16: the exported graph's dtype, and the warmup's "
                   "on a GPU (on a CPU the warmup runs in fp32)")
    e.add_argument("--device", help="cpu | cuda | cuda:N: where the warmup, monitor, solve and bake run "
                   "(default: cuda when PyTorch sees one)")
    e.add_argument("--out", required=True, help="artifact directory (replaced atomically)")

    r = sub.add_parser("run", help="generate the rest of the video from an artifact")
    r.add_argument("artifact", metavar="DIR")
    r.add_argument("--backend", default="ort", help="torch | ort | trt")
    r.add_argument("--chunks", type=int, help="chunks to generate (with --resume: the run's own when left out)")
    r.add_argument("--out", required=True)
    r.add_argument("--device", help="torch backend: cpu | cuda | cuda:N (default: cuda when PyTorch sees one)")
    r.add_argument("--compile", action="store_true", help="torch backend: run the step through torch.compile")
    r.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="store the stream state every N chunks for --resume (0: never)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last snapshot")

    i = sub.add_parser("inspect", help="configuration, layer modes, exact KV bytes")
    i.add_argument("target", metavar="PRESET|DIR")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kv-reduction", type=fraction, default=0.5)
    i.add_argument("--window", type=int)
    i.add_argument("--sink", type=int, default=0)
    i.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")

    eval_arguments(sub.add_parser("eval", help="quality of ISPA vs token dropping on the demo model"))

    b = sub.add_parser("bench", help="memory, latency and scaling benchmarks")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default="artifacts/bench")
    b.add_argument("--device", help="cpu | cuda | cuda:N: cuda also times the real-size model (default: cuda when "
                   "PyTorch sees one)")
    b.add_argument("--stream", metavar="DIR", default=None,
                   help="instead: resident memory of a 10,000-chunk ONNX Runtime stream of the artifact DIR "
                        "(python -m ispa_export.lab.bench_stream; its section goes into --out/BENCHMARKS.md)")

    g = sub.add_parser("engine", help="build a TensorRT engine beside the ONNX")
    g.add_argument("artifact", metavar="DIR")
    g.add_argument("--workspace-gib", type=float, default=4.0)

    f = sub.add_parser("verify", help="parity of the exported graph with the golden PyTorch step")
    f.add_argument("artifact", metavar="DIR")
    f.add_argument("--trt", action="store_true", help="compare TensorRT against ONNX Runtime as well")
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
        if type(e).__name__ in ("ArtifactError", "BackendError", "RunError"):
            print(f"ispa {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def cmd_export(args) -> int:
    from ispa_export.pipeline import export_pipeline
    export_pipeline(args)
    return 0


def cmd_run(args) -> int:
    from ispa_export.pipeline import run_artifact
    run_artifact(Path(args.artifact), args.backend, args.chunks, Path(args.out), device=args.device,
                 compile=args.compile, resume=args.resume, snapshot_every=args.snapshot_every)
    return 0


def cmd_inspect(args) -> int:
    from ispa_export.pipeline import inspect
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
    from ispa_export.build.engine import build_for_artifact
    build_for_artifact(Path(args.artifact), workspace_bytes=int(args.workspace_gib * 2**30))
    return 0


def cmd_verify(args) -> int:
    from ispa_export.build.verify import verify
    return verify(Path(args.artifact), trt=args.trt)


COMMANDS = {"export": cmd_export, "run": cmd_run, "inspect": cmd_inspect, "eval": cmd_eval, "bench": cmd_bench,
            "engine": cmd_engine, "verify": cmd_verify}

if __name__ == "__main__":
    sys.exit(main())
