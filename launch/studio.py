"""The web app's work apart from its page: one editor shared by every visitor, one run at a time,
each run in its own folder, and each browser's history of runs (launch/app.py is the page).

A visitor is a browser: the page keeps a random id in the browser's storage, so that a reload (or
a second tab) finds the runs it started. `Studio.history` keeps each visitor's last MAX_HISTORY
runs, their inputs and how to show their results, until the server stops; the runs' folders stay
on disk after that.
"""

import collections
import contextvars
import dataclasses
import os
import queue
import sys
import threading
import time
import warnings

import numpy as np

from bdjax import window as window_lib
from launch import cli

PREPARING = "preparing the sampler (compiling it, or loading it from the compilation cache)"
# The framing's defaults (--fit, --context and --feather's): window mode.
FRAMING_DEFAULTS = {"fit": "window", "context": window_lib.DEFAULT_CONTEXT, "feather": window_lib.DEFAULT_FEATHER}
MAX_HISTORY = 50  # runs kept in each visitor's history (the oldest leaves it; its folder stays)
MAX_VISITORS = 1000  # visitors with a history (the least recently active leaves)
SOURCE, MASK, WINDOW = "source.png", "mask.png", "window.png"  # a run's inputs, beside the results
RESULTS_ZIP = "results.zip"  # the run's downloads in one file
# The score table's columns: a result's rank, sample id and seed, then its scores (bdjax/scores.py).
TABLE_HEADERS = ("rank", "sample", "seed", "clip_masked", "clip_whole", "background_psnr", "background_lpips", "seam")
MODEL_INPUTS = ("source_model.png", "mask_model.png")  # window mode: the window as the model saw it
PREVIEW_WIDTH = 1024  # window.png's widest
TINT = (255, 0, 160)  # the mask's colour over the photo in previews (the brush's)


@dataclasses.dataclass
class Run:
    """One request's place in the app: its results folder, the page (session) that can cancel
    it, when it was submitted, and the visitor whose history it joins."""
    directory: str
    session: str
    submitted: float
    visitor: str = ""


@dataclasses.dataclass
class Entry:
    """A run in a visitor's history: its folder's name, the page's values it ran with (by field
    name: prompt, num_samples, seed, the options), and, once it ends, what the page shows of it."""
    name: str
    directory: str
    values: dict
    state: str = "running"  # then the summary line: "2 results ranked (best distance ...)", ...
    gallery: list = dataclasses.field(default_factory=list)  # (path, caption), best first
    files: list = dataclasses.field(default_factory=list)  # the downloads
    table: list = dataclasses.field(default_factory=list)  # the results' scores, a row each (TABLE_HEADERS)

    @property
    def label(self) -> str:
        """The history list's line for this run."""
        prompt = self.values.get("prompt") or "(no prompt)"
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "..."
        state = self.state if self.state == "running" else f"{len(self.gallery)} results"
        return f"{self.name}: {prompt!r}, seed {self.values.get('seed')}, {state}"


class Studio:
    """The app's state and work, apart from the page: one editor, one run at a time."""

    def __init__(self, editor, options: dict, output_dir: str, *, label: str = "", load_s: float = 0.0,
                 max_samples: int = 64, program: str = "launch.app"):
        """`options`: the page's option values (the flags'): EditOptions' fields and the framing
        (fit, context, feather; window mode's defaults where absent); `label`: the smoke preset's
        label, or ""; `load_s`: the seconds the networks took to load, for reports; `program`: the
        launch module whose flags the reports record."""
        self.editor, self.output_dir, self.label = editor, output_dir, label
        self.defaults = {**FRAMING_DEFAULTS, **options}
        self.load_s, self.max_samples, self.program = load_s, max_samples, program
        self.lock = threading.Lock()  # one sampler run at a time (the queue already serialises requests)
        self.cancelled: dict[str, float] = {}  # session -> when its user last pressed "cancel"
        self.pending: dict[str, int] = {}  # session -> its requests queued or running
        self.progress = None  # the running request's progress tracker, for the compile stage
        self.history: collections.OrderedDict[str, list[Entry]] = collections.OrderedDict()  # visitor -> runs

    def record(self, visitor: str, entry: Entry) -> None:
        """Add `entry` to `visitor`'s history (bounded: MAX_HISTORY runs, MAX_VISITORS visitors)."""
        runs = self.history.setdefault(visitor, [])
        self.history.move_to_end(visitor)
        runs.append(entry)
        del runs[:-MAX_HISTORY]
        while len(self.history) > MAX_VISITORS:
            self.history.popitem(last=False)

    def runs_of(self, visitor: str) -> list[Entry]:
        """`visitor`'s runs, newest first."""
        return list(reversed(self.history.get(visitor, []))) if visitor else []

    def entry(self, visitor: str, name: str) -> Entry | None:
        return next((e for e in self.runs_of(visitor) if e.name == name), None)

    def new_run_dir(self) -> str:
        """OUTPUT_DIR/run_NNNN, the first number not taken: a run never writes into another's.
        OUTPUT_DIR is made again if it was removed while the app ran; OSError (one line) where it
        cannot be."""
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            taken = os.listdir(self.output_dir)
        except OSError as e:
            raise OSError(f"the results folder {self.output_dir} cannot be used ({e.strerror or e}): ask whoever runs "
                          "this app to check it") from None
        number = 1 + max([int(n[4:]) for n in taken if n.startswith("run_") and n[4:].isdigit()], default=0)
        while True:
            path = os.path.join(self.output_dir, f"run_{number:04d}")
            try:
                os.makedirs(path)
                return path
            except FileExistsError:
                number += 1

    def submitted(self, session: str) -> float:
        """Count a request of `session` as pending; returns its submission time."""
        self.pending[session] = self.pending.get(session, 0) + 1
        return time.monotonic()

    def finished(self, run: Run) -> None:
        left = self.pending.get(run.session, 1) - 1
        if left > 0:
            self.pending[run.session] = left
        else:
            self.pending.pop(run.session, None)
            self.cancelled.pop(run.session, None)

    def cancel(self, session: str) -> bool:
        """Stop the requests `session` has queued or running (a running one after its current
        batch); False when it has none."""
        if not self.pending.get(session):
            return False
        self.cancelled[session] = time.monotonic()
        return True

    def show_compiling(self) -> None:
        """Say on the running request's page that its configuration's sampler is being prepared
        (compiled, or loaded from the compilation cache: a request with new advanced options, say),
        as a stage of its progress."""
        if self.progress is not None:
            self.progress(0, desc=PREPARING)

    def is_cancelled(self, run: Run) -> bool:
        return self.cancelled.get(run.session, float("-inf")) >= run.submitted

    def prepare(self, editor_value, mask_file, invert: bool, prompt: str, num_samples, seed, options: dict, *,
                frame=None, grow=0):
        """The request of the page's inputs, checked (bdjax/painting.py, editor.prepare), and the
        warnings its inputs raised; ValueError says what is wrong in one line. `options` holds
        EditOptions' fields and the framing (fit, context, feather: request.prepare_inputs);
        `frame`: the margin the page put around the photo in the editor (painting.framed);
        `grow`: pixels by which the region to change is widened (after inverting)."""
        from bdjax import image_io, painting

        for value, what in ((editor_value, "photo"), (mask_file, "uploaded mask")):
            if isinstance(value, Unreadable):
                raise ValueError(f"the {what} could not be read: {value}")
        fields = {"samples": num_samples, "seed": seed, "grow": grow, **options}
        empty = next((name for name, value in fields.items() if value is None), None)
        if empty is not None:  # a number field the user cleared
            raise ValueError(f"the {empty} field is empty: enter a value (its default is in the field's help)"
                             if empty in options else f"the {empty} field is empty: enter a whole number")
        if isinstance(num_samples, (int, float)) and not isinstance(num_samples, bool) \
                and num_samples > self.max_samples:
            raise ValueError(f"num_samples={num_samples} is more than this app's limit of {self.max_samples} "
                             "(--max_samples)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            painted = painting.from_editor(editor_value, mask_file, invert_mask=invert, frame=frame)
            mask = painted.mask
            if _int(grow):  # widen the region to change: the mask as it will be used, inverted first
                region = np.asarray(image_io.to_pil(mask, "mask").convert("L")) > 0
                mask = painting.grow(~region if invert else region, _int(grow))
                invert = False
            prompt = (prompt or "").strip()
            request = self.editor.prepare(painted.image, mask, prompt, num_samples=_int(num_samples),
                                          seed=_int(seed), invert_mask=bool(invert),
                                          **{name: _option(name, value) for name, value in options.items()})
        notes = [str(w.message) for w in caught]
        if not prompt:
            notes.append("the prompt is empty: the edit runs unguided (no CLIP guidance: the diffusion model fills "
                         "the region on its own)")
        return request, notes

    def edit(self, request, run: Run, mask_source: str, values: dict | None = None, *, video: bool = False):
        """Run `request` into `run.directory`, yielding ("preview", StepPreview, writer) after each
        chunk of steps (the current batch's predictions), ("progress", k, writer) after each batch
        and ("done", entry, writer) at the end (also after a cancel, with what finished): `entry`
        holds the run's summary, gallery and downloads. The run joins `run.visitor`'s history as
        it starts, with the page's `values` it ran with (by field name). With `video`, each
        sample's video over the steps is written too (videos/, in the downloads).

        The sampling runs in a thread of its own (in this request's context, so its progress
        reaches the page) that hands batches and previews over a queue: the previews reach the
        page while a batch runs."""
        from bdjax import outputs

        editor = self.editor
        entry = Entry(os.path.basename(run.directory), run.directory, dict(values or {}))
        if run.visitor:
            self.record(run.visitor, entry)
        about = cli.provenance(editor, request.options, self.label, prompt=request.prompt, **request.inputs.framing())
        write_inputs(request.inputs, run.directory, about)
        writer = outputs.EditWriter(run.directory, request.seed, about, options=request.options)
        recorder = outputs.StepRecorder(run.directory, request, video=True, assets=False) if video else None
        if recorder is not None:
            recorder.start(about)
        videos: list[str] = []
        events: queue.Queue = queue.Queue()
        taken = threading.Event()  # the request's thread has written and shown the batch handed over

        def on_step(preview):
            if recorder is not None:
                recorder(preview)
            events.put(("preview", preview))

        def produce(stream):
            batches = iter(stream)
            try:
                for batch in batches:
                    events.put(("batch", batch))
                    taken.wait()  # the batch written and shown, as a run without previews would
                    taken.clear()
                    if self.is_cancelled(run):  # checked before the next batch starts
                        break
            except BaseException as e:  # handed to the request's thread, which raises it
                events.put(("error", e))
            finally:
                batches.close()  # a cancelled or failed run stops here, its progress bar closed
                events.put(("end", None))

        start = time.perf_counter()
        try:
            with self.lock:
                stream = editor.edit_batches(request, progress=True, on_step=on_step, every_step=video)
                context = contextvars.copy_context()
                worker = threading.Thread(target=context.run, args=(produce, stream), daemon=True)
                worker.start()
                try:
                    while True:
                        kind, item = events.get()
                        if kind == "preview":
                            yield "preview", item, writer
                        elif kind == "batch":
                            writer.add(item)
                            if recorder is not None:
                                videos += recorder.write(item)
                            yield "progress", len(writer.done) + len(writer.failed), writer
                            taken.set()
                        elif kind == "error":
                            raise item
                        else:
                            break
                finally:
                    if worker.is_alive():  # left early: the run stops after its current batch
                        self.cancelled[run.session] = time.monotonic()
                        taken.set()
                        worker.join()
        except BaseException:
            entry.state = "failed"
            raise
        seconds = time.perf_counter() - start
        finished = len(writer.done) + len(writer.failed)
        timings = {"load": self.load_s, "edit": seconds, "per_sample": seconds / max(1, finished)}
        report = {**cli.run_report(dataclasses.asdict(request.options), timings, sys.modules[self.program]),
                  **request.inputs.framing(),
                  **editor.batch_choice(request.options, request.prompt != "", request.num_samples).report()}
        report["inputs"] = {"prompt": request.prompt, "num_samples": request.num_samples, "seed": request.seed,
                            "invert_mask": request.invert_mask, "mask": mask_source,
                            "cancelled_after": finished if finished < request.num_samples else None}
        report["diversity"] = cli.diversity(editor, writer, request)
        ranked = writer.finish(request.full_source, request.full_mask, request.prompt, report, label=self.label)
        inputs = [os.path.join(run.directory, name) for name in (SOURCE, MASK, outputs.GRID, outputs.REPORT)]
        entry.files = [write_zip(run.directory, ranked + inputs + videos), *ranked, *inputs, *videos]
        entry.gallery = gallery(writer, ranked, self.label)
        entry.table = score_table(writer)
        entry.state = summary(writer, request.num_samples, report["diversity"])
        yield "done", entry, writer


def gallery(writer, ranked: list[str] | None, label: str) -> list:
    """The finished samples of `writer` best first, captioned: while sampling from samples/, at
    the end the `ranked` files."""
    from bdjax import outputs

    order = sorted(writer.done)
    if ranked is None:
        ranked = [os.path.join(writer.output_dir, outputs.SAMPLES_DIR, outputs.sample_name(k)) for _, k in order]
    return [(path, caption(rank, writer.scores[k]["clip_masked"], writer.seed, k, label, writer.scores[k]))
            for rank, ((_, k), path) in enumerate(zip(order, ranked))]


def score_table(writer) -> list[list]:
    """The finished samples of `writer` best first, a row of TABLE_HEADERS each (None where a
    score does not apply)."""
    return [[rank, k, int(writer.seed), *(writer.scores[k].get(name) for name in TABLE_HEADERS[3:])]
            for rank, (_, k) in enumerate(sorted(writer.done))]


def summary(writer, asked: int, diversity: float | None = None) -> str:
    """The line that ends a run: how many results were ranked (after a cancel, of how many asked),
    the best value ranked by (the CLIP distance unless the run ranks otherwise), the results'
    diversity, and those that turned non-finite."""
    done = len(writer.done) + len(writer.failed)
    head = (f"cancelled after {done} of {asked} samples; " if done < asked else "") + \
        f"{len(writer.done)} results ranked"
    if writer.done:
        rank_by = "clip_masked" if writer.options is None else writer.options.rank_by
        what = "distance" if rank_by == "clip_masked" else rank_by
        head += f" (best {what} {sorted(writer.done)[0][0]:.4f}"
        head += f", diversity {diversity:.3f})" if diversity is not None else ")"
    if writer.failed:
        head += f", {len(writer.failed)} turned non-finite and were left out"
    return head




class Unreadable(str):
    """What the page's image components hand over for an upload they could not decode: the
    reason, in one line (the request then says it, instead of the framework's bare error)."""


def write_zip(directory: str, paths: list[str]) -> str:
    """DIRECTORY/results.zip holding `paths` under their names relative to `directory` (PNGs are
    stored, not compressed again); returns its path."""
    import zipfile

    from bdjax.files import atomic_write

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in paths:
                archive.write(path, os.path.relpath(path, directory))

    target = os.path.join(directory, RESULTS_ZIP)
    atomic_write(target, write)
    return target


def write_inputs(inputs, directory: str, about: dict) -> None:
    """A run's inputs into `directory`: SOURCE and MASK, the photo and the mask the results
    replace (full size in window mode, the model size with fit=stretch); WINDOW, the photo with
    the edit window drawn (`window_preview`); in window mode also MODEL_INPUTS, the window's
    crop and mask at the model size."""
    from bdjax import outputs

    written = [(SOURCE, inputs.full_source, "source"), (MASK, inputs.full_mask, "mask"),
               (WINDOW, window_preview(inputs), "window")]
    if inputs.photo is not None:
        written += [(MODEL_INPUTS[0], inputs.source, "source_model"), (MODEL_INPUTS[1], inputs.mask, "mask_model")]
    for name, image, kind in written:
        outputs.save_png(os.path.join(directory, name), image, {"kind": kind, **about})


def frame_line(size: tuple[int, int]) -> int:
    """The width of each of the window frame's two lines (black outside, yellow inside) on a
    preview of `size`: visible when the preview is shown a fifth of its size."""
    return max(2, round(max(size) / 128))


def window_preview(inputs, width: int = PREVIEW_WIDTH, *, tint: bool = False) -> np.ndarray:
    """The photo, at most `width` pixels wide, with the edit window (its part inside the photo)
    drawn as a yellow frame on black; with fit=stretch, the source at the model size as it is.
    With `tint`, the region to change is shown in TINT, half opaque (the page's mask preview)."""
    from PIL import Image, ImageDraw

    if inputs.photo is None:
        return _tinted(inputs.source, inputs.mask) if tint else inputs.source
    preview = window_lib.downscaled(inputs.photo.rgb, width)
    if tint:
        mask = Image.fromarray(np.asarray(inputs.full_mask) > 0).resize(preview.size, Image.NEAREST)
        preview = Image.fromarray(_tinted(np.asarray(preview), np.asarray(mask)))
    scale = preview.width / inputs.photo.size[0]
    left, top, right, bottom = inputs.window.inside
    box = [round(left * scale), round(top * scale), max(round(right * scale) - 1, 0),
           max(round(bottom * scale) - 1, 0)]
    line = frame_line(preview.size)
    draw = ImageDraw.Draw(preview)
    draw.rectangle(box, outline=(0, 0, 0), width=2 * line)
    inner = [box[0] + line, box[1] + line, max(box[2] - line, box[0] + line), max(box[3] - line, box[1] + line)]
    draw.rectangle(inner, outline=(255, 214, 0), width=line)
    return np.asarray(preview)


def _option(name: str, value):
    """A page field's value as the option takes it: batch_size's text (a dropdown's: "auto" or
    a number) parsed, OptionError for anything else (bdjax/options.py); numbers as `_int`."""
    from bdjax.options import parse_batch_size

    return parse_batch_size(_int(value)) if name == "batch_size" else _int(value)


def _int(value):
    """A page number as an int where it is a whole number (Gradio's numbers may come as floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def caption(rank: int, distance: float, seed: int, sample_id: int, label: str, scores: dict | None = None) -> str:
    """A result's caption: rank (0 is best), CLIP distance, seed and sample index (the sample is
    reproduced by the same seed and index), its other scores in short form, and the smoke preset's
    mark."""
    from bdjax import outputs
    from bdjax.scores import short

    text = f"{outputs.tile_caption(rank, distance)} seed {seed} sample {sample_id}"
    if scores and short(scores):
        text += f" {short(scores)}"
    return f"{text} (smoke)" if label else text



def _tinted(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`rgb` with TINT blended half over the pixels where `mask` is non-zero."""
    out = np.array(rgb[..., :3], np.float32)
    region = np.asarray(mask) > 0
    out[region] = 0.5 * out[region] + 0.5 * np.float32(TINT)
    return np.round(out).astype(np.uint8)
