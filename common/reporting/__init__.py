"""Reports from result documents: 07's comparison (inputs, aligned masks, pandas rows, typed document,
Markdown, plots), the preview PNG and passport pictures.

May import: core, imaging, records, inference.
"""
