"""The research bench (procedural videos, training, evaluation, benchmarks): not needed to export or deploy."""
