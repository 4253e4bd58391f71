"""Scans in and checked: NIfTI and DICOM to nibabel images (x, y, z; RAS+ mm), the header guard, series and
zip handling, validation, geometry and labels, label maps and masks on disk, batch discovery, and the
official tool's output format.

May import: core.
"""
