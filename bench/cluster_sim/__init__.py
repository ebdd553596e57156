"""Discrete-event simulator of a P/D cluster, to compare prefill routing policies at scale.

See docs/simulator.md. ``python -m bench.cluster_sim --help``.
"""
