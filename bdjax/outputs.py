"""Writing results: ranked PNGs, an overview grid and a JSON report, never half-written.

Every file is written to a temporary name in its directory and renamed into place, so a run
killed at any moment leaves either the old file, the new file, or nothing.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw

RANKED_DIR = "ranked"
GRID = "grid.png"
REPORT = "report.json"


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path`; the temp file never outlives a failure."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path: str, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG"))


def save_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    atomic_write(path, write)


def check_writable(output_dir: str) -> None:
    """Fail now, before any slow work, if results could not be written to `output_dir`.

    Leaves nothing behind: a directory created for the probe is removed again.
    """
    parent = os.path.abspath(output_dir)
    created = []
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot write to {output_dir}: {parent} is a file, not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".tmp-probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to {output_dir} ({e.strerror}); choose another output directory") from None
    finally:
        for path in created:  # innermost first
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)


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


def existing_outputs(output_dir: str) -> list[str]:
    found = [p for p in (os.path.join(output_dir, GRID), os.path.join(output_dir, REPORT)) if os.path.exists(p)]
    return found + sorted(glob.glob(os.path.join(output_dir, RANKED_DIR, "*.png")))


def write_edit(result, output_dir: str, report: dict, *, overwrite: bool = False, label: str = "",
               grid_size: int = 8) -> list[str]:
    """ranked/NNN_<distance>.png best first, grid.png and report.json; returns the written paths.

    An output directory holding a previous run is refused unless `overwrite`; with it, the
    previous ranked images are removed first so the two runs never mix.
    """
    old = existing_outputs(output_dir)
    if old and not overwrite:
        raise FileExistsError(f"{output_dir} already holds results ({len(old)} files, e.g. {old[0]}); "
                              "choose another output directory or pass --overwrite")
    for path in old:
        os.remove(path)
    written = []
    samples = []
    for rank, (image, distance, sample_id) in enumerate(zip(result.images, result.distances, result.sample_ids)):
        path = os.path.join(output_dir, RANKED_DIR, ranked_name(rank, float(distance)))
        save_png(path, image)
        written.append(path)
        samples.append({"rank": rank, "sample_id": int(sample_id), "seed": int(result.seed),
                        "distance": float(distance), "file": os.path.relpath(path, output_dir)})
    caption = f"{result.prompt!r}: source, mask, best {min(grid_size, len(result.images))} of {len(result.images)}"
    if label:
        caption = f"{label}\n{caption}"
    save_png(os.path.join(output_dir, GRID), grid(result.source, result.mask, result.images[:grid_size], caption))
    written.append(os.path.join(output_dir, GRID))
    save_json(os.path.join(output_dir, REPORT), {**report, "label": label or None, "samples": samples})
    written.append(os.path.join(output_dir, REPORT))
    return written
