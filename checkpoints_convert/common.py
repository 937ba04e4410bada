"""Pieces every converter shares: safe reading of PyTorch files, layout transposes,
and turning failures into one-line errors with a non-zero exit status."""

from __future__ import annotations

import functools
import os
import sys
import zipfile
from collections.abc import Callable, Mapping

import numpy as np


class ConversionError(Exception):
    """A problem with the user's input that deserves a one-line message, not a traceback."""


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict with `weights_only=True` (no pickled code runs).

    Tensors come back as float32/int numpy arrays. A checkpoint that wraps its
    weights in {"state_dict": ...} or {"model": ...} is unwrapped.
    """
    import torch  # converters are the only torch users

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint (truncated or not a torch.save file): "
            f"{first_line[:200]}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return {k: _to_numpy(v) for k, v in obj.items()}


def _to_numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    return t.numpy()


def is_torchscript_archive(path: str) -> bool:
    """True for files written by torch.jit.save (a zip with a constants.pkl / code/ entry)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def module_path(torch_modules: list[str]) -> list[str]:
    """Torch module path -> Flax module names: each numeric index joins its parent with "_"
    (`input_blocks.1.0` -> `input_blocks_1_0`), the bdjax convention for Sequential/ModuleList."""
    merged: list[str] = []
    for part in torch_modules:
        if part.isdigit() and merged:
            merged[-1] += f"_{part}"
        else:
            merged.append(part)
    return merged


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear (O, I) or 1x1 Conv1d (O, I, 1) weight -> Flax Dense kernel (I, O)."""
    if w.ndim == 3:
        w = w[..., 0]
    return np.transpose(w)


def cli(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl `main` so user errors print one line to stderr and exit with status 1.

    Conversion only traces shapes, so it runs on the CPU: accelerators (and their start-up
    logging on stderr) stay out of it.
    """

    @functools.wraps(main)
    def wrapped(argv):
        import jax

        jax.config.update("jax_platforms", "cpu")
        try:
            main(argv)
        except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapped
