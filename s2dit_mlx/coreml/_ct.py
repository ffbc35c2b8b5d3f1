"""Quiet, lazy access to coremltools (an optional dependency: the `coreml` extra)."""

from __future__ import annotations

import contextlib
import functools
import logging

from ..errors import S2DiTError

MISSING = "Core ML export needs coremltools: pip install 's2dit-mlx[coreml]'"


def require():
    """Import coremltools once, with its Linux start-up chatter silenced; S2DiTError if missing."""
    logger = logging.getLogger("coremltools")
    if logger.level == logging.NOTSET:
        # On Linux it warns that its native runtime, torch and sklearn versions are unsupported;
        # none of that matters for building and saving packages.
        logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError:
        raise S2DiTError(MISSING) from None
    return ct


_TQDM_MODULES = (
    "coremltools.converters.mil.mil.passes.pass_pipeline",
    "coremltools.optimize.coreml._post_training_quantization",
    "coremltools.optimize.coreml._quantization_passes",
)


@contextlib.contextmanager
def quiet_progress():
    """Hide coremltools' per-pass progress bars (they flood a CLI) and skip its re-validation."""
    import importlib

    from coremltools.converters.mil.mil.program import Program
    from tqdm import tqdm

    # coremltools re-validates the whole program after each of its ~100 passes: half the export
    # time. Our own structural check and interpreter run on the saved package instead.
    validate = Program.validate
    Program.validate = lambda self, *args, **kwargs: None
    saved = []
    for name in _TQDM_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "tqdm"):
            saved.append((module, module.tqdm))
            module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        Program.validate = validate
        for module, original in saved:
            module.tqdm = original
