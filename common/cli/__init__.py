"""The command-line layer: option types and one-line argparse errors, the options and start-up the scripts
share, `totalseg-fast`, its benchmark, the cluster options and the tile profiler's entry point.

May import: core, imaging, sources, records, inference, runs, reporting.
"""
