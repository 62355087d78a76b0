"""mmjax data layer: sources (built-in TFDS sets, file lists, TFDS catalog; one file
each in `sources/`), the data config schema, decode/augment, tokenizer, and the
tf.data pipeline (docs/data.md).

TensorFlow is imported lazily, inside functions (and by the `builders` module, which
`sources.builtin` imports lazily). Those functions go through `require_tf()` /
`require_tfds()` first, so an install without the `data` extra fails with one line
saying what to install (`MissingExtraError`).
"""

from __future__ import annotations

import importlib
import sys

INSTALL_HINT = 'pip install -e ".[data]" (or pip install "mmjax[data]")'


class MissingExtraError(ImportError):
    """A package of the `data` extra (TensorFlow, TFDS, PyAV) is not installed."""


def require(module: str, what: str | None = None):
    """-> the imported `module`, or MissingExtraError naming the extra to install."""
    mod = sys.modules.get(module)
    if mod is not None:
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what or module} is not installed ({e}); the data pipeline needs the `data` extra: {INSTALL_HINT}"
        ) from None


def require_tf():
    """-> the `tensorflow` module (MissingExtraError without the `data` extra)."""
    return require("tensorflow", "TensorFlow")


def require_tfds():
    """-> the `tensorflow_datasets` module (MissingExtraError without the `data` extra)."""
    require_tf()
    return require("tensorflow_datasets", "TensorFlow Datasets")
