"""Shared logic of the TotalSegmentator fast-model benchmark suite.

Axis conventions used throughout (stated again in each docstring that touches arrays):
- NIfTI / nibabel arrays are indexed (x, y, z) = (i, j, k) voxel axes of the file's affine.
- nnU-Net works on (z, y, x): the nibabel array transposed, exactly as nnU-Net's SimpleITK reader sees it.
- World coordinates are millimetres in RAS+ (nibabel's convention for NIfTI affines).
"""
