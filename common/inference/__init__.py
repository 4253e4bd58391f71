"""The model and the inference core: the nnU-Net results folder (ModelSpec), weights and the ONNX export,
the predictors, preprocessing, the sliding window, postprocessing, `segment()`, the tile count and the
typed run configuration.

May import: core, imaging, records.
"""
