"""Pieces every converter shares: safe reading of PyTorch files, layout transposes,
and turning failures into one-line errors with a non-zero exit status."""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping

import numpy as np

from bdjax.absl_flags import USAGE_ERROR, parse_flags
from bdjax.errors import is_user_os_error, os_error_line


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
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise out_of_memory(path) from None
    except Exception as e:  # torch raises many types for damaged files
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint (truncated, not a torch.save file, or holding "
            f"objects other than tensors): {torch_load_reason(e)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return {k: _to_numpy(v) for k, v in obj.items()}


def read_json_object(path: str, what: str, fix: str) -> dict:
    """The JSON object in `path` (bdjax.checkpoint.read_json's bounds on size and nesting); a
    ConversionError naming the file, `what` it should hold and the `fix`, when it is not one."""
    from bdjax import checkpoint

    try:
        value = checkpoint.read_json(path)
    except checkpoint.JSONFileError as e:
        raise ConversionError(f"{path} {e}: {fix}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not {what}")
    return value


def out_of_memory(path: str) -> MemoryError:
    """The error for a file too large for this machine's memory: not a ConversionError, since the
    file is not to blame (fetch moves files that fail to convert aside)."""
    return MemoryError(f"out of memory loading {path} ({os.path.getsize(path):,} bytes): close other programs, "
                       "or convert on a machine with more memory")


# Sentences of torch's advice that would have a user load the file unsafely: never quoted.
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|allowlist|trust|arbitrary code", re.IGNORECASE)


def torch_load_reason(error: Exception) -> str:
    """Why `torch.load` refused a file, in one short line, without torch's advice to load it
    with `weights_only=False` or to allowlist its classes (either would run code from the file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "WeightsUnpickler error:" in text:  # the safe unpickler's own reason follows this marker
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s and not _UNSAFE_ADVICE.search(s)]
    kept = sentences[:1]
    for sentence in sentences[1:]:  # whole sentences, up to about 200 characters
        if len(" ".join(kept + [sentence])) > 200:
            break
        kept.append(sentence)
    return " ".join(kept)[:200] or type(error).__name__


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


def user_error_line(e: BaseException) -> str | None:
    """The one line to print for a problem with the user's files, inputs or machine, or None for
    a bug (which keeps its traceback). Problems are ConversionError and ValueError (the checks,
    and decoding errors), MemoryError, and the OSErrors of bdjax.errors.is_user_os_error (a full
    or read-only disk, a failure on a named file, ...), the rule every program follows.
    A RecursionError stays a bug: where a file's contents can cause one (JSON, torch.load), the
    reader turns it into an error naming the file."""
    if isinstance(e, (ConversionError, ValueError)):
        line = str(e)
    elif isinstance(e, OSError) and is_user_os_error(e):
        line = os_error_line(e)
    elif isinstance(e, MemoryError):
        line = str(e) or "out of memory: close other programs, or run on a machine with more memory"
    else:
        return None
    return " ".join(line.split()) or type(e).__name__


def cli(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl `main` so user errors (`user_error_line`) print one line to stderr and exit
    with status 2; anything else keeps its traceback.

    Conversion only traces shapes, so it runs on the CPU: accelerators (and their start-up
    logging on stderr) stay out of it.
    """

    @functools.wraps(main)
    def wrapped(argv):
        import jax

        jax.config.update("jax_platforms", "cpu")
        try:
            main(argv)
        except Exception as e:
            line = user_error_line(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(USAGE_ERROR)

    return wrapped


def run_program(define_flags: Callable[[], None], main: Callable[[list[str]], None]) -> None:
    """A converter's `if __name__ == "__main__":` block: its flags defined, parsed with one-line
    errors (`parse_flags`), and `main` run under `cli`."""
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)
