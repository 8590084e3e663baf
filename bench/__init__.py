"""Benchmarks that run against a real local dev cluster (``python -m bench.<name>``, as root)."""
