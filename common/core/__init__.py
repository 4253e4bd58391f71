"""The ground floor: one-line errors, text formatting, atomic writes, project paths, per-scan locks, signals,
console streams, the machine record, the heap setting and peak memory. Nothing here knows about scans or
models.

May import: nothing.
"""
