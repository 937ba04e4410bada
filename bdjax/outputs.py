"""Writing results: samples as they finish, ranked PNGs, an overview grid and a JSON report,
never half-written.

Every file is written to a temporary name in its directory and renamed into place, so a run
killed at any moment leaves either the old file, the new file, or nothing (plus, at worst, a
`.tmp-*` file that the next run removes). JSON is strict: no NaN or Infinity.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import numpy as np
from PIL import Image, ImageDraw

from bdjax.files import atomic_write, file_mode, remove_stale_temporaries

RANKED_DIR = "ranked"
SAMPLES_DIR = "samples"
GRID = "grid.png"
REPORT = "report.json"


def finite_or_none(obj):
    """`obj` with every non-finite float (NaN, +-Inf, also numpy's) replaced by None, so that it
    can be written as strict JSON; containers are rebuilt, everything else is kept."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def save_png(path: str, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG"))


class NonFiniteJSONError(ValueError):
    """A NaN or Infinity reached a JSON writer: a bug in the caller, not bad input."""


def _json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()  # numpy scalars and arrays as plain numbers, checked like any float
    return str(obj)


def save_json(path: str, obj) -> None:
    """Write `obj` as strict JSON (RFC 8259): a NaN or Infinity anywhere raises NonFiniteJSONError
    and leaves nothing behind, since most readers reject them. Pass values through
    `finite_or_none` where null is the right answer."""
    def write(tmp):
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
        except ValueError as e:
            raise NonFiniteJSONError(f"{path}: refusing to write a non-finite number as JSON ({e})") from None
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    atomic_write(path, write)


def ranked_name(rank: int, distance: float) -> str:
    return f"{rank:03d}_{distance:.4f}.png"


def grid(source: np.ndarray, mask: np.ndarray, images, caption: str, columns: int = 8) -> np.ndarray:
    """Source, mask, then the results in rank order, under a caption bar; uint8 [H', W', 3]."""
    tiles = [source, np.repeat(np.asarray(mask)[..., None], 3, axis=-1), *images]
    size = source.shape[0]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    bar = 14 * (1 + caption.count("\n"))
    canvas = Image.new("RGB", (columns * size, rows * size + bar), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(Image.fromarray(np.asarray(tile, np.uint8)), ((i % columns) * size, bar + (i // columns) * size))
    ImageDraw.Draw(canvas).multiline_text((2, 1), caption, fill="black", spacing=2)
    return np.asarray(canvas)


# The files bdjax writes, as patterns of paths relative to an output directory. Only files that
# match are ever counted as a previous run's results or removed by --overwrite: anything else a
# user keeps there (notes.png in ranked/, say) is left alone.
EDIT_OUTPUTS = (re.escape(GRID), re.escape(REPORT), rf"{RANKED_DIR}/\d{{3,}}_(-?\d+\.\d{{4}}|-?inf|nan)\.png",
                rf"{SAMPLES_DIR}/sample_\d+\.(png|json)")


def own_outputs(output_dir: str, patterns=EDIT_OUTPUTS) -> list[str]:
    """The files in `output_dir` whose relative path matches one of `patterns` (regular
    expressions over "name" or "subdir/name", one level deep), sorted."""
    found = []
    for directory in sorted({os.path.dirname(p) for p in patterns}):
        try:
            names = os.listdir(os.path.join(output_dir, directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            relative = f"{directory}/{name}" if directory else name
            path = os.path.join(output_dir, relative)
            if any(re.fullmatch(p, relative) for p in patterns) and os.path.isfile(path):
                found.append(path)
    return sorted(found)


def remove_outputs(output_dir: str, paths: list[str]) -> None:
    """Remove `paths` (found by `own_outputs`), then the subdirectories they leave empty."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    for directory in sorted({os.path.dirname(p) for p in paths}, reverse=True):
        if os.path.abspath(directory) != os.path.abspath(output_dir) and os.path.isdir(directory) \
                and not os.listdir(directory):
            os.rmdir(directory)


def clear_for_run(output_dir: str, patterns=EDIT_OUTPUTS, *, overwrite: bool) -> list[str]:
    """Make `output_dir` ready for a run, after its checks passed: remove the temporaries of
    killed writes there and in its result subdirectories, and with `overwrite` the previous
    run's results (bdjax's own files only). Returns what it removed."""
    removed = []
    for directory in sorted({os.path.dirname(p) for p in patterns}):
        removed += remove_stale_temporaries(os.path.join(output_dir, directory))
    old = own_outputs(output_dir, patterns)
    if old and not overwrite:
        raise FileExistsError(f"{output_dir} already holds results ({len(old)} files, e.g. {old[0]}); "
                              "choose another output directory or pass --overwrite")
    remove_outputs(output_dir, old)
    return removed + old


def sample_name(sample_id: int, ext: str = "png") -> str:
    return f"sample_{sample_id}.{ext}"


def link_or_copy(src: str, dst: str) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), else a copy; atomic either way."""
    def write(tmp):
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(src, tmp)
            os.chmod(tmp, file_mode())
    atomic_write(dst, write)


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class EditWriter:
    """Writes an edit to disk as its batches finish, then ranks it from disk.

    `add(batch)` writes each finished sample k at once, as samples/sample_<k>.png with its entry
    samples/sample_<k>.json ({sample_id, seed, distance, file}); a sample whose image or distance
    is not finite gets only its entry, with distance null and the reason in "failed". So a run
    that stops early leaves every finished sample on disk. Only (sample id, distance) pairs stay
    in memory. `finish` then writes ranked/NNN_<distance>.png best first (links to the sample
    files), grid.png from the best `grid_size` read back, and report.json, whose "failed" lists
    the samples left out.
    """

    def __init__(self, output_dir: str, seed: int):
        self.output_dir, self.seed = output_dir, seed
        self.done: list[tuple[float, int]] = []      # (distance, sample id) of the finite samples
        self.failed: list[tuple[int, str]] = []      # (sample id, reason)

    def add(self, batch) -> list[tuple[int, str]]:
        """Write one EditBatch; returns its failed samples as (sample id, reason)."""
        failed = []
        for k, image, distance, finite in zip(batch.sample_ids, batch.images, batch.distances, batch.finite):
            k, distance = int(k), float(distance)
            entry = {"sample_id": k, "seed": int(self.seed), "distance": finite_or_none(distance)}
            if finite:
                entry["file"] = f"{SAMPLES_DIR}/{sample_name(k)}"
                save_png(os.path.join(self.output_dir, entry["file"]), image)
                self.done.append((distance, k))
            else:
                reason = (f"its CLIP distance is {distance}" if not np.isfinite(distance)
                          else "its image holds NaN or infinite values")
                entry["failed"] = reason
                failed.append((k, reason))
            save_json(os.path.join(self.output_dir, SAMPLES_DIR, sample_name(k, "json")), entry)
        self.failed += failed
        return failed

    def finish(self, source: np.ndarray, mask: np.ndarray, prompt: str, report: dict, *, label: str = "",
               grid_size: int = 8) -> list[str]:
        """ranked/, grid.png and report.json from what `add` wrote; returns the ranked paths."""
        ranked, samples = [], []
        for rank, (distance, k) in enumerate(sorted(self.done)):
            path = os.path.join(self.output_dir, RANKED_DIR, ranked_name(rank, distance))
            link_or_copy(os.path.join(self.output_dir, SAMPLES_DIR, sample_name(k)), path)
            ranked.append(path)
            samples.append({"rank": rank, "sample_id": k, "seed": int(self.seed), "distance": distance,
                            "file": os.path.relpath(path, self.output_dir)})
        best = [read_png(p) for p in ranked[:grid_size]]
        caption = f"{prompt!r}: source, mask, best {len(best)} of {len(ranked)}"
        if self.failed:
            caption += f" ({len(self.failed)} failed)"
        if label:
            caption = f"{label}\n{caption}"
        save_png(os.path.join(self.output_dir, GRID), grid(source, mask, best, caption))
        failed = [{"sample_id": k, "reason": reason} for k, reason in sorted(self.failed)]
        save_json(os.path.join(self.output_dir, REPORT),
                  {**finite_or_none(report), "label": label or None, "samples": samples, "failed": failed})
        return ranked

