"""Parity of an export: golden PyTorch I/O written at export, ONNX Runtime (and TensorRT) compared
against it.

`save_golden` runs the PyTorch chunk step (the model that was traced) on the graph's example inputs
and writes one binary file, golden.safetensors, small whatever the model: the step's per-step
inputs (latents, timestep, RoPE angles, masks, pass kind), the prediction in full, and of each new
K/V output a fixed, evenly strided set of at most KV_TOKENS tokens (axis 3), recorded in the file's
metadata. A deployment holds no video, so the large inputs (caches, text K/V, modulation inputs)
are synthetic: seeded standard normal draws (`synthetic_state`, numpy's PCG64, the same on every
platform) that verify draws again, and whose sha256 the file records. At Wan 1.3B (bf16) the file
is about 13 MB.

`verify` rebuilds the full feeds from the seed and the golden inputs, runs ONNX Runtime
(runtimes.ort.OrtRunner, CPU provider) and, when asked, TensorRT (Polygraphy's TrtRunner), slices
their new K/V outputs the same way, and compares with Polygraphy's SimpleCompareFunc: an element
fails only where it exceeds both the absolute and the relative tolerance (relative to the PyTorch
value). bfloat16 values are widened to float32 (exactly) before the comparison.

No stock `polygraphy run` line repeats this check: its --load-inputs/--load-outputs take whole
feeds and whole outputs as JSON, and nothing in it slices outputs, so the old JSON files (which
held the caches: GBs at real size) are gone.

API used (Polygraphy 0.53): comparator.IterationResult, SimpleCompareFunc (called on two
IterationResults: a dict of OutputCompareResult), backend.trt.TrtRunner / EngineFromBytes / BytesFromPath.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtimes.files import atomic_path
from runtimes.groups import is_cache_name, is_new_kv_name, output_names

from ispa_export.errors import UserError

if TYPE_CHECKING:  # torch and the model stay lazy imports: `ispa verify` does not need them
    from graphs.wan import WanModel

GOLDEN = "golden.safetensors"
GOLDEN_FORMAT = "ispa-golden"
GOLDEN_VERSION = "1"
GOLDEN_RUNNER = "pytorch"
# New K/V outputs (`new_<group>`, runtimes.groups) [layers, 2, batch, chunk_frames*tokens_per_frame, heads,
# head_dim]: the golden file keeps at most KV_TOKENS tokens of axis KV_AXIS, evenly strided over the
# chunk's frames (all layers, both K and V, all heads). Wan 1.3B bf16: 30 layers x 2 x 64 x 12 x 128 x
# 2 bytes = 11.8 MB, whatever the groups.
KV_AXIS = 3
KV_TOKENS = 64
INPUT_PREFIX, OUTPUT_PREFIX, STATE_SHA_PREFIX = "input.", "output.", "state_sha256."
STATE_SEED = 0  # the synthetic state's seed (recorded in the golden file)

# (atol, rtol) per graph dtype and backend, elementwise. ONNX Runtime: measured on CPU against
# PyTorch eager (tiny and medium configs, docs/tensorrt.md), max abs error 1.3e-6 (float32) and
# 3.9e-3 (float16) on O(1) outputs; a graph bug moves outputs by O(1). TensorRT keeps TF32 on for
# float32 GEMMs (the builder's default): PyTorch with TF32-rounded GEMM inputs was off by <= 1.8e-3,
# so float32 engines get the float16 tolerance. bfloat16 (8 mantissa bits to float16's 11): float16's
# tolerances doubled; the tiny bf16 export run by onnx.reference (ONNX Runtime's CPU provider has no
# bf16 Conv) was off by at most 2.3e-2 on outputs up to 3.4. TensorRT: not yet measured on a GPU.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "float32": {"onnxrt": (1e-4, 1e-3), "tensorrt": (2e-2, 2e-2)},
    "float16": {"onnxrt": (2e-2, 2e-2), "tensorrt": (4e-2, 4e-2)},
    "bfloat16": {"onnxrt": (4e-2, 4e-2), "tensorrt": (8e-2, 8e-2)},
}


# -- what the golden file holds ---------------------------------------------------------------------

def is_state_input(name: str) -> bool:
    """Graph inputs a video's state holds (the cache groups, text K/V, modulation "input" constants):
    the golden file leaves them out and verify draws them again (synthetic_state)."""
    return is_cache_name(name) or name in ("cross_kv", "ispa_weight", "ispa_bias")


def kv_token_slice(tokens: int, count: int = KV_TOKENS) -> slice:
    """At most `count` of `tokens` positions, evenly strided from the first (every frame of the chunk)."""
    if count < 1:
        raise ValueError(f"kv_tokens: expected >= 1, got {count}")
    return slice(0, tokens, max(1, math.ceil(tokens / count)))


def golden_layout(inputs: dict[str, tuple[tuple[int, ...], str]], outputs: dict[str, tuple[tuple[int, ...], str]],
                  kv_tokens: int = KV_TOKENS) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors golden.safetensors holds for a graph with these inputs/outputs ((shape, dtype) by
    name): its file keys, shapes and dtypes. The state's inputs are left out; new K/V are sliced."""
    out = {INPUT_PREFIX + n: (tuple(s), d) for n, (s, d) in inputs.items() if not is_state_input(n)}
    for n, (s, d) in outputs.items():
        s = tuple(s)
        if is_new_kv_name(n):
            s = s[:KV_AXIS] + (len(range(s[KV_AXIS])[kv_token_slice(s[KV_AXIS], kv_tokens)]),) + s[KV_AXIS + 1:]
        out[OUTPUT_PREFIX + n] = (s, d)
    return out


def layout_nbytes(layout: dict[str, tuple[tuple[int, ...], str]]) -> int:
    from runtimes.buffers import host_dtype

    return sum(math.prod(s) * host_dtype(d).itemsize for s, d in layout.values())


def slice_outputs(outputs: dict[str, np.ndarray], kv: slice) -> dict[str, np.ndarray]:
    """The outputs as the golden file keeps them: new K/V reduced to the tokens `kv` of axis KV_AXIS."""
    index = (slice(None),) * KV_AXIS + (kv,)
    return {n: (np.ascontiguousarray(a[index]) if is_new_kv_name(n) else a) for n, a in outputs.items()}


def tensor_sha256(a: np.ndarray) -> str:
    """sha256 of an array's bytes (C order): how the golden file names the state it was made with."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(a).reshape(-1)
    if flat.size:
        h.update(flat.view(np.uint8))
    return h.hexdigest()


# -- export side --------------------------------------------------------------------------------------

def golden_outputs(model: "WanModel", feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch chunk step on `feeds` (graph input names), outputs by graph output name."""
    import torch

    from ispa_export.video.torch_runner import to_numpy, to_torch

    device = next(model.parameters()).device
    kwargs = {k: to_torch(v, device) for k, v in feeds.items()}
    with torch.no_grad():
        outs = model(**kwargs)
    return {name: to_numpy(o) for name, o in zip(output_names(model.cache_groups()), outs)}


def synthetic_state(specs: dict[str, tuple[tuple[int, ...], str]], seed: int = STATE_SEED) -> dict[str, np.ndarray]:
    """The golden step's large inputs: seeded standard normal draws of each state input's shape, in
    name order, cast to its dtype; a modulation weight scaled by 1/sqrt(D) like a real projection."""
    from runtimes.buffers import host_dtype

    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(specs):
        shape, dtype = specs[name]
        a = rng.standard_normal(tuple(shape), dtype=np.float32)
        if name == "ispa_weight":
            a /= np.float32(np.sqrt(shape[-1]))
        out[name] = a.astype(host_dtype(dtype))
    return out


def example_feeds(model: "WanModel", geo, modulation: str, seed: int = STATE_SEED) -> dict[str, np.ndarray]:
    """Inputs of one chunk step in the graph's contract (what the exporter traces and the golden step
    runs): synthetic caches, text K/V and modulation (synthetic_state), the first pass of a chunk at
    frame M/2 (half the full cache valid, the other masks as the ring leaves them), its noise, RoPE
    angles and timestep."""
    from runtimes.buffers import host_dtype
    from runtimes.schedule import chunk_noise, frame_rope, ring_slot

    dtype = geo.dtype
    cfg = model.cfg
    start = max(1, geo.full_capacity // 2)
    specs = {"cross_kv": ((cfg.num_layers, 2, geo.batch, cfg.text_len, geo.heads, geo.head_dim), dtype)}
    for g in geo.groups:
        specs[g.name] = (geo.group_shape(g), dtype)
    if modulation == "input":
        n, d = geo.modes.count("L"), cfg.dim
        specs.update(ispa_weight=((n, d, d), dtype), ispa_bias=((n, d), dtype))
    feeds = synthetic_state(specs, seed)
    for g in geo.groups:
        mask = np.zeros(g.capacity, dtype=bool)
        for frame in range(start):
            mask[ring_slot(frame, g.capacity, g.sink)] = True
        feeds[g.name + "_mask"] = mask
    feeds["latents"] = chunk_noise(seed, 0, 0, geo.chunk_shape).astype(host_dtype(dtype))
    feeds["timestep"] = np.full((geo.batch,), geo.timesteps[0], dtype=np.float32)
    feeds["rope_frame"] = frame_rope(start, geo.chunk_frames, geo.rope_pairs, geo.rope_theta)
    if model.per_pass_kind():
        feeds["pass_kind"] = np.array(0, dtype=np.int64)
    return feeds


def save_golden(directory: Path, model: "WanModel", feeds: dict[str, np.ndarray], *,
                kv_tokens: int = KV_TOKENS) -> list[str]:
    """Write golden.safetensors into `directory` (atomically); returns [GOLDEN].

    `model` is the module that is exported (already cast to the export dtype), `feeds` its example
    inputs by graph input name (example_feeds), the synthetic state (is_state_input) included: it is
    run but not stored, only fingerprinted. New K/V outputs keep `kv_tokens` tokens (kv_token_slice).
    """
    from safetensors.numpy import save_file

    path = Path(directory) / GOLDEN
    # np.require, not ascontiguousarray: that turns the 0-d frame_index into shape [1].
    feeds = {k: np.require(v, requirements="C") for k, v in feeds.items()}
    t0 = time.perf_counter()
    outputs = golden_outputs(model, feeds)
    seconds = time.perf_counter() - t0
    for name, out in outputs.items():
        if out.dtype.kind == "f" or out.dtype.name == "bfloat16":
            if not np.isfinite(out.astype(np.float32) if out.dtype.name == "bfloat16" else out).all():
                raise UserError(f"{path}: output {name!r} of the PyTorch model has NaN/inf on the example "
                                "inputs; expected finite values")
    kv = kv_token_slice(next((o.shape[KV_AXIS] for n, o in outputs.items() if is_new_kv_name(n)), 1), kv_tokens)
    tensors = {INPUT_PREFIX + k: v for k, v in feeds.items() if not is_state_input(k)}
    tensors.update({OUTPUT_PREFIX + k: v for k, v in slice_outputs(outputs, kv).items()})
    metadata = {"format": GOLDEN_FORMAT, "version": GOLDEN_VERSION, "runner": GOLDEN_RUNNER,
                "seconds": f"{seconds:.3f}", "kv_axis": str(KV_AXIS),
                "kv_slice": f"{kv.start}:{kv.stop}:{kv.step}",
                "state_inputs": ",".join(sorted(k for k in feeds if is_state_input(k))), "state_seed": str(STATE_SEED)}
    metadata.update({STATE_SHA_PREFIX + k: tensor_sha256(v) for k, v in feeds.items() if is_state_input(k)})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return [GOLDEN]


# -- reading it back ---------------------------------------------------------------------------------

@dataclass
class Golden:
    """golden.safetensors as read: per-step inputs and (sliced) outputs by graph name."""

    path: Path
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    kv: slice
    metadata: dict[str, str] = field(default_factory=dict)


def _spec(a: np.ndarray) -> str:
    return f"{a.dtype.name}{list(a.shape)}"


def read_golden(path: Path) -> Golden:
    """The file as it is (format and metadata checked, not yet against an artifact)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: expected a readable safetensors file, found {' '.join(str(e).split())[:200]}") from None
    if metadata.get("format") != GOLDEN_FORMAT or metadata.get("version") != GOLDEN_VERSION:
        raise UserError(f"{path}: metadata format/version: expected {GOLDEN_FORMAT!r} version {GOLDEN_VERSION}, "
                        f"found {metadata.get('format')!r} version {metadata.get('version')}")
    try:
        start, stop, step = (int(x) for x in metadata.get("kv_slice", "").split(":"))
        if int(metadata.get("kv_axis", "")) != KV_AXIS or start < 0 or stop <= start or step < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"{path}: metadata kv_axis/kv_slice: expected {KV_AXIS} and 'start:stop:step' integers "
                        f"(0 <= start < stop, step >= 1), found {metadata.get('kv_axis')!r} "
                        f"{metadata.get('kv_slice')!r}") from None
    unknown = sorted(k for k in tensors if not k.startswith((INPUT_PREFIX, OUTPUT_PREFIX)))
    if unknown:
        raise UserError(f"{path}: tensors: expected names starting {INPUT_PREFIX!r} or {OUTPUT_PREFIX!r}, "
                        f"found {unknown}")
    return Golden(path, {k[len(INPUT_PREFIX):]: v for k, v in tensors.items() if k.startswith(INPUT_PREFIX)},
                  {k[len(OUTPUT_PREFIX):]: v for k, v in tensors.items() if k.startswith(OUTPUT_PREFIX)},
                  slice(start, stop, step), metadata)


def load_golden(art) -> tuple[dict[str, np.ndarray], Golden]:
    """The full feeds of the golden pass (state tensors + golden inputs) and the golden file, each
    checked against the artifact's manifest. Every refusal is one UserError line."""
    d = art.directory
    path = d / GOLDEN
    if not path.is_file():
        old = " (this artifact has golden_*.json from an older ispa-export: re-export it)" \
            if (d / "golden_inputs.json").is_file() else ""
        raise UserError(f"{path}: missing; expected the golden I/O written by `ispa export`{old}")
    if GOLDEN not in art.manifest["files"]:
        raise UserError(f"{art.manifest_path}: files: expected an entry for {GOLDEN!r} (its checksum), "
                        f"found entries {sorted(art.manifest['files'])}")
    golden = read_golden(path)
    from_state = sorted(n for n in art.inputs if is_state_input(n))
    want = sorted(n for n in art.inputs if not is_state_input(n))
    if sorted(golden.inputs) != want:
        raise UserError(f"{path}: inputs: expected {want} (manifest.json inputs, less {from_state}, drawn from "
                        f"the file's state_seed), found {sorted(golden.inputs)}")
    for name in want:
        spec, a = art.inputs[name], golden.inputs[name]
        if a.shape != spec.shape or a.dtype.name != spec.dtype:
            raise UserError(f"{path}: input {name!r}: expected {spec.describe()} (manifest.json), found {_spec(a)}")
    if sorted(golden.outputs) != sorted(art.outputs):
        raise UserError(f"{path}: outputs: expected {sorted(art.outputs)} (manifest.json), "
                        f"found {sorted(golden.outputs)}")
    for name, spec in art.outputs.items():
        a = golden.outputs[name]
        shape = spec.shape
        if is_new_kv_name(name):
            kv = golden.kv
            if kv.stop != spec.shape[KV_AXIS]:
                raise UserError(f"{path}: metadata kv_slice: expected a stop of {spec.shape[KV_AXIS]} (the tokens "
                                f"of {name!r}, manifest.json), found {golden.metadata['kv_slice']!r}")
            n = len(range(kv.stop)[kv])
            shape = shape[:KV_AXIS] + (n,) + shape[KV_AXIS + 1:]
        if a.shape != tuple(shape) or a.dtype.name != spec.dtype:
            raise UserError(f"{path}: output {name!r}: expected {spec.dtype}{list(shape)} (manifest.json, "
                            f"kv_slice {golden.metadata['kv_slice']}), found {_spec(a)}")
    try:
        seed = int(golden.metadata.get("state_seed", ""))
    except ValueError:
        raise UserError(f"{path}: metadata state_seed: expected an integer, found "
                        f"{golden.metadata.get('state_seed')!r}") from None
    state = synthetic_state({n: (s.shape, s.dtype) for n, s in art.inputs.items() if is_state_input(n)}, seed)
    feeds = {}
    for name in art.inputs:
        if is_state_input(name):
            a = state[name]
            want_sha = golden.metadata.get(STATE_SHA_PREFIX + name)
            got_sha = tensor_sha256(a)
            if want_sha != got_sha:
                raise UserError(f"{path}: metadata {STATE_SHA_PREFIX + name}: expected {got_sha} (input {name!r} drawn "
                                f"from seed {seed}), found {want_sha}: the golden pass ran on other inputs")
            feeds[name] = a
        else:
            feeds[name] = golden.inputs[name]
    return feeds, golden


# -- verification -------------------------------------------------------------------------------

def tolerances(dtype: str, backend: str) -> tuple[float, float]:
    try:
        return TOLERANCES[dtype][backend]
    except KeyError:
        raise UserError(f"manifest.json: dtype: expected one of {sorted(TOLERANCES)}, found {dtype!r}") from None


def _trt_runner(art, scratch: contextlib.ExitStack):
    """Polygraphy's TrtRunner on the artifact's engine, or on one built here (in a temporary
    directory removed with `scratch`) from the ONNX with the flags of `ispa engine`."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from ispa_export.builder.engine import build_engine

    engine = art.engine_path()
    if engine is None:
        engine = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="ispa-verify-"))) / "model.engine"
        print(f"verify: no engine listed in {art.manifest_path}; building one from {art.onnx_path} "
              f"(run `ispa engine {art.directory}` to keep it)", file=sys.stderr)
        build_engine(art.onnx_path, engine, workspace_bytes=4 << 30, timing_cache_path=None,
                     refit=bool(art.manifest.get("refit_names")), progress=False)
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt"), engine


def _run_trt(runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference through Polygraphy's TrtRunner. numpy has no bfloat16 of its own, so a bf16 graph
    is fed torch tensors (Polygraphy returns torch tensors then), converted back with ml_dtypes."""
    bf16 = any(a.dtype.name == "bfloat16" for a in feeds.values())
    if bf16:
        import torch

        from ispa_export.video.torch_runner import to_numpy, to_torch

        feeds = {k: to_torch(v, torch.device("cpu")) for k, v in feeds.items()}
    with runner:
        out = runner.infer(feeds)
    if bf16:
        return {k: (to_numpy(v) if not isinstance(v, np.ndarray) else v) for k, v in out.items()}
    return {k: np.array(v, copy=True) for k, v in out.items()}


def _run_ort(art, feeds: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    """ONNX Runtime on the CPU provider; (backend name, outputs). ONNX Runtime's CPU provider has no
    bfloat16 kernels for several ops (Conv among them): a bfloat16 graph it refuses is run by
    onnx.reference instead (fine at test sizes, far too slow at real ones: use --trt there)."""
    from runtimes.ort import OrtRunner

    try:
        runner = OrtRunner(art.onnx_path, providers=["CPUExecutionProvider"], copy_outputs=True)
        for name in runner.engine.overridable & set(feeds):  # a baked graph's constants, as a video binds them
            runner.buffers.allocate(name, feeds[name].shape, feeds[name].dtype.name)
            runner.buffers.upload(name, feeds[name])
        return "onnxrt", runner.run(feeds)
    except Exception as e:  # onnxruntime's own exceptions (e.g. a kernel missing for a dtype on the CPU)
        why = " ".join(str(e).split())
        if not (art.geometry.dtype == "bfloat16" and "bfloat16" in why):
            raise UserError(f"{art.onnx_path}: ONNX Runtime (CPU) could not run the golden inputs: "
                            f"{type(e).__name__}: {why[:300]}") from None
    import onnx
    from onnx.reference import ReferenceEvaluator

    print(f"verify: ONNX Runtime's CPU provider has no bfloat16 kernels for {art.onnx_path.name}; running "
          "onnx.reference instead (slow beyond small models: use --trt on a GPU)", file=sys.stderr)
    model = onnx.load(str(art.onnx_path))
    outs = ReferenceEvaluator(model).run(None, feeds)
    return "onnxref", dict(zip((o.name for o in model.graph.output), outs))


def _widen(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Polygraphy's array helpers do not know ml_dtypes' bfloat16; float32 holds every bf16 value exactly.
    return {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in outputs.items()}


@contextlib.contextmanager
def _quiet_polygraphy():
    # The compare function logs every statistic (and each failure) itself; verify prints its own table.
    # Critical messages still raise PolygraphyException, which verify turns into a UserError.
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def instance_step(art, directory: Path, kv_tokens: int = KV_TOKENS) -> tuple[dict[str, np.ndarray], Golden]:
    """The next pass of a video (its instance's caches, text K/V and modulation; the first denoising
    pass of its next chunk) and the PyTorch outputs of it, now: what `verify --instance` checks the
    engine against, the swap of that video's modulation included."""
    import torch

    from graphs.config import WanConfig
    from runtimes.buffers import host_dtype
    from runtimes.instance import load_instance
    from runtimes.schedule import chunk_noise, frame_rope

    from ispa_export.models import BAKED, load_baked
    from ispa_export.video.modulation import absorptions_from, torch_inputs, with_corrections
    from ispa_export.video.torch_runner import TORCH_DTYPES

    inst = load_instance(directory, art)
    geo, state = art.geometry, inst.state
    chunk, start = int(state["chunk"]), int(state["frame_index"])
    feeds = {"latents": chunk_noise(inst.seed, chunk, 0, geo.chunk_shape).astype(host_dtype(geo.dtype)),
             "timestep": np.full((geo.batch,), geo.timesteps[0], dtype=np.float32),
             "rope_frame": frame_rope(start, geo.chunk_frames, geo.rope_pairs, geo.rope_theta),
             "cross_kv": state["cross_kv"]}
    if "pass_kind" in art.inputs:
        feeds["pass_kind"] = np.array(0, dtype=np.int64)
    for g in geo.groups:
        feeds[g.name], feeds[g.name + "_mask"] = state[g.name], state[g.name + "_frames"] >= 0
    cfg = WanConfig.from_dict(art.manifest["model"]["config"])
    model = load_baked(cfg, art.directory / BAKED).cast(TORCH_DTYPES[geo.dtype])
    inputs = torch_inputs(model, art.modulation, inst.constants)
    torch_feeds = dict(feeds)
    if inputs is None:
        model = with_corrections(model, absorptions_from(model, inst.constants))
    else:
        torch_feeds.update(inputs)
    with torch.no_grad():
        outputs = golden_outputs(model, torch_feeds)
    feeds.update(inst.constants)
    kv = kv_token_slice(next((o.shape[KV_AXIS] for n, o in outputs.items() if is_new_kv_name(n)), 1), kv_tokens)
    return feeds, Golden(inst.directory, {}, slice_outputs(outputs, kv), kv, {"kv_slice": f"{kv.start}:{kv.stop}:{kv.step}"})


def verify(directory: Path, trt: bool = False, *, instance: Path | None = None, atol: float | None = None,
           rtol: float | None = None) -> int:
    """Compare ONNX Runtime (CPU), and with trt=True TensorRT, against the golden PyTorch outputs; with
    `instance`, against PyTorch run now on that video's next pass (its caches and modulation).

    Prints one line per backend and output. Returns 0 when every output is within tolerance, 1
    otherwise. `atol`/`rtol` replace the per-dtype defaults (TOLERANCES) for every backend. User
    errors (a missing or broken artifact, golden file or instance, TensorRT not installed) raise
    UserError / ArtifactError.
    """
    from runtimes.artifact import load_artifact

    if trt:
        from ispa_export.builder.engine import _trt
        _trt()  # the one-line error before any work when TensorRT is missing
    from polygraphy.comparator import IterationResult
    from polygraphy.exception import PolygraphyException
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # Polygraphy before the SimpleCompareFunc class: the same check as a factory
        from polygraphy.comparator import CompareFunc
        SimpleCompareFunc = CompareFunc.simple

    directory = Path(directory)
    art = load_artifact(directory, check_onnx=True)
    dtype = art.manifest.get("dtype", art.geometry.dtype)
    feeds, golden = load_golden(art) if instance is None else instance_step(art, Path(instance))

    def tol(backend: str) -> tuple[float, float]:
        a, r = tolerances(dtype, backend)
        return (a if atol is None else atol), (r if rtol is None else rtol)

    cpu_backend, cpu_outputs = _run_ort(art, feeds)
    results = {cpu_backend: cpu_outputs}
    engine = None
    scratch = contextlib.ExitStack()
    try:
        if trt:
            runner, engine = _trt_runner(art, scratch)
            with _quiet_polygraphy():
                results["tensorrt"] = _run_trt(runner, feeds)
        want = IterationResult(_widen(golden.outputs), runner_name=GOLDEN_RUNNER)
        rows, ok = [], True
        for backend, outputs in results.items():
            got = slice_outputs(outputs, golden.kv)
            for name, g in golden.outputs.items():
                if name not in got or got[name].shape != g.shape:
                    found = _spec(got[name]) if name in got else "no such output"
                    raise UserError(f"{directory}: {backend} output {name!r}: expected {_spec(g)} "
                                    f"({golden.path.name}), found {found}")
            a, r = tol("tensorrt" if backend == "tensorrt" else "onnxrt")
            with _quiet_polygraphy():
                acc = SimpleCompareFunc(atol=a, rtol=r)(IterationResult(_widen(got), runner_name=backend), want)
            for name, res in acc.items():
                ok = ok and bool(res)
                rows.append((backend, name, res, a, r))
    except PolygraphyException as e:
        raise UserError(f"{directory}: Polygraphy comparison failed: {' '.join(str(e).split())[:300]}") from None
    finally:
        scratch.close()

    where = f"engine {engine}" if engine is not None else "CPU"
    kv = golden.metadata["kv_slice"]
    what = "golden outputs" if instance is None else "outputs on the video's next pass, run now"
    print(f"verify {directory}: {dtype} graph vs PyTorch {what} ({golden.path.name}; new K/V tokens "
          f"{kv} of axis {KV_AXIS}; elementwise: an element fails where it exceeds both atol and rtol; "
          f"TensorRT: {where if trt else 'not run'})")
    print(f"{'backend':<10} {'output':<14} {'max abs err':>12} {'max rel err':>12} {'atol':>8} {'rtol':>8}  result")
    for backend, name, res, a, r in rows:
        mark = "pass" if bool(res) else "FAIL"
        print(f"{backend:<10} {name:<14} {_num(res.max_absdiff):>12} {_num(res.max_reldiff):>12} "
              f"{a:>8.0e} {r:>8.0e}  {mark}")
    print(f"verify: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3e}"
