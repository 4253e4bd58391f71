"""Where the project keeps its data, results and models (absolute paths below the project root)."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # common/core/paths.py -> the project root
CT_DATA = PROJECT_ROOT / "ct_data"
BENCHMARKS = PROJECT_ROOT / "benchmarks"
MODELS = PROJECT_ROOT / "models"
DEFAULT_ONNX = MODELS / "task297.onnx"
OPTIMIZED_CONFIG = BENCHMARKS / "optimized_config.json"
EMBEDDED_DIR = BENCHMARKS / "embedded"
