"""Import a numbered script (``01_download_data.py`` is not a valid module name) as a module, for tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(filename: str) -> ModuleType:
    """The project-root script ``filename`` imported afresh as module ``script_<stem>``."""
    spec = importlib.util.spec_from_file_location("script_" + filename.removesuffix(".py"), ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
