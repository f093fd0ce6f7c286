"""`python -m runtimes DIR --chunks N --out OUTDIR [--backend ort|trt]` (see runtimes.run)."""
from .run import main

if __name__ == "__main__":
    raise SystemExit(main())
