"""`python -m ispa_export.lab.bench_stream`: resident memory of one long ONNX Runtime stream (issue 14).

Runs runtimes.run.generate on an artifact in this process and reads VmRSS from /proc/self/status
at chunks 1, 100, 500, 1,000, 10,000 (those the run reaches) and at its last chunk. Imports nothing but
runtimes and the standard library (not torch, not the rest of ispa_export), so the numbers are the
deployed runtime's. Writes OUT/stream_memory.json and, with --markdown FILE, puts its section into
that file between two marker comments (replacing an earlier one). A benchmark, not a test: a
10,000-chunk run of the demo takes minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from runtimes import run as rt
from runtimes.files import write_json_atomic

CHECKPOINTS = (1, 100, 500, 1_000, 10_000)
BEGIN, END = "<!-- stream-memory:begin -->", "<!-- stream-memory:end -->"


def rss_bytes() -> int:
    """Resident set size now (VmRSS), in bytes; Linux only."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def measure(artifact: Path, chunks: int, out: Path, threads: int | None = None) -> dict[str, Any]:
    """One run of `chunks` chunks into out/run; RSS at each checkpoint the run reaches."""
    marks = sorted({c for c in CHECKPOINTS if c <= chunks} | {chunks})
    rss: dict[int, int] = {}
    times: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_chunk(done: int) -> None:
        if done in marks:
            rss[done] = rss_bytes()
            times[done] = time.perf_counter() - t0

    argv = [str(artifact), "--chunks", str(chunks), "--out", str(out / "run"), "--quiet", "--no-preview"]
    argv += ["--threads", str(threads)] if threads else []
    args = rt.parser().parse_args(argv)
    rss_before = rss_bytes()
    error = None
    try:
        record = rt.generate(args, on_chunk=on_chunk)
    except Exception as e:  # the run's own failure is a result here (e.g. a graph's position limit)
        error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        record = json.loads((out / "run" / "run.json").read_text())
    frames_bytes = (out / "run" / "frames.npy").stat().st_size
    return {
        "artifact": str(artifact), "chunks_requested": chunks, "chunks_done": record.get("chunks_done"),
        "error": error, "rss_before_run_bytes": rss_before,
        "rss_bytes": {str(k): v for k, v in rss.items()},
        "seconds_at": {str(k): round(v, 3) for k, v in times.items()},
        "frames_file_bytes": frames_bytes,
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": _ort_version(), "threads": threads},
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def markdown(res: dict[str, Any], command: str) -> str:
    rss = {int(k): v for k, v in res["rss_bytes"].items()}
    rows = "\n".join(f"| {k:,} | {v / 2**20:.1f} | {res['seconds_at'][str(k)]:.1f} |" for k, v in sorted(rss.items()))
    lines = [BEGIN, "## Long stream: resident memory (ONNX Runtime)", "",
             f"Command: `{command}`. {res['machine']['cpu']}, {res['machine']['cores']} cores, onnxruntime "
             f"{res['machine']['onnxruntime']}. Frames go to `frames.npy` as each chunk is made "
             f"({res['frames_file_bytes'] / 2**20:.1f} MiB on disk at the end); RSS is VmRSS of the process.", "",
             "| chunks done | RSS (MiB) | seconds |", "|---|---|---|", rows, ""]
    ks = sorted(rss)
    if len(ks) >= 2 and 1_000 in rss:
        last = ks[-1]
        lines.append(f"RSS at chunk {last:,} / at chunk 1,000: {rss[last] / rss[1_000]:.3f}.")
    if res["error"]:
        lines.append(f"The run stopped after {res['chunks_done']:,} of {res['chunks_requested']:,} chunks: "
                     f"`{res['error']}`.")
    lines.append(END)
    return "\n".join(lines) + "\n"


def upsert_section(path: Path, section: str) -> None:
    """Puts `section` into the markdown file, in place of an earlier one or at the end."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ispa_export.lab.bench_stream", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/demo", help="export directory (make export)")
    p.add_argument("--chunks", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", default="artifacts/bench_stream")
    p.add_argument("--markdown", default=None, metavar="FILE", help="put the result section into FILE")
    args = p.parse_args(argv)
    artifact, out = Path(args.artifact), Path(args.out)
    if not (artifact / "manifest.json").is_file():
        print(f"error: {artifact}: expected an artifact directory (make export), found none", file=sys.stderr)
        return 2
    if args.chunks < 1:
        print(f"error: --chunks: expected an integer >= 1, found {args.chunks}", file=sys.stderr)
        return 2
    res = measure(artifact, args.chunks, out, args.threads)
    command = "python -m ispa_export.lab.bench_stream " + " ".join(argv if argv is not None else sys.argv[1:])
    res["command"] = command.strip()
    write_json_atomic(out / "stream_memory.json", res)
    if args.markdown:
        upsert_section(Path(args.markdown), markdown(res, res["command"]))
    print(json.dumps({k: res[k] for k in ("chunks_done", "rss_bytes", "seconds_at", "error")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
