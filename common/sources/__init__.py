"""Where scans come from: verified downloads, `01 --from` imports, the embedded phantom, size variants made
from a real CT, and what a run processes (`--input`, else ct_data/, else the phantom).

May import: core, imaging.
"""
