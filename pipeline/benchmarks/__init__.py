"""Benchmark scripts: each measures ours against a reference side by side in one run and prints ratios."""
