"""The one place where converted weights are written, read and checked.

A converted network lives in a directory as two files: `NAME.safetensors` holds
the Flax parameters (keys are the Flax parameter paths joined with "/"), and
`NAME.json` holds the module configuration plus provenance. Reading needs
neither torch nor pickle.

Every converter and every `load()` checks the parameters key by key and shape
by shape against `jax.eval_shape` of the module, so a wrong or damaged
checkpoint fails with the offending names instead of a shape error deep in a
forward pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from bdjax.outputs import atomic_write

FORMAT = "bdjax-converted-weights"
SEP = "/"


class CheckpointMismatchError(ValueError):
    """Parameters do not match the module: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.misshaped = sorted(misshaped)
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s): {_preview(keys)}")
        if self.misshaped:
            shown = [f"{k} {tuple(got)} (expected {tuple(want)})" for k, got, want in self.misshaped]
            parts.append(f"{len(shown)} mis-shaped key(s): {_preview(shown)}")
        super().__init__(f"{what} does not match the module: " + "; ".join(parts))


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


def check_params(flat: Mapping[str, Any], expected: Mapping, what: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError unless `flat` has exactly the keys and shapes of `expected`.

    `expected` is a nested params tree of arrays or `jax.ShapeDtypeStruct`s
    (typically `jax.eval_shape(module.init, ...)["params"]`).
    """
    want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    missing = want.keys() - got.keys()
    unexpected = got.keys() - want.keys()
    misshaped = [(k, got[k], want[k]) for k in want.keys() & got.keys() if got[k] != want[k]]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(what, missing, unexpected, misshaped)


def paths(directory: str, name: str) -> tuple[str, str]:
    return (os.path.join(directory, f"{name}.safetensors"), os.path.join(directory, f"{name}.json"))


def ensure_writable(directory: str, name: str, overwrite: bool) -> None:
    """Raise FileExistsError if NAME.* already exist in `directory` and `overwrite` is off.

    Converters call this first, so a refused run fails before any slow work.
    """
    existing = [p for p in paths(directory, name) if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")


def save(directory: str, name: str, flat: Mapping[str, np.ndarray], config: Mapping[str, Any],
         *, model: str, source: str = "", overwrite: bool = False) -> tuple[str, str]:
    """Write NAME.safetensors and NAME.json into `directory`; returns their paths.

    Refuses to replace existing files unless `overwrite`. Each file is written
    to a temporary name and renamed, so an interrupted save leaves no half file.
    """
    ensure_writable(directory, name, overwrite)
    weights_path, config_path = paths(directory, name)
    os.makedirs(directory, exist_ok=True)
    meta = {"format": FORMAT, "model": model, "source": source, "config": dict(config)}
    # ascontiguousarray turns 0-d arrays into shape (1,); keep scalars (e.g. CLIP's logit_scale) 0-d.
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in flat.items()}
    atomic_write(weights_path, lambda tmp: save_file(arrays, tmp, metadata={"format": FORMAT}))
    atomic_write(config_path, lambda tmp: _write_json(tmp, meta))
    return weights_path, config_path


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read(directory: str, name: str, *, model: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read (config, flat params) written by `save`. Raises FileNotFoundError / ValueError."""
    weights_path, config_path = paths(directory, name)
    for p in (weights_path, config_path):
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"{p} not found: convert the weights first (python -m checkpoints_convert.{name} ...)")
    with open(config_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("model") != model:
        raise ValueError(f"{config_path} is not a converted {model} checkpoint "
                         f"(format={meta.get('format')!r}, model={meta.get('model')!r})")
    return meta["config"], load_file(weights_path)


def restore(flat: Mapping[str, np.ndarray], expected: Mapping, *, what: str, dtype=None) -> dict:
    """Check `flat` against `expected` and return the nested params tree as jax arrays."""
    check_params(flat, expected, what)
    cast = (lambda a: jax.numpy.asarray(a, dtype)) if dtype is not None else jax.numpy.asarray
    return unflatten({k: cast(v) for k, v in flat.items()})
