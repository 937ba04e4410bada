"""The web app: python -m launch.app [--config=smoke], then open http://127.0.0.1:7860

Upload a photo, paint the region to change (or upload a mask), type the prompt and press
"edit": the samples appear as their batches finish, then ranked best first by CLIP distance.
As launch.edit does, the app edits a window around the mask at the model size and pastes it back
into the photo at its full size (window mode; --fit, --context and --feather, the page's framing
defaults; the status line states the window and its scale). The app needs the optional Gradio
extra (pip install -e ".[app]").

The networks load and the default configuration compiles once, at start-up (later starts read
the compiled programs from the persistent compilation cache). Requests run one at a time; the
others wait in a queue that shows their position. Every edit goes through the same editor API
(`BlendedDiffusion.prepare` and `edit_batches`) and the same result writer as `launch.edit`:
each run is written to OUTPUT_DIR/run_NNNN/ (samples/, ranked/, crops/, grid.png, report.json,
plus source.png and mask.png: the photo and the mask used, at the size the results have, and
window.png: the photo with the edit window drawn, downscaled); without --output_dir, into a new
temporary folder named at start-up. Gradio's uploads (and its copies of the files it serves) go to
another temporary folder, removed when the app stops. Besides these, only the caches are written:
compiled programs (the compilation cache) and, for the real networks, fetched weights.

The app has no authentication: it listens on 127.0.0.1 unless --host says otherwise.
"""

import atexit
import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

import numpy as np
from absl import app, flags

from bdjax import window as window_lib
from launch import cli, runtime

FLAGS = flags.FLAGS

TITLE = "bdjax: Blended Diffusion, text-driven editing of a painted region"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PREPARING = "preparing the sampler (compiling it, or loading it from the compilation cache)"
MAX_UPLOAD = "100mb"  # Gradio refuses larger uploads; the image decoder refuses huge pixel counts
# The framing's defaults (--fit, --context and --feather's): window mode.
FRAMING_DEFAULTS = {"fit": "window", "context": window_lib.DEFAULT_CONTEXT, "feather": window_lib.DEFAULT_FEATHER}


def define_flags():
    runtime.define_flags()
    runtime.define_option_flags()  # the advanced section's defaults (bdjax/options.py)
    cli.define_framing_flags()  # --fit, --context, --feather: the advanced section's framing defaults
    flags.adopt_module_key_flags(runtime)
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. 0.0.0.0 serves every machine that can reach "
                        "this one, with no authentication.")
    flags.DEFINE_integer("port", 7860, "Port to listen on.")
    flags.DEFINE_bool("share", False, "Also open a public Gradio share link (needs internet; no authentication).")
    flags.DEFINE_string("output_dir", None, "Where each run's results are written, as run_NNNN/ folders; "
                        "default: a new temporary folder.")
    flags.DEFINE_integer("num_samples", 8, "The page's default number of samples.")
    flags.DEFINE_integer("max_samples", 64, "The most samples one request may ask for.")
    flags.DEFINE_integer("seed", 404, "The page's default seed.")


@dataclasses.dataclass
class Run:
    """One request's place in the app: its results folder and whether its user asked to stop."""
    directory: str
    session: str
    submitted: float


class Studio:
    """The app's state and work, apart from the page: one editor, one run at a time."""

    def __init__(self, editor, options: dict, output_dir: str, *, label: str = "", load_s: float = 0.0,
                 max_samples: int = 64):
        """`options`: the page's option values (the flags'): EditOptions' fields and the framing
        (fit, context, feather; window mode's defaults where absent); `label`: the smoke preset's
        label, or ""; `load_s`: the seconds the networks took to load, for reports."""
        self.editor, self.output_dir, self.label = editor, output_dir, label
        self.defaults = {**FRAMING_DEFAULTS, **options}
        self.load_s, self.max_samples = load_s, max_samples
        self.lock = threading.Lock()  # one sampler run at a time (the queue already serialises requests)
        self.cancelled: dict[str, float] = {}  # session -> when its user last pressed "cancel"
        self.pending: dict[str, int] = {}  # session -> its requests queued or running
        self.progress = None  # the running request's progress tracker, for the compile stage

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

    def prepare(self, editor_value, mask_file, invert: bool, prompt: str, num_samples, seed, options: dict):
        """The request of the page's inputs, checked (bdjax/painting.py, editor.prepare), and the
        warnings its inputs raised; ValueError says what is wrong in one line. `options` holds
        EditOptions' fields and the framing (fit, context, feather: request.prepare_inputs)."""
        from bdjax import painting

        fields = {"samples": num_samples, "seed": seed, **options}
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
            painted = painting.from_editor(editor_value, mask_file, invert_mask=invert)
            prompt = (prompt or "").strip()
            request = self.editor.prepare(painted.image, painted.mask, prompt, num_samples=_int(num_samples),
                                          seed=_int(seed), invert_mask=bool(invert),
                                          **{name: _int(value) for name, value in options.items()})
        notes = [str(w.message) for w in caught]
        if not prompt:
            notes.append("the prompt is empty: the edit runs unguided (no CLIP guidance: the diffusion model fills "
                         "the region on its own)")
        return request, notes

    def edit(self, request, run: Run, mask_source: str):
        """Run `request` into `run.directory`, yielding ("progress", k, writer) after each batch
        and ("done", ranked paths, writer) at the end (also after a cancel, with what finished)."""
        from bdjax import outputs

        editor = self.editor
        about = cli.provenance(editor, request.options, self.label, prompt=request.prompt, **request.inputs.framing())
        write_inputs(request.inputs, run.directory, about)
        writer = outputs.EditWriter(run.directory, request.seed, about)
        start = time.perf_counter()
        with self.lock:
            stream = editor.edit_batches(request, progress=True)
            batches = iter(stream)
            try:
                for batch in batches:
                    writer.add(batch)
                    yield "progress", len(writer.done) + len(writer.failed), writer
                    if self.is_cancelled(run):  # checked before the next batch starts
                        break
            finally:
                batches.close()  # a cancelled or failed run stops here, its progress bar closed
        seconds = time.perf_counter() - start
        finished = len(writer.done) + len(writer.failed)
        timings = {"load": self.load_s, "edit": seconds, "per_sample": seconds / max(1, finished)}
        report = {**cli.run_report(dataclasses.asdict(request.options), timings, sys.modules[__name__]),
                  **request.inputs.framing()}
        report["inputs"] = {"prompt": request.prompt, "num_samples": request.num_samples, "seed": request.seed,
                            "invert_mask": request.invert_mask, "mask": mask_source,
                            "cancelled_after": finished if finished < request.num_samples else None}
        ranked = writer.finish(request.full_source, request.full_mask, request.prompt, report, label=self.label)
        write_zip(run.directory, ranked + [os.path.join(run.directory, name)
                                           for name in (SOURCE, MASK, outputs.GRID, outputs.REPORT)])
        yield "done", ranked, writer


SOURCE, MASK, WINDOW = "source.png", "mask.png", "window.png"  # a run's inputs, beside the results
RESULTS_ZIP = "results.zip"  # the run's downloads in one file


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
MODEL_INPUTS = ("source_model.png", "mask_model.png")  # window mode: the window as the model saw it
PREVIEW_WIDTH = 1024  # window.png's widest


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


def window_preview(inputs, width: int = PREVIEW_WIDTH) -> np.ndarray:
    """The photo, at most `width` pixels wide, with the edit window (its part inside the photo)
    drawn as a yellow frame on black; with fit=stretch, the source at the model size as it is."""
    from PIL import ImageDraw

    if inputs.photo is None:
        return inputs.source
    preview = window_lib.downscaled(inputs.photo.rgb, width)
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


def _int(value):
    """A page number as an int where it is a whole number (Gradio's numbers may come as floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def caption(rank: int, distance: float, seed: int, sample_id: int, label: str) -> str:
    """A result's caption: rank (0 is best), CLIP distance, seed and sample index (the sample is
    reproduced by the same seed and index), and the smoke preset's mark."""
    from bdjax import outputs

    text = f"{outputs.tile_caption(rank, distance)} seed {seed} sample {sample_id}"
    return f"{text} (smoke)" if label else text


# The previews of a run's inputs fill their boxes, aspect kept; the mask (binary, and with
# fit=stretch only 64 pixels for the smoke preset) without smoothing.
CSS = ("#source-used img, #mask-used img { width: 100% !important; height: 100% !important; "
       "object-fit: contain !important; } #mask-used img { image-rendering: pixelated; }")

# The advanced section's framing fields (bdjax/request.py prepare_inputs), before the options.
FRAMING_HELP = {
    "fit": "window: edit a square around the mask and paste it back into the photo at its own size; stretch: "
           "the reference's way, the whole photo at the model size.",
    "context": "Window mode: the margin around the mask on each side, as a fraction of the mask's long side.",
    "feather": "Window mode: photo pixels of soft edge where the edit fades into the photo; 0 pastes hard.",
}


@dataclasses.dataclass
class Page:
    """The page's components, as `layout` makes them. `advanced` maps each option's name to its
    field; `submitted` (a gr.State) holds when the request was submitted (Studio.submitted)."""
    photo: Any
    mask_file: Any
    invert: Any
    prompt: Any
    num_samples: Any
    seed: Any
    advanced: dict
    run_button: Any
    cancel_button: Any
    status: Any
    gallery: Any
    source_used: Any
    mask_used: Any
    grid: Any
    downloads: Any
    submitted: Any

    @property
    def inputs(self) -> set:
        """What a run reads: a set, so that Gradio passes their values as one dict keyed by component."""
        return {self.photo, self.mask_file, self.invert, self.prompt, self.num_samples, self.seed, self.submitted,
                *self.advanced.values()}

    @property
    def outputs(self) -> list:
        """What a run updates, in the order of the tuples `Handlers` yields."""
        return [self.status, self.gallery, self.source_used, self.mask_used, self.grid, self.downloads]


def layout(studio: Studio) -> Page:
    """The page's components, made in the open gr.Blocks: on the left the photo, the prompt, the
    buttons and under them the status (in view as a run starts), then the other inputs; the
    results on the right."""
    import gradio as gr

    from bdjax.options import EditOptions, reference_name
    from bdjax.request import FITS

    options = studio.defaults
    smoke = bool(studio.label)
    gr.Markdown(f"## {TITLE}\n"
                "Upload a photo, paint over the region to change (brush size, eraser, undo and clear are in "
                "the editor's toolbar) or upload a mask, describe the new content, and press **edit**."
                + (f"\n\n**{studio.label}.**" if smoke else ""), elem_id="intro")
    with gr.Row():
        with gr.Column():
            photo = gr.ImageEditor(
                label="photo: paint the region to change", type="numpy", image_mode="RGBA", format="png",
                sources=("upload", "clipboard"), transforms=(), layers=False,
                brush=gr.Brush(colors=[("rgb(255, 0, 160)", 0.6)], color_mode="fixed"), eraser=gr.Eraser(),
                height=420, elem_id="photo")
            prompt = gr.Textbox(label="prompt", placeholder="e.g. a glass of orange juice", elem_id="prompt")
            with gr.Row():
                run_button = gr.Button("edit", variant="primary", elem_id="run")
                cancel_button = gr.Button("cancel", variant="stop", elem_id="cancel")
            # Status, errors and progress sit under the button that starts a run: in view when it is pressed.
            status = gr.Markdown("", elem_id="status")
            with gr.Row():
                num_samples = gr.Number(label="samples", value=FLAGS.num_samples, precision=0,
                                        elem_id="num-samples")
                seed = gr.Number(label="seed", value=FLAGS.seed, precision=0, elem_id="seed")
            mask_file = gr.Image(label="or upload a mask instead (white: change, black: keep)", type="filepath",
                                 sources=("upload",), height=160, elem_id="mask-upload")
            invert = gr.Checkbox(label="invert mask: change everything not painted (background replacement)",
                                 value=False, elem_id="invert")
            advanced = {}
            with gr.Accordion("advanced: framing and the reference's options", open=False, elem_id="advanced"):
                for name, help_text in FRAMING_HELP.items():
                    common = dict(label=name, value=options[name], elem_id=f"option-{name}",
                                  info=f"{help_text} (bdjax only, default {FRAMING_DEFAULTS[name]})")
                    if name == "fit":
                        advanced[name] = gr.Radio(choices=list(FITS), **common)
                    else:
                        advanced[name] = gr.Number(precision=0 if name == "feather" else None, **common)
                for field in EditOptions.declaration():
                    reference = reference_name(field)
                    origin = (f"reference --{reference}, default {field.default}" if reference
                              else f"bdjax only, default {field.default}")
                    info = f"{field.metadata['help']} ({origin})"
                    common = dict(label=field.name, value=options[field.name], info=info,
                                  elem_id=f"option-{field.name}")
                    if field.type == "bool":
                        advanced[field.name] = gr.Checkbox(**common)
                    elif field.type == "str":
                        advanced[field.name] = gr.Textbox(**common)
                    else:
                        advanced[field.name] = gr.Number(precision=0 if field.type == "int" else None, **common)
        with gr.Column():
            gallery = gr.Gallery(label="results, best first" + (" (SMOKE: random networks)" if smoke else ""),
                                 columns=4, height="auto", elem_id="results")
            mark = " (smoke)" if smoke else ""  # short: the label sits over the image
            with gr.Row():
                source_used = gr.Image(label="source (edit window drawn)" + mark, type="filepath",
                                       interactive=False, height=220, elem_id="source-used")
                mask_used = gr.Image(label="mask used" + mark, type="filepath",
                                     interactive=False, height=220, elem_id="mask-used")
            grid = gr.Image(label="grid", type="filepath", interactive=False, elem_id="grid")
            downloads = gr.File(label="downloads: all in one zip, the results at full size (best first), source, "
                                "mask, grid, report.json", file_count="multiple", interactive=False,
                                elem_id="downloads")
    submitted = gr.State(0.0)
    return Page(photo=photo, mask_file=mask_file, invert=invert, prompt=prompt, num_samples=num_samples, seed=seed,
                advanced=advanced, run_button=run_button, cancel_button=cancel_button, status=status,
                gallery=gallery, source_used=source_used, mask_used=mask_used, grid=grid, downloads=downloads,
                submitted=submitted)


class Handlers:
    """What the page's events do, over `studio` and the `page`'s components. Gradio calls them
    through `build_page`, which gives them the session's request and a progress tracker."""

    def __init__(self, studio: Studio, page: Page):
        self.studio, self.page = studio, page

    @staticmethod
    def say(text: str) -> tuple:
        """Show `text` as the status and leave the other outputs as they are."""
        import gradio as gr

        return (text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())

    def gallery_of(self, writer, ranked=None) -> list:
        """The finished samples best first, captioned: while sampling from samples/, at the end
        the `ranked` files."""
        from bdjax import outputs

        order = sorted(writer.done)
        if ranked is None:
            ranked = [os.path.join(writer.output_dir, outputs.SAMPLES_DIR, outputs.sample_name(k))
                      for _, k in order]
        return [(path, caption(rank, d, writer.seed, k, self.studio.label))
                for rank, ((d, k), path) in enumerate(zip(order, ranked))]

    def run(self, values: dict, session: str, progress):
        """One request of `session`, from the page's `values` (by component), counted as finished
        however it ends."""
        job = Run(directory="", session=session, submitted=values[self.page.submitted])
        try:
            yield from self.edit_page(values, job, progress)
        finally:
            self.studio.finished(job)

    def edit_page(self, values: dict, job: Run, progress):
        """Check the request, then run it, yielding the outputs after each batch and at the end."""
        import gradio as gr

        from bdjax import outputs

        studio, page = self.studio, self.page
        if studio.is_cancelled(job):
            yield self.say("cancelled before it started")
            return
        try:
            prepared, notes = studio.prepare(
                values[page.photo], values[page.mask_file], values[page.invert], values[page.prompt],
                values[page.num_samples], values[page.seed], {name: values[c] for name, c in page.advanced.items()})
        except (ValueError, TypeError) as e:
            yield self.say(plain("error: " + " ".join(str(e).split())))
            return
        try:
            job.directory = studio.new_run_dir()
        except OSError as e:
            yield self.say(plain(f"error: {e}"))
            return
        # Where the model edits the photo and at what scale, then the inputs' notes (an upscaled
        # window, a mask of another size, ...).
        note = f"\n\n{plain(prepared.inputs.framing_line())}" + "".join(f"\n\nnote: {plain(n)}" for n in notes)
        n = prepared.num_samples
        yield (f"sampling {n} sample{'s' * (n != 1)}..." + note, [], None, None, None, None)
        studio.progress = progress
        window, mask = os.path.join(job.directory, WINDOW), os.path.join(job.directory, MASK)
        runs = studio.edit(prepared, job, "uploaded" if values[page.mask_file] is not None else "painted")
        try:
            for kind, result, writer in runs:
                if kind == "progress":
                    yield (f"{result} of {n} samples done" + note, self.gallery_of(writer), window, mask,
                           gr.skip(), gr.skip())
                else:
                    files = [os.path.join(job.directory, RESULTS_ZIP), *result] + [
                        os.path.join(job.directory, name) for name in (SOURCE, MASK, outputs.GRID, outputs.REPORT)]
                    done = len(writer.done) + len(writer.failed)
                    head = (f"cancelled after {done} of {n} samples; " if done < n else "") + \
                        f"{len(writer.done)} results ranked"
                    if writer.done:
                        head += f" (best distance {sorted(writer.done)[0][0]:.4f})"
                    if writer.failed:
                        head += f", {len(writer.failed)} turned non-finite and were left out"
                    head += f"; written as {os.path.basename(job.directory)} (downloads below)"
                    if studio.label:
                        head += f"\n\n{studio.label}"
                    yield (head + note, self.gallery_of(writer, result), window, mask,
                           os.path.join(job.directory, outputs.GRID), files)
        except GeneratorExit:  # the page went away (a reload): end the run as a cancel does, ranked and reported
            studio.cancel(job.session)
            for _ in runs:  # stops after the batch that just finished
                pass
            raise
        except Exception as e:  # the server stays up; the traceback goes to its log
            import traceback

            traceback.print_exc()
            yield self.say(plain("error: " + (" ".join(str(e).split()) or type(e).__name__)[:300]))
        finally:
            studio.progress = None

    def submit(self, session: str) -> float:
        return self.studio.submitted(session)

    def cancel(self, session: str) -> str:
        if not self.studio.cancel(session):
            return "nothing to cancel"
        return "cancelling: the run stops after its current batch"


def build_page(studio: Studio):
    """The Gradio page over `studio`: `layout`'s components, their events wired to `Handlers`."""
    import gradio as gr

    with gr.Blocks(title="bdjax") as blocks:
        page = layout(studio)
        handlers = Handlers(studio, page)

        # Gradio reads from the signature of the function it calls what to pass it: the session's
        # request for a `gr.Request` annotation, a progress tracker for a `gr.Progress` default.
        # Both need gradio, imported lazily (above), so these three are defined here.
        def run(values: dict, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            yield from handlers.run(values, request.session_hash or "", progress)

        def submit(request: gr.Request) -> float:
            return handlers.submit(request.session_hash or "")

        def cancel(request: gr.Request) -> str:
            return handlers.cancel(request.session_hash or "")

        for event in (page.run_button.click, page.prompt.submit):  # the button, or Enter in the prompt
            event(submit, None, page.submitted, queue=False).then(run, page.inputs, page.outputs)
        page.cancel_button.click(cancel, None, page.status, queue=False)
    return blocks


def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        raise cli.FlagError("the web app runs in one process: drop --distributed (use launch.batch_edit for "
                            "multi-process runs)")
    if not 1 <= FLAGS.num_samples <= FLAGS.max_samples:
        raise cli.FlagError(f"--num_samples={FLAGS.num_samples} must be in "
                            f"[1, --max_samples={FLAGS.max_samples}]")
    if not 1 <= FLAGS.port < 65536:
        raise cli.FlagError(f"--port={FLAGS.port} must be in [1, 65535]")
    from bdjax import files, guidance, smoke
    from bdjax.options import EditOptions, OptionError

    from bdjax.request import check_framing

    options, framing = runtime.options_from_flags(), cli.framing_from_flags()
    try:
        EditOptions(**options).validate()
        check_framing(**framing)
    except OptionError as e:  # the option's flag: "--skip_timesteps=30 must be ..."
        raise cli.FlagError(f"--{e}") from None
    if importlib.util.find_spec("gradio") is None:
        raise cli.FlagError("the web app needs Gradio: pip install -e '.[app]'")
    check_port(FLAGS.host, FLAGS.port)
    if FLAGS.output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="bdjax-app-")
        atexit.register(_remove_if_empty, output_dir)  # a start that ran nothing leaves nothing behind
    else:
        output_dir = os.path.abspath(os.path.expanduser(FLAGS.output_dir))
        files.check_writable(output_dir)
        os.makedirs(output_dir, exist_ok=True)
    # Gradio keeps uploads and copies of the files it serves in GRADIO_TEMP_DIR (read when it is
    # imported): a temporary folder of this process's, removed when it stops.
    gradio_dir = tempfile.mkdtemp(prefix="bdjax-app-gradio-")
    atexit.register(shutil.rmtree, gradio_dir, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = gradio_dir
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    signal.signal(signal.SIGTERM, _stop)  # `kill PID` stops the server as Ctrl-C does, cleaning up
    runtime.setup()
    for warning in exposure_warnings(FLAGS.host, FLAGS.share):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    start = time.perf_counter()
    editor = runtime.build_editor(guidance.needs_lpips(EditOptions(**options)) or FLAGS.config == "smoke"
                                  or _lpips_available())
    studio = Studio(editor, {**options, **framing}, output_dir, label=label, load_s=time.perf_counter() - start,
                    max_samples=FLAGS.max_samples)
    runtime.announce_compiles(editor, show=studio.show_compiling)
    # The page's default edit is prepared now (compiled, or loaded from the cache); nothing runs yet.
    print(runtime.describe_run(editor, [(editor.options(**options), True, FLAGS.num_samples)],
                               lead="preparing the page's default edit:"), file=sys.stderr, flush=True)
    editor.warm_up(editor.options(**options), num_samples=FLAGS.num_samples)
    page = build_page(studio)
    page.queue(default_concurrency_limit=1, max_size=64)
    page.launch(server_name=FLAGS.host, server_port=FLAGS.port, share=FLAGS.share, allowed_paths=[output_dir],
                show_error=False, quiet=True, css=CSS, prevent_thread_lock=True, max_file_size=MAX_UPLOAD)
    print(f"serving on {page.local_url}" + (f" and {page.share_url}" if page.share_url else "")
          + f" (Ctrl-C stops it); results are written to {output_dir}" + (f"\n{label}" if label else ""),
          flush=True)
    try:
        page.block_thread()
    finally:
        page.close()


def exposure_warnings(host: str, share: bool) -> list[str]:
    """What to say at start when the app is reachable beyond this machine: it has no authentication."""
    said = []
    if host not in LOOPBACK:
        said.append(f"--host={host} serves this app to every machine that can reach this one, with no authentication")
    if share:
        said.append("--share opens a public link to this app: anyone with the link can use it (and this machine's "
                    "accelerator), with no authentication")
    return said


def check_port(host: str, port: int) -> None:
    """FlagError unless `port` on `host` is free to listen on: said before the networks load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise cli.FlagError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or "
                            "--host") from None


def plain(text: str) -> str:
    """`text` shown as written in a Markdown element (its *, _, [, ], <, ` and \\ escaped)."""
    return "".join("\\" + c if c in "\\*_[]<>`#|~" else c for c in text)


def _remove_if_empty(directory: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # refused unless empty


def _stop(signum, frame):
    raise KeyboardInterrupt


def _lpips_available() -> bool:
    """Whether the LPIPS weights are at hand (the Algorithm 1 baseline's background loss needs
    them): with --checkpoint_dir, whether it holds them; from the cache, always (fetched)."""
    from bdjax.models import lpips as lpips_lib

    if FLAGS.checkpoint_dir is None:
        return True
    return os.path.exists(os.path.join(os.path.expanduser(FLAGS.checkpoint_dir), f"{lpips_lib.CHECKPOINT_NAME}.json"))


if __name__ == "__main__":
    define_flags()
    app.run(cli.program(main), flags_parser=cli.parse_flags)
