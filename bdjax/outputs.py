"""Writing results: samples as they finish, ranked PNGs, an overview grid and a JSON report,
never half-written, each PNG carrying where it came from.

Every file is written to a temporary name in its directory and renamed into place, so a run
killed at any moment leaves either the old file, the new file, or nothing (plus, at worst, a
`.tmp-*` file that the next run removes). JSON is strict: no NaN or Infinity.

Every PNG bdjax writes goes through `save_png`, which stores its provenance (prompt, seed, sample
id, distance, options, the smoke label, bdjax's version) in PNG text chunks: all of it as JSON
under the key "bdjax" (UTF-8, so any prompt survives), a readable summary under "Description" and
"bdjax VERSION" under "Software". `read_provenance` reads it back. The chunks hold nothing that
changes between runs (no time stamps), so a rerun writes the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from bdjax.files import atomic_write, file_mode, remove_stale_temporaries

RANKED_DIR = "ranked"
SAMPLES_DIR = "samples"
CROPS_DIR = "crops"  # window mode: the model-size edits CLIP ranked
GRID_TILE = 256  # grid tiles wider than this (and than the model size) are shown downscaled
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


PROVENANCE_KEY = "bdjax"  # the PNG text chunk holding a file's provenance as JSON


def describe(record: dict) -> str:
    """A provenance record as "name: value" lines for PNG viewers (a mapping's items as
    "key=value, ..."); lists (a grid's tiles, an extrapolation's rounds) are in the JSON only."""
    def text(value) -> str:
        return ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)

    return "\n".join(f"{k}: {text(v)}" for k, v in record.items() if not isinstance(v, list))


def png_text(provenance: dict | None) -> PngInfo:
    """The PNG text chunks of `provenance`: "bdjax" (JSON, iTXt), "Description" (iTXt) and
    "Software" (tEXt). The record is `provenance` with non-finite numbers as null, plus
    "bdjax_version"."""
    from bdjax import __version__

    record = {"bdjax_version": __version__, **finite_or_none(dict(provenance or {}))}
    info = PngInfo()
    info.add_text("Software", f"bdjax {__version__}")
    info.add_itxt("Description", describe(record))
    info.add_itxt(PROVENANCE_KEY, json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False,
                                             default=_json_default))
    return info


def save_png(path: str, image: np.ndarray, provenance: dict | None = None) -> None:
    """Write `image` (uint8 [H, W, 3] or [H, W]) as a PNG carrying `provenance` (a JSON-able
    dict; see `read_provenance`). The pixels are stored exactly as given."""
    info = png_text(provenance)
    atomic_write(path, lambda tmp: Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG",
                                                                                     pnginfo=info))


def read_provenance(path: str) -> dict:
    """The provenance a bdjax PNG carries: the dict given to `save_png` plus "bdjax_version"
    ({} for a PNG bdjax did not write). E.g. a sample's prompt, seed, sample_id, distance,
    options, run (config, precision, model size, weights digest) and, for a smoke run, label."""
    with Image.open(path) as im:
        im.load()  # text chunks after the image data are read with it
        text = im.info.get(PROVENANCE_KEY)
    return {} if text is None else json.loads(text)


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


def ranked_name(rank: int, distance: float, sample_id: int = 0) -> str:
    return f"{rank:03d}_{distance:.4f}.png"


def reference_naming(stem: str, batch_size: int):
    """The reference's name of a ranked result: its distance to 4 decimals without the point,
    then `<stem>_i_<iteration>_b_<row>.png`, sample k being row k % batch_size of iteration
    k // batch_size. A `ranked_name` for EditWriter."""
    sample = reference_sample_name(stem, batch_size)
    return lambda rank, distance, sample_id: f"{distance:.4f}".replace(".", "") + "_" + sample(sample_id)


def reference_sample_name(stem: str, batch_size: int):
    """The reference's name of sample k's files: `<stem>_i_<iteration>_b_<row>.<ext>`, sample k
    being row k % batch_size of iteration k // batch_size (a `sample_name`)."""
    def name(sample_id: int, ext: str = "png") -> str:
        iteration, row = divmod(int(sample_id), int(batch_size))
        return f"{stem}_i_{iteration}_b_{row}.{ext}"
    return name


def reference_outputs(stem: str, output_file: str | None) -> tuple[str, ...]:
    """The patterns (as EDIT_OUTPUTS) of the files the reference's naming adds: the ranked files
    and the best result's copy."""
    ranked = rf"{RANKED_DIR}/-?\d+_{re.escape(stem)}_i_\d+_b_\d+\.png"
    return (ranked,) + ((re.escape(output_file),) if output_file else ())


# Captions are drawn in the first of these that can be loaded: DejaVu Sans where the system has it
# (Latin, Greek and Cyrillic, with visible spaces), Pillow's own scalable font (Latin) at a size
# whose spaces show, or, where Pillow lacks FreeType, its bitmap font (Latin-1 only: other
# characters are drawn as "?").
FONT_SIZE = 11


def caption_font(size: int = FONT_SIZE):
    """The font captions are drawn in (see above)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size + 1)
    except ImportError:  # no FreeType
        return ImageFont.load_default_imagefont()


FONT = caption_font()
LINE_SPACING = 2


def drawable(text: str, font=None) -> str:
    """`text` as `font` (default: FONT) can draw it: a bitmap font draws Latin-1 only, and the
    rest as "?"."""
    if isinstance(FONT if font is None else font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", errors="replace").decode("latin-1")
PAD = 2


def wrap(text: str, width: int, font=None) -> list[str]:
    """`text` as lines no wider than `width` pixels in `font` (default: FONT): broken at spaces, inside a word
    only where the word alone is wider, and at every line break of `text`. Nothing is dropped:
    joining the lines with the breaks they replaced gives `text` back."""
    font = FONT if font is None else font

    def fits(t: str) -> bool:
        return font.getlength(drawable(t, font)) <= width

    lines = []
    for paragraph in text.split("\n"):
        line = None
        for word in paragraph.split(" "):
            if line is not None and fits(f"{line} {word}"):
                line = f"{line} {word}"
                continue
            if line is not None:
                lines.append(line)
            while len(word) > 1 and not fits(word):  # the longest head that fits, at least one character
                cut = max([n for n in range(1, len(word)) if fits(word[:n])], default=1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _line_height() -> int:
    return FONT.getbbox("Ag")[3] + LINE_SPACING


def sheet(tiles, captions, heading: str, columns: int = 8, offsets=None) -> np.ndarray:
    """`tiles` (uint8 [H, W, 3] or [H, W]) in rows of `columns`, each above its caption, under a
    `heading`; every text is wrapped to its width, never cut. Tiles of different widths share the
    widest one's cell, placed at `offsets` (pixels from the cell's left, default 0) on white."""
    tiles = [np.repeat(t[..., None], 3, axis=-1) if t.ndim == 2 else t for t in map(np.asarray, tiles)]
    offsets = [0] * len(tiles) if offsets is None else offsets
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] + x for t, x in zip(tiles, offsets))
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    line = _line_height()
    head = wrap(heading, columns * cell_w - 2 * PAD) if heading else []
    notes = [wrap(c, cell_w - 2 * PAD) for c in captions]
    head_h = len(head) * line + (PAD if head else 0)
    note_h = max(len(n) for n in notes) * line + PAD if notes else 0
    canvas = Image.new("RGB", (columns * cell_w, head_h + rows * (cell_h + note_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(head):
        draw.text((PAD, PAD + i * line), drawable(text), fill="black", font=FONT)
    for i, (tile, x) in enumerate(zip(tiles, offsets)):
        left, top = (i % columns) * cell_w, head_h + (i // columns) * (cell_h + note_h)
        canvas.paste(Image.fromarray(np.asarray(tile, np.uint8)), (left + x, top))
        for n, text in enumerate(notes[i] if i < len(notes) else []):
            draw.text((left + PAD, top + cell_h + n * line), drawable(text), fill="black", font=FONT)
    return np.asarray(canvas)


def tile_caption(rank: int, distance: float, scores: dict | None = None) -> str:
    """A result's caption: rank and CLIP distance, then its other scores in short form."""
    from bdjax.scores import short

    text = f"#{rank} d={distance:.4f}"
    rest = short(scores) if scores else ""
    return f"{text} {rest}" if rest else text


def grid(source: np.ndarray, mask: np.ndarray, images, distances, heading: str, columns: int = 8,
         scores=None) -> np.ndarray:
    """Source, mask, then the results in rank order, each captioned (rank, CLIP distance and, given
    `scores` (one dict per result), the other scores in short form), under a heading; uint8 [H', W', 3]."""
    scores = [None] * len(distances) if scores is None else scores
    captions = ["source", "mask", *(tile_caption(r, d, s) for r, (d, s) in enumerate(zip(distances, scores)))]
    return sheet([source, mask, *images], captions, heading, columns)


# The files bdjax writes, as patterns of paths relative to an output directory. Only files that
# match are ever counted as a previous run's results or removed by --overwrite: anything else a
# user keeps there (notes.png in ranked/, say) is left alone.
EDIT_OUTPUTS = (re.escape(GRID), re.escape(REPORT), rf"{RANKED_DIR}/\d{{3,}}_(-?\d+\.\d{{4}}|-?inf|nan)\.png",
                rf"{SAMPLES_DIR}/sample_\d+\.(png|json)", rf"{CROPS_DIR}/sample_\d+\.png")


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
                              "choose another output directory or pass overwrite=True (--overwrite)")
    remove_outputs(output_dir, old)
    return removed + old


VIDEOS_DIR, ASSETS_DIR = "videos", "assets"  # --vid's and --export_assets' folders (launch.edit)
ASSET_MASK = "mask.png"  # --export_assets: the mask at the model size, as every sample used it
VIDEO_FPS = 10


def video_format() -> str:
    """The format `write_video` writes: animated WebP (lossless) where Pillow has WebP, else GIF."""
    from PIL import features

    return "webp" if features.check("webp") else "gif"


def write_video(path: str, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """`frames` (uint8 [H, W, 3]) as an animation at `path`, in `video_format()`: lossless WebP
    keeps every frame's pixels exactly; GIF (no WebP in this Pillow) reduces each to 256 colours."""
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    extra = {"lossless": True, "method": 0} if video_format() == "webp" else {"loop": 0}

    def write(tmp):
        images[0].save(tmp, format=video_format().upper(), save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), **extra)
    atomic_write(path, write)


class StepRecorder:
    """The `on_step` of an edit (BlendedDiffusion.edit_batches) that writes, per sample, the video
    of its predicted image over the steps (`video`; run with every_step=True for a frame per
    step) and its raw final prediction (`assets`, plus the mask once, ASSET_MASK). Each sample's
    frames are kept for its batch only and written when the batch is (`write`): memory is one
    batch's frames, whatever the number of samples. `name(k, ext)` names sample k's files
    (default sample_<k>.<ext>); videos go to `videos_dir` under `directory` ("" for beside it)."""

    def __init__(self, directory: str, request, *, video: bool, assets: bool, name=None,
                 videos_dir: str = VIDEOS_DIR):
        self.directory, self.request, self.video, self.assets = directory, request, video, assets
        self.name = name or sample_name
        self.videos = os.path.join(directory, videos_dir)
        self.frames: dict[int, list] = {}
        self.final: dict[int, np.ndarray] = {}
        self.about: dict = {}

    def start(self, about: dict) -> None:
        """Before the first batch: remember the provenance; with `assets`, write the mask."""
        self.about = about
        if self.assets:
            mask = (np.asarray(self.request.inputs.region)[..., 0] > 0).astype(np.uint8) * 255
            save_png(os.path.join(self.directory, ASSETS_DIR, ASSET_MASK), mask, {"kind": "asset_mask", **about})

    def __call__(self, preview) -> None:
        for i, k in enumerate(preview.sample_ids):
            if self.video:
                self.frames.setdefault(int(k), []).append(preview.images[i])
            if preview.step == preview.num_steps:
                self.final[int(k)] = preview.raw[i]

    def video_path(self, k: int) -> str:
        return os.path.join(self.videos, self.name(k, video_format()))

    def write(self, batch) -> list[str]:
        """Write the videos and assets of `batch` (an EditBatch; its non-finite samples get
        neither), forget its frames; returns the videos written."""
        written = []
        for k, distance, finite in zip(batch.sample_ids, batch.distances, batch.finite):
            k = int(k)
            frames, raw = self.frames.pop(k, None), self.final.pop(k, None)
            if not finite:
                continue
            if frames and self.video:
                write_video(self.video_path(k), frames)
                written.append(self.video_path(k))
            if raw is not None and self.assets:
                image = np.round(np.clip((raw + 1) / 2, 0, 1) * 255).astype(np.uint8)
                save_png(os.path.join(self.directory, ASSETS_DIR, self.name(k)), image,
                         sample_provenance(self.about, k, float(distance), kind="asset"))
        return written


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


def at_most(image: np.ndarray, width: int) -> np.ndarray:
    """`image` downscaled with Lanczos to `width` pixels wide (aspect kept) if it is wider."""
    if image.shape[1] <= width:
        return image
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


class EditWriter:
    """Writes an edit to disk as its batches finish, then ranks it from disk.

    `add(batch)` writes each finished sample k at once, as samples/sample_<k>.png with its entry
    samples/sample_<k>.json ({sample_id, seed, distance, scores, file}) and, in window mode (where the
    results are the full-size photo), the model-size edit CLIP ranked as crops/sample_<k>.png; a
    sample whose image or distance is not finite gets only its entry, with distance null and the
    reason in "failed". So a run
    that stops early leaves every finished sample on disk. Only each sample's id, ranking value and
    scores stay in memory. `finish` then writes ranked/NNN_<value>.png best first (links to the
    sample files; the value is the one ranked by, the CLIP distance unless `options.rank_by` says
    otherwise), grid.png from the best `grid_size` read back, and report.json, whose "failed" lists
    the samples left out.

    Every PNG carries `provenance` (`edit_provenance`: prompt, options, ...) with the seed and,
    per sample, its id, distance and scores; the grid lists its tiles' ranks, sample ids and distances.
    """

    def __init__(self, output_dir: str, seed: int, provenance: dict | None = None, *, ranked_name=ranked_name,
                 options=None):
        """`ranked_name(rank, value, sample_id)`: the ranked files' names (bdjax's, or the
        reference's: `reference_naming`). `options` (EditOptions) say what to rank by (None: the
        reference's CLIP distance)."""
        self.output_dir, self.seed, self.ranked_name, self.options = output_dir, seed, ranked_name, options
        self.provenance = {**(provenance or {}), "seed": int(seed)}
        self.done: list[tuple[float, int]] = []      # (ranking value, sample id) of the finite samples
        self.scores: dict[int, dict] = {}            # sample id -> its scores (bdjax/scores.py), finite samples
        self.failed: list[tuple[int, str]] = []      # (sample id, reason)
        self.model_size = 0                          # the edits' width, for the grid's tiles

    def add(self, batch) -> list[tuple[int, str]]:
        """Write one EditBatch; returns its failed samples as (sample id, reason)."""
        from bdjax import scores as scores_lib

        failed = []
        crops = getattr(batch, "crops", None)
        self.model_size = (batch.images if crops is None else crops).shape[2]
        batch_scores = getattr(batch, "scores", None) or {"clip_masked": np.asarray(batch.distances)}
        for i, (k, image, distance, finite) in enumerate(zip(batch.sample_ids, batch.images, batch.distances,
                                                            batch.finite)):
            k, distance = int(k), float(distance)
            scores = scores_lib.row(batch_scores, i)
            entry = {"sample_id": k, "seed": int(self.seed), "distance": finite_or_none(distance), "scores": scores}
            if finite:
                if crops is not None:
                    entry["crop"] = f"{CROPS_DIR}/{sample_name(k)}"
                    save_png(os.path.join(self.output_dir, entry["crop"]), crops[i],
                             sample_provenance(self.provenance, k, distance, kind="crop", scores=scores))
                entry["file"] = f"{SAMPLES_DIR}/{sample_name(k)}"
                save_png(os.path.join(self.output_dir, entry["file"]), image,
                         sample_provenance(self.provenance, k, distance, scores=scores))
                self.done.append((scores_lib.rank_value(scores, self.options), k))
                self.scores[k] = scores
            else:
                reason = (f"its CLIP distance is {distance}" if not np.isfinite(distance)
                          else "its image holds NaN or infinite values")
                entry["failed"] = reason
                failed.append((k, reason))
            save_json(os.path.join(self.output_dir, SAMPLES_DIR, sample_name(k, "json")), entry)
        self.failed += failed
        return failed

    def ranked_edits(self, count: int) -> list[str]:
        """The model-size edits (crops/ in window mode, else the samples) of the best `count`
        results, best first: what a run's diversity compares."""
        paths = []
        for _, k in sorted(self.done)[:count]:
            crop = os.path.join(self.output_dir, CROPS_DIR, sample_name(k))
            paths.append(crop if os.path.exists(crop) else os.path.join(self.output_dir, SAMPLES_DIR, sample_name(k)))
        return paths

    def finish(self, source: np.ndarray, mask: np.ndarray, prompt: str, report: dict, *, label: str = "",
               grid_size: int = 8) -> list[str]:
        """ranked/, grid.png and report.json from what `add` wrote; returns the ranked paths.
        report.json holds `report`, the ranking used ("rank_by"), every sample's scores and the
        scores' aggregates (mean, median, best)."""
        from bdjax import scores as scores_lib

        ranked, samples = [], []
        for rank, (value, k) in enumerate(sorted(self.done)):
            path = os.path.join(self.output_dir, RANKED_DIR, self.ranked_name(rank, value, k))
            link_or_copy(os.path.join(self.output_dir, SAMPLES_DIR, sample_name(k)), path)
            ranked.append(path)
            distance = self.scores[k].get("clip_masked", value)
            samples.append({"rank": rank, "sample_id": k, "seed": int(self.seed), "distance": distance,
                            "rank_value": value, "scores": self.scores[k],
                            "file": os.path.relpath(path, self.output_dir)})
        shown = samples[:grid_size]
        heading = f"{prompt!r}: source, mask, best {len(shown)} of {len(ranked)}"
        if self.failed:
            heading += f" ({len(self.failed)} failed)"
        if label:
            heading = f"{label}\n{heading}"
        tiles = [{k: s[k] for k in ("rank", "sample_id", "distance", "scores")} for s in shown]
        # Full-size results (window mode) are shown downscaled; model-size ones as they are.
        width = max(GRID_TILE, self.model_size)
        save_png(os.path.join(self.output_dir, GRID),
                 grid(at_most(source, width), at_most(mask, width),
                      [at_most(read_png(p), width) for p in ranked[:grid_size]], [s["distance"] for s in shown],
                      heading, scores=[s["scores"] for s in shown]),
                 {"kind": "grid", "prompt": prompt, **self.provenance, "tiles": tiles})
        failed = [{"sample_id": k, "reason": reason} for k, reason in sorted(self.failed)]
        rank_by = "clip_masked" if self.options is None else self.options.rank_by
        save_json(os.path.join(self.output_dir, REPORT),
                  {**finite_or_none(report), "label": label or None, "rank_by": rank_by,
                   "aggregates": scores_lib.aggregate([s["scores"] for s in samples]),
                   "samples": samples, "failed": failed})
        return ranked


def sample_provenance(about: dict, sample_id: int, distance: float, kind: str = "sample",
                      scores: dict | None = None) -> dict:
    """What a sample's PNG (or its crop's, `kind="crop"`) records: the edit's `about`
    (`edit_provenance`, with the seed) plus the sample's id, CLIP distance and, given, its scores."""
    record = {"kind": kind, **about, "sample_id": int(sample_id), "distance": float(distance)}
    if scores:
        record["scores"] = dict(scores)
    return record


def edit_provenance(options, label: str = "", run: dict | None = None, **fields) -> dict:
    """What every PNG of an edit records: `fields` (prompt=..., seed=...), the options as run (an
    EditOptions or its dict), the run's identity (`batch.run_identity`: config, precision, model
    size, weights digest) and, for the smoke preset, its label."""
    record = {**fields, "options": options if isinstance(options, dict) else dataclasses.asdict(options)}
    if run:
        record["run"] = dict(run)
    if label:
        record["label"] = label
    return record
