"""Reproducible benchmarks: ratios against a bare proxy measured in the same run."""
