"""Argument types of the `ispa` command line and the options of `ispa eval`, shared by ispa_export.cli
and ispa_export.lab.evaluate (so that neither imports the other when it loads)."""
from __future__ import annotations

import argparse


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return v


def layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `ispa eval` (also `python -m ispa_export.lab.evaluate`)."""
    p.add_argument("--model", default="demo")
    p.add_argument("--quick", action="store_true", help="main methods on one short seed")
    p.add_argument("--out", default="artifacts/eval")
    p.add_argument("--seeds", type=seeds, help="comma-separated seeds (default 1000..1005)")
    p.add_argument("--checkpoint", help="weights of the --model preset instead of the shipped ones")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (development only)")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the ISPA variants at 50%% (default: on for the full run)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="also sweep other sink/window spans at 50%% (default: on for the full run)")
    p.add_argument("--render", action="store_true",
                   help="only rewrite EVAL.md and the plot of --out from its eval.json")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--jobs", type=int, help="seeds evaluated in parallel processes (default: one per core)")
    p.add_argument("--device", help="cpu | cuda | cuda:N: where the model runs, one seed at a time on a GPU "
                   "(default: cuda when PyTorch sees one)")
    p.add_argument("--regime", choices=("whole", "rolling"), help="the policy's layout against every drop "
                   "baseline in one regime (ispa_export/lab/regimes.py); writes OUT/results.jsonl")
    p.add_argument("--reductions", type=reductions, help="comma-separated KV reductions for --regime "
                   "(default 0.25,0.5,0.75; --quick: 0.5)")
    return p


def reductions(text: str) -> tuple[float, ...]:
    return tuple(fraction(t) for t in text.split(","))


def seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None
