"""Benchmarks for sessionscope: scripts a person runs, never collected by pytest.

``python -m benchmarks --quick`` (two to three minutes) or ``python -m benchmarks`` (the full
matrix, the memory soak and the micro-benchmark); ``scripts/bench`` sets everything up first.
"""
