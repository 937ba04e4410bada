"""The one place where converted weights are written, read and checked.

A converted network lives in a directory as two files: `NAME.safetensors` holds
the Flax parameters (keys are the Flax parameter paths joined with "/"), and
`NAME.json` holds the module configuration, provenance and `tensors_sha256`, a
digest of the tensors (see `digest`). Reading needs neither torch nor pickle.

Every converter and every `load()` checks the parameters key by key, shape by
shape and dtype by dtype against `jax.eval_shape` of the module, so a wrong or
damaged checkpoint fails with the offending names instead of an error deep in a
forward pass. Loading also verifies the digest (flipped bytes), refuses NaN or
infinite weights, a NAME.json too large or too deeply nested to be one bdjax
wrote, and a config that cannot build the module, and reports each as one
`CheckpointError` naming the file, the problem and how to reconvert.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from bdjax.files import TMP_PREFIX, atomic_write, check_writable, file_mode

FORMAT = "bdjax-converted-weights"
SEP = "/"
DIGEST_KEY = "tensors_sha256"
# NAME.json, fetch's manifest.json and a Hugging Face config.json are a few KB and a few levels
# deep: a larger file is refused unread, a deeper one as damaged (Python's JSON reader and writer
# recurse once per level, and run out of stack near 1,000 levels).
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 64


class CheckpointMismatchError(ValueError):
    """Parameters do not match the module: lists missing, unexpected and mis-shaped keys, and
    tensors of another dtype than the module's."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=(), fix: str = "", mistyped=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.misshaped = sorted(misshaped)
        self.mistyped = sorted(mistyped)
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s): {_preview(keys)}")
        if self.misshaped:
            shown = [f"{k} {tuple(got)} (expected {tuple(want)})" for k, got, want in self.misshaped]
            parts.append(f"{len(shown)} mis-shaped key(s): {_preview(shown)}")
        if self.mistyped:
            shown = [f"{k} {got} (expected {want})" for k, got, want in self.mistyped]
            parts.append(f"{len(shown)} tensor(s) of the wrong dtype: {_preview(shown)}")
        super().__init__(f"{what} does not match the module: " + "; ".join(parts) + (f"; {fix}" if fix else ""))


class CheckpointError(ValueError):
    """A converted checkpoint that cannot be used (damaged, unreadable, or not what the run asks
    for). The message is one line: the file, what is wrong, and the fix."""

    def __init__(self, path: str, problem: str, fix: str):
        self.path = path
        super().__init__(f"{path}: {problem}; {fix}")


class JSONFileError(ValueError):
    """A JSON file that is too large, too deeply nested or not JSON; the message says which, and
    the caller adds the file and the fix."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint whose NAME.json records no digest (an older conversion): its tensors cannot be
    verified."""


def reconvert_hint(name: str) -> str:
    """How to rewrite NAME.* (the converter of the same name, or fetch for the weights cache)."""
    return (f"reconvert it (python -m checkpoints_convert.{name} ... --overwrite; for the weights cache: "
            "python -m checkpoints_convert.fetch --force)")


def _shorten(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _preview(items, limit=12):
    items = list(items)
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def flatten(tree: Mapping) -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[SEP.join(str(p.key) for p in path)] = leaf
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def digest(flat: Mapping[str, Any]) -> str:
    """sha256 (hex) over the tensors in sorted key order: each key, dtype name and shape, then
    the array's bytes (C order). Equal for equal weights whatever file or device holds them."""
    h = hashlib.sha256()
    for key in sorted(flat):
        array = np.ascontiguousarray(np.asarray(flat[key]))
        h.update(f"{key}\0{array.dtype.name}\0{array.shape}\0".encode())
        h.update(array.reshape(-1).view(np.uint8))
    return h.hexdigest()


def weights_digest(digests: Mapping[str, str]) -> str:
    """A short stable id (16 hex digits) of several networks' weights, from their `digest`s by name."""
    text = json.dumps(dict(sorted(digests.items())), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def non_finite(flat: Mapping[str, Any]) -> list[str]:
    """Keys of the floating-point arrays holding a NaN or an infinity (sorted)."""
    bad = []
    for key in sorted(flat):
        array = np.asarray(flat[key])
        if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
            continue
        # A sum is non-finite whenever an element is (and, rarely, on overflow): check exactly then.
        if not np.isfinite(array.sum(dtype=np.float32)) and not np.isfinite(array).all():
            bad.append(key)
    return bad


def _dtype(value) -> np.dtype:
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def check_params(flat: Mapping[str, Any], expected: Mapping, what: str = "checkpoint", fix: str = "") -> None:
    """Raise CheckpointMismatchError unless `flat` has exactly the keys, shapes and dtypes of
    `expected`.

    `expected` is a nested params tree of arrays or `jax.ShapeDtypeStruct`s
    (typically `jax.eval_shape(module.init, ...)["params"]`, all float32). The converters write
    every tensor in the module's dtype, so any other dtype (int8, float16, complex, ...) is not
    their output: casting it would run a network that differs from the converted one.
    """
    expected = flatten(expected)
    want = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    missing = want.keys() - got.keys()
    unexpected = got.keys() - want.keys()
    common = want.keys() & got.keys()
    misshaped = [(k, got[k], want[k]) for k in common if got[k] != want[k]]
    mistyped = [(k, _dtype(flat[k]).name, _dtype(expected[k]).name) for k in common
                if _dtype(flat[k]) != _dtype(expected[k])]
    if missing or unexpected or misshaped or mistyped:
        raise CheckpointMismatchError(what, missing, unexpected, misshaped, fix, mistyped)


def paths(directory: str, name: str) -> tuple[str, str]:
    return (os.path.join(directory, f"{name}.safetensors"), os.path.join(directory, f"{name}.json"))


def ensure_writable(directory: str, name: str, overwrite: bool) -> None:
    """Raise unless NAME.* can be written into `directory`: FileExistsError if they exist and
    `overwrite` is off, NotADirectoryError / PermissionError if the directory cannot be made or
    written, IsADirectoryError if a directory stands where a file goes.

    Converters call this first, so a refused run fails before any slow work.
    """
    existing = [p for p in paths(directory, name) if os.path.lexists(p)]
    for p in existing:
        if os.path.isdir(p):
            raise IsADirectoryError(f"{p} is a directory where the converted file goes: remove it or "
                                    "choose another output directory")
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); replace them with overwrite=True "
                              "(the converters' --overwrite)")
    try:
        check_writable(directory)
    except NotADirectoryError as e:
        raise NotADirectoryError(f"{e}; choose another output directory") from None


def save(directory: str, name: str, flat: Mapping[str, np.ndarray], config: Mapping[str, Any],
         *, model: str, source: str = "", overwrite: bool = False) -> tuple[str, str]:
    """Write NAME.safetensors and NAME.json (with the tensors' `digest`) into `directory`;
    returns their paths.

    Refuses to replace existing files unless `overwrite`, and refuses NaN or infinite weights.
    Each file is written to a temporary name and renamed, so an interrupted save leaves no half file.
    """
    ensure_writable(directory, name, overwrite)
    weights_path, config_path = paths(directory, name)
    # ascontiguousarray turns 0-d arrays into shape (1,); keep scalars (e.g. CLIP's logit_scale) 0-d.
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in flat.items()}
    bad = non_finite(arrays)
    if bad:
        raise ValueError(f"refusing to write {weights_path}: {len(bad)} tensor(s) hold NaN or infinite "
                         f"values ({_preview(bad)}); the source weights are damaged")
    meta = {"format": FORMAT, "model": model, "source": source, "config": dict(config), DIGEST_KEY: digest(arrays)}
    os.makedirs(directory, exist_ok=True)
    with naming(weights_path):
        atomic_write(weights_path, lambda tmp: _write_safetensors(tmp, arrays))
    with naming(config_path):
        atomic_write(config_path, lambda tmp: _write_json(tmp, meta))
    return weights_path, config_path


@contextlib.contextmanager
def naming(path: str):
    """Re-raise an OSError that names no file, or only a temporary one, as one naming `path`.

    A failed write (disk full, quota, read-only file system) names no file, and one-line errors
    must say which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.errno is None or (e.filename is not None and not os.path.basename(e.filename).startswith(TMP_PREFIX)):
            raise
        raise OSError(e.errno, e.strerror, path) from None


def _write_safetensors(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """save_file, its I/O failures as the OSError they are, and the file with the umask's mode:
    safetensors writes a private (0600) file of its own and renames it over `path`."""
    try:
        save_file(arrays, path, metadata={"format": FORMAT})
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from None
    os.chmod(path, file_mode())


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in `path`. Raises JSONFileError when the file is over `max_bytes` (judged
    by its size, before reading), is not UTF-8 JSON, or nests deeper than MAX_JSON_DEPTH; OSError
    when it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if max(size, len(data)) > max_bytes:  # a device or a pipe reports no size: read, bounded
        raise JSONFileError(f"is larger than the {max_bytes:,} bytes such a JSON file can be")
    too_deep = JSONFileError(f"is not valid JSON here (arrays or objects nested more than {MAX_JSON_DEPTH} "
                             "levels deep)")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JSONFileError(f"is not valid JSON (not UTF-8 text: {e})") from None
    except json.JSONDecodeError as e:
        raise JSONFileError(f"is not valid JSON ({e})") from None
    except RecursionError:
        raise too_deep from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _depth(value) -> int:
    """How many arrays and objects deep `value` nests (0 for a number or string), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _require_file(path: str, name: str) -> None:
    if os.path.isdir(path):
        raise CheckpointError(path, "is a directory, not a file", reconvert_hint(name))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: convert the weights first (python -m checkpoints_convert.{name} ...)")


def read_meta(directory: str, name: str, *, model: str) -> dict:
    """NAME.json, checked: a JSON object of the right format and model, with a `config` object
    and, where one is recorded, a well-formed sha256 hex digest."""
    _, config_path = paths(directory, name)
    _require_file(config_path, name)
    hint = reconvert_hint(name)
    try:
        meta = read_json(config_path)
    except JSONFileError as e:
        raise CheckpointError(config_path, str(e), hint) from None
    except OSError as e:
        raise CheckpointError(config_path, f"cannot be read ({e.strerror or e})", hint) from None
    if not isinstance(meta, dict):
        raise CheckpointError(config_path, f"holds a JSON {type(meta).__name__}, not an object", hint)
    if meta.get("format") != FORMAT or meta.get("model") != model:
        raise CheckpointError(config_path, f"is not a converted {model} checkpoint "
                              f"(format={meta.get('format')!r}, model={meta.get('model')!r})", hint)
    if not isinstance(meta.get("config"), dict):
        got = "no" if "config" not in meta else f"a {type(meta['config']).__name__} as"
        raise CheckpointError(config_path, f"has {got} `config`, expected an object of module fields", hint)
    recorded = meta.get(DIGEST_KEY)
    if recorded is not None and not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise CheckpointError(config_path, f"has a malformed `{DIGEST_KEY}` {recorded!r} (expected 64 hex digits)",
                              hint)
    return meta


def recorded_digest(directory: str, name: str, *, model: str) -> str | None:
    """The tensors' digest recorded at conversion; None where NAME.json records none."""
    return read_meta(directory, name, model=model).get(DIGEST_KEY)


_warned_unverified: set[str] = set()


def read_weights(directory: str, name: str, meta: Mapping, *, verify: bool = True) -> dict[str, np.ndarray]:
    """NAME.safetensors as flat numpy arrays, checked against `meta`'s digest (unless not
    `verify`) and for NaN or infinite values."""
    weights_path, config_path = paths(directory, name)
    _require_file(weights_path, name)
    hint = reconvert_hint(name)
    try:
        flat = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error type, and OSError
        raise CheckpointError(weights_path, f"is not a readable safetensors file, truncated or damaged "
                              f"({_shorten(e)})", hint) from None
    recorded = meta.get(DIGEST_KEY)
    if verify and recorded is not None and digest(flat) != recorded:
        raise CheckpointError(weights_path, f"its tensors do not match the digest recorded in {config_path} "
                              "(damaged or altered bytes)", hint)
    if recorded is None and os.path.abspath(weights_path) not in _warned_unverified:
        _warned_unverified.add(os.path.abspath(weights_path))
        warnings.warn(f"{config_path} records no digest of its tensors (converted by an older bdjax), so "
                      f"{weights_path} is used unverified; {hint}", UnverifiedCheckpointWarning, stacklevel=3)
    bad = non_finite(flat)
    if bad:
        raise CheckpointError(weights_path, f"{len(bad)} tensor(s) hold NaN or infinite values ({_preview(bad, 4)})",
                              hint)
    return flat


def read(directory: str, name: str, *, model: str, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Read (config, flat params) written by `save`, checked as `read_meta` and `read_weights` do.
    Raises FileNotFoundError when a file is missing, CheckpointError when one is unusable."""
    meta = read_meta(directory, name, model=model)
    return meta["config"], read_weights(directory, name, meta, verify=verify)


def check_fields(cls: type, fields: Mapping[str, Any]) -> None:
    """Raise ValueError unless every value in `fields` has the type its dataclass field of `cls`
    is annotated with (int, float, bool, None, str, tuple[T, ...] and unions of them)."""
    hints = typing.get_type_hints(cls)
    for key, value in fields.items():
        if key in hints and not _has_type(value, hints[key]):
            raise ValueError(f"field {key}={value!r} is not of type {_type_name(hints[key])}")


def _has_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(args) == len(value) and all(_has_type(v, a) for v, a in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def load(directory: str, name: str, *, model: str, build: Callable[[dict], Any], shapes: Callable[[Any], Mapping],
         param_dtype=None, verify: bool = True, check: Callable[[Any, str], None] | None = None) -> tuple[Any, dict]:
    """(module, params) from NAME.* in `directory`, every problem a one-line error.

    `build(config)` makes the module from the stored config, `shapes(module)` its expected params
    tree; `check(module, config_path)` may then refuse a module the caller cannot use (raise
    CheckpointError). `verify=False` skips the digest check.
    """
    meta = read_meta(directory, name, model=model)
    weights_path, config_path = paths(directory, name)
    hint = reconvert_hint(name)
    try:
        module = build(meta["config"])
        expected = shapes(module)
    except Exception as e:  # any failure here comes from the stored config
        raise CheckpointError(config_path, f"its config does not describe a valid {model} ({_shorten(e, 500)})",
                              hint) from None
    flat = read_weights(directory, name, meta, verify=verify)
    check_params(flat, expected, weights_path, hint)  # a different network is named as such first
    if check is not None:
        check(module, config_path)
    return module, restore(flat, expected, what=weights_path, dtype=param_dtype, fix=hint)


def restore(flat: Mapping[str, np.ndarray], expected: Mapping, *, what: str, dtype=None, fix: str = "") -> dict:
    """Check `flat` against `expected` and return the nested params tree as jax arrays."""
    check_params(flat, expected, what, fix)
    cast = (lambda a: jax.numpy.asarray(a, dtype)) if dtype is not None else jax.numpy.asarray
    return unflatten({k: cast(v) for k, v in flat.items()})
