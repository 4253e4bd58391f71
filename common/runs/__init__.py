"""Timed and batch work on top of the inference core: 03-05's benchmark loop, 05's sweep, 06's per-scan job,
Dask batches, the official tool as the isolated reference, the compute-efficiency figure.

May import: core, imaging, sources, records, inference.
"""
