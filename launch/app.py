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

Beyond one edit: a clicked result is compared with the photo (before/after), becomes the next
photo to edit ("use"), or gives its seed back ("reuse"); "preview mask" shows the region to change
over the photo with the window framed; "grow" widens the mask; the examples/ folder's edits load
with a click; and each browser's runs can be reopened from "your runs", after a reload too, until
the server stops (launch/studio.py keeps them).

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
import time
from typing import Any

import numpy as np
from absl import app, flags

from bdjax import image_io
from bdjax.options import RANK_BY
from launch import cli, runtime
from launch.studio import (FRAMING_DEFAULTS, MASK, SOURCE, TABLE_HEADERS, WINDOW, Run, Studio, Unreadable, gallery,
                           score_table, window_preview)

FLAGS = flags.FLAGS

TITLE = "bdjax: Blended Diffusion, text-driven editing of a painted region"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "100mb"  # Gradio refuses larger uploads; the image decoder refuses huge pixel counts


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


# The previews of a run's inputs fill their boxes, aspect kept; the mask (binary, and with
# fit=stretch only 64 pixels for the smoke preset) without smoothing.
CSS = ("#source-used img, #mask-used img { width: 100% !important; height: 100% !important; "
       "object-fit: contain !important; } #mask-used img { image-rendering: pixelated; }")

# The batch_size field's choices (any other whole number may be typed): auto, the largest batch
# that fits the device's memory (bdjax/fit.py; on a CPU 4), or a number of samples per run.
BATCH_SIZES = ("auto", "1", "2", "4", "8", "16", "32", "64")

# The advanced section's framing fields (bdjax/request.py prepare_inputs), before the options.
FRAMING_HELP = {
    "fit": "window: edit a square around the mask and paste it back into the photo at its own size; stretch: "
           "the reference's way, the whole photo at the model size.",
    "context": "Window mode: the margin around the mask on each side, as a fraction of the mask's long side.",
    "feather": "Window mode: photo pixels of soft edge where the edit fades into the photo; 0 pastes hard.",
}


@dataclasses.dataclass
class Page:
    """The page's components, as `layout` makes them. `advanced` maps each option's name (and
    the framing's: fit, context, feather) to its field. The states: `submitted`, when the request
    was submitted (Studio.submitted); `visitor`, this browser's id (kept in its storage); `frame`,
    the margin around the photo in the editor (painting.framed); `shown`, the run whose results
    are shown ({"paths", "source", "seed"}); `selected`, the index of the result clicked."""
    photo: Any
    mask_file: Any
    invert: Any
    prompt: Any
    num_samples: Any
    seed: Any
    dice: Any
    strength: Any
    grow: Any
    video: Any
    preview: Any
    examples: Any  # None when the examples/ folder is not at hand (an installed package)
    advanced: dict
    run_button: Any
    cancel_button: Any
    status: Any
    history: Any
    gallery: Any
    scores: Any
    use_button: Any
    reuse_button: Any
    compare: Any
    source_used: Any
    mask_used: Any
    grid: Any
    downloads: Any
    submitted: Any
    visitor: Any
    frame: Any
    shown: Any
    selected: Any

    @property
    def inputs(self) -> set:
        """What a run reads: a set, so that Gradio passes their values as one dict keyed by component."""
        return {self.photo, self.mask_file, self.invert, self.prompt, self.num_samples, self.seed, self.grow,
                self.video, self.submitted, self.visitor, self.frame, *self.advanced.values()}

    @property
    def results(self) -> list:
        """What shows a run's results (a run's, or a reopened one's)."""
        return [self.status, self.gallery, self.scores, self.source_used, self.mask_used, self.grid, self.downloads,
                self.shown, self.selected, self.compare, self.history]

    @property
    def restored(self) -> list:
        """The inputs a reopened run or an example fills in."""
        return [self.photo, self.frame, self.mask_file, self.invert, self.prompt, self.num_samples, self.seed,
                self.grow, self.strength, *self.advanced.values()]


def readable(component, what: str):
    """`component` (an image input of the page) with its decoding made safe: an upload it cannot
    decode (not an image, an SVG, a huge pixel count) reaches the handlers as `Unreadable` (the
    reason), which the page says in one line, instead of failing before any handler runs. The
    instance's method is wrapped (a subclass of a Gradio component would make Gradio write a
    type stub beside this file)."""
    preprocess = component.preprocess

    def safe(payload):
        try:
            return preprocess(payload)
        except Exception as e:  # Pillow's and Gradio's errors for files they cannot decode
            reason = " ".join(str(e).split()).rstrip(". ") or type(e).__name__
            return Unreadable(f"{reason[:200]}: upload the {what} as a PNG, JPEG or WebP of at most "
                              f"{image_io.MAX_PIXELS:,} pixels")

    component.preprocess = safe
    return component


def examples_at_hand() -> list[tuple[str, str, str, bool]]:
    """EXAMPLES whose files are in the examples/ folder beside the code (a source checkout),
    with their paths; [] where it is not."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    found = [(os.path.join(folder, photo), os.path.join(folder, mask), prompt, invert)
             for photo, mask, prompt, invert in EXAMPLES]
    return [e for e in found if os.path.isfile(e[0]) and os.path.isfile(e[1])]


def strength_of(skip_timesteps, timestep_respacing) -> float | None:
    """The fraction of the diffusion's steps a run makes: 1 - skip_timesteps / steps (None when
    the fields do not make a schedule)."""
    from bdjax import diffusion

    try:
        steps = diffusion.respaced_length(str(timestep_respacing))
        return round(1 - float(skip_timesteps) / steps, 4)
    except (ValueError, TypeError, ZeroDivisionError):
        return None


def skip_of(strength, timestep_respacing) -> int | None:
    """The skip_timesteps a `strength` asks for: round((1 - strength) * steps), at most steps - 1."""
    from bdjax import diffusion

    try:
        steps = diffusion.respaced_length(str(timestep_respacing))
        return min(max(round((1 - float(strength)) * steps), 0), steps - 1)
    except (ValueError, TypeError):
        return None


def layout(studio: Studio) -> Page:
    """The page's components, made in the open gr.Blocks: on the left the photo, the prompt, the
    buttons and under them the status (in view as a run starts), then the other inputs; the
    results on the right, under the history of this browser's runs."""
    import gradio as gr

    from bdjax import painting
    from bdjax.options import EditOptions, flag_default, reference_name
    from bdjax.request import FITS

    options = studio.defaults
    smoke = bool(studio.label)
    gr.Markdown(f"## {TITLE}\n"
                "Upload a photo, paint over the region to change (brush size, eraser, undo and clear are in "
                "the editor's toolbar) or upload a mask, describe the new content, and press **edit**."
                + (f"\n\n**{studio.label}.**" if smoke else ""), elem_id="intro")
    with gr.Row():
        with gr.Column():
            photo = readable(gr.ImageEditor(
                label="photo: paint the region to change (a stroke may start in the margin)", type="numpy",
                image_mode="RGBA", format="png",
                sources=("upload", "clipboard"), transforms=(), layers=False,
                brush=gr.Brush(colors=[(f"rgb{painting.BRUSH_RGBA[:3]}", painting.BRUSH_RGBA[3] / 255)],
                               color_mode="fixed"),
                eraser=gr.Eraser(), height=420, elem_id="photo"), "photo")
            prompt = gr.Textbox(label="prompt", placeholder="e.g. a glass of orange juice", elem_id="prompt")
            with gr.Row():
                run_button = gr.Button("edit", variant="primary", elem_id="run")
                cancel_button = gr.Button("cancel", variant="stop", elem_id="cancel")
            # Status, errors and progress sit under the button that starts a run: in view when it is pressed.
            status = gr.Markdown("", elem_id="status")
            with gr.Row(equal_height=True):
                num_samples = gr.Number(label="samples", value=FLAGS.num_samples, precision=0,
                                        elem_id="num-samples")
                seed = gr.Number(label="seed", value=FLAGS.seed, precision=0, elem_id="seed")
                dice = gr.Button("random seed", elem_id="dice", scale=0, min_width=120)
            strength = gr.Slider(0.01, 1.0, step=0.01, label="strength",
                                 value=strength_of(options["skip_timesteps"], options["timestep_respacing"]),
                                 info="how much of the diffusion runs: 1 - skip_timesteps / steps; lower keeps "
                                      "more of the photo's layout (advanced: skip_timesteps)", elem_id="strength")
            advanced = {}
            with gr.Row(equal_height=True):
                grow = gr.Slider(0, painting.MAX_GROW, step=1, value=0, label="grow mask (pixels)",
                                 info="widen the region to change by this many photo pixels", elem_id="grow")
                advanced["feather"] = gr.Number(
                    label="feather", value=options["feather"], precision=0, elem_id="option-feather",
                    info=f"{FRAMING_HELP['feather']} (bdjax only, default {FRAMING_DEFAULTS['feather']})")
                preview = gr.Button("preview mask", elem_id="preview", scale=0, min_width=120)
            mask_file = readable(gr.Image(label="or upload a mask instead (white: change, black: keep)",
                                          type="filepath", image_mode=None, sources=("upload",), height=160,
                                          elem_id="mask-upload"), "mask")
            invert = gr.Checkbox(label="invert mask: change everything not painted (background replacement)",
                                 value=False, elem_id="invert")
            found = examples_at_hand()
            examples = gr.Dataset(
                label="examples: click one to load its photo, mask and prompt",
                components=[gr.Image(type="filepath", render=False), gr.Textbox(render=False)],
                samples=[[photo_path, prompt_text + (" (mask inverted)" if inverted else "")]
                         for photo_path, _, prompt_text, inverted in found],
                type="index", elem_id="examples") if found else None
            with gr.Accordion("advanced: framing and the reference's options", open=False, elem_id="advanced"):
                video = gr.Checkbox(label="video: record each sample's predicted image at every step (a video per "
                                    "result in the downloads; slower: one device call per step)", value=False,
                                    elem_id="video")
                for name in ("fit", "context"):
                    common = dict(label=name, value=options[name], elem_id=f"option-{name}",
                                  info=f"{FRAMING_HELP[name]} (bdjax only, default {FRAMING_DEFAULTS[name]})")
                    if name == "fit":
                        advanced[name] = gr.Radio(choices=list(FITS), **common)
                    else:
                        advanced[name] = gr.Number(**common)
                for field in EditOptions.declaration():
                    reference = reference_name(field)
                    origin = (f"reference --{reference}, default {field.default}" if reference
                              else f"bdjax only, default {field.default}")
                    info = f"{field.metadata['help']} ({origin})"
                    common = dict(label=field.name, value=options[field.name], info=info,
                                  elem_id=f"option-{field.name}")
                    if field.type == "bool":
                        advanced[field.name] = gr.Checkbox(**common)
                    elif field.type == "BatchSize":  # auto, or a number typed or picked
                        common.update(value=str(common["value"]), info=f"{field.metadata['help']} ({origin}; "
                                      f"this app's default {flag_default(field)})")
                        advanced[field.name] = gr.Dropdown(choices=list(BATCH_SIZES), allow_custom_value=True,
                                                           **common)
                    elif field.name == "rank_by":
                        advanced[field.name] = gr.Dropdown(choices=list(RANK_BY), **common)
                    elif field.type == "str":
                        advanced[field.name] = gr.Textbox(**common)
                    else:
                        advanced[field.name] = gr.Number(precision=0 if field.type == "int" else None, **common)
        with gr.Column():
            gr.Markdown("Click a result to compare it with the photo, to keep editing it, or to reuse its seed.",
                        elem_id="results-help")
            history = gr.Dropdown(label="your runs (this browser's, until the server stops): pick one to reopen it",
                                  choices=[], value=None, interactive=True, elem_id="history")
            gallery = gr.Gallery(label="results, best first" + (" (SMOKE: random networks)" if smoke else ""),
                                 columns=4, height="auto", elem_id="results")
            with gr.Row():
                use_button = gr.Button("use the clicked result as the photo", elem_id="use")
                reuse_button = gr.Button("reuse its seed", elem_id="reuse")
            scores = gr.Dataframe(label="scores, best first: sort by a column from the menu of its header (clip_*, "
                                  "background_lpips, seam: lower is better; background_psnr: higher)",
                                  headers=list(TABLE_HEADERS), datatype=["number"] * len(TABLE_HEADERS),
                                  interactive=False, wrap=False, elem_id="scores")
            compare = gr.ImageSlider(label="before / after: drag the handle", type="filepath", format="png",
                                     interactive=False, elem_id="compare")
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
    return Page(photo=photo, mask_file=mask_file, invert=invert, prompt=prompt, num_samples=num_samples, seed=seed,
                dice=dice, strength=strength, grow=grow, video=video, preview=preview, examples=examples,
                advanced=advanced,
                run_button=run_button, cancel_button=cancel_button, status=status, history=history,
                gallery=gallery, scores=scores, use_button=use_button, reuse_button=reuse_button, compare=compare,
                source_used=source_used, mask_used=mask_used, grid=grid, downloads=downloads,
                submitted=gr.State(0.0), visitor=gr.BrowserState("", storage_key="bdjax-visitor"),
                frame=gr.State(None), shown=gr.State(None), selected=gr.State(None))


class Handlers:
    """What the page's events do, over `studio` and the `page`'s components. Gradio calls them
    through `build_page`, which gives them the session's request and a progress tracker. Each
    returns (or yields) a dict of the components it updates."""

    def __init__(self, studio: Studio, page: Page):
        self.studio, self.page = studio, page

    def say(self, text: str) -> dict:
        """Show `text` as the status."""
        return {self.page.status: text}

    def unchanged(self) -> dict:
        """Leave the page as it is (Gradio reads an empty dict as one value, not as no update)."""
        import gradio as gr

        return {self.page.status: gr.skip()}

    def run(self, values: dict, session: str, progress):
        """One request of `session`, from the page's `values` (by component), counted as finished
        however it ends."""
        job = Run(directory="", session=session, submitted=values[self.page.submitted],
                  visitor=values[self.page.visitor] or "")
        try:
            yield from self.edit_page(values, job, progress)
        finally:
            self.studio.finished(job)

    def prepare(self, values: dict):
        """The request of the page's `values` (Studio.prepare), and its notes."""
        page = self.page
        return self.studio.prepare(
            values[page.photo], values[page.mask_file], values[page.invert], values[page.prompt],
            values[page.num_samples], values[page.seed], {name: values[c] for name, c in page.advanced.items()},
            frame=values[page.frame], grow=values[page.grow])

    def edit_page(self, values: dict, job: Run, progress):
        """Check the request, then run it, yielding the outputs after each batch and at the end."""
        studio, page = self.studio, self.page
        if studio.is_cancelled(job):
            yield self.say("cancelled before it started")
            return
        try:
            prepared, notes = self.prepare(values)
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
        ran = {"prompt": prepared.prompt, "num_samples": n, "seed": prepared.seed, "invert": bool(values[page.invert]),
               "grow": values[page.grow], **{name: values[c] for name, c in page.advanced.items()}}
        studio.progress = progress
        window, mask = os.path.join(job.directory, WINDOW), os.path.join(job.directory, MASK)
        runs = studio.edit(prepared, job, "uploaded" if values[page.mask_file] is not None else "painted", ran,
                           video=bool(values[page.video]))
        current = {}  # the running batch's latest predictions, by sample id
        yield {page.status: f"sampling {n} sample{'s' * (n != 1)}..." + note, page.gallery: [], page.scores: None,
               page.source_used: None, page.mask_used: None, page.compare: None, page.selected: None,
               page.history: self.history_update(job.visitor)}
        try:
            for kind, result, writer in runs:
                if kind == "preview":  # the batch's current predictions after the finished samples
                    current = {int(k): (image, f"sample {k}: step {result.step} of {result.num_steps} (preview)")
                               for k, image in zip(result.sample_ids, result.images)}
                    yield {page.gallery: gallery(writer, None, studio.label) + list(current.values())}
                elif kind == "progress":
                    yield {page.status: f"{result} of {n} samples done" + note,
                           page.gallery: gallery(writer, None, studio.label), page.scores: score_table(writer) or None,
                           page.source_used: window,
                           page.mask_used: mask}
                else:
                    yield {**self.show(result, job.visitor), page.status: self.headline(result) + note}
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

    def headline(self, entry) -> str:
        """The status of a finished run: its summary, its folder's name, and the smoke label."""
        head = f"{entry.state}; written as {entry.name} (downloads below)"
        return head + (f"\n\n{self.studio.label}" if self.studio.label else "")

    def show(self, entry, visitor: str) -> dict:
        """The outputs that show a finished run `entry`: its results, inputs, downloads, and the
        before/after of its best result."""
        from bdjax.outputs import GRID

        page = self.page
        paths = [path for path, _ in entry.gallery]
        source = os.path.join(entry.directory, SOURCE)
        return {page.gallery: entry.gallery, page.scores: entry.table or None,
                page.source_used: os.path.join(entry.directory, WINDOW),
                page.mask_used: os.path.join(entry.directory, MASK), page.grid: os.path.join(entry.directory, GRID),
                page.downloads: entry.files, page.shown: {"paths": paths, "source": source,
                                                          "seed": entry.values.get("seed")},
                page.selected: None, page.compare: (source, paths[0]) if paths else None,
                page.history: self.history_update(visitor)}

    def history_update(self, visitor: str):
        import gradio as gr

        return gr.update(choices=[(e.label, e.name) for e in self.studio.runs_of(visitor)])

    def load(self, visitor: str) -> dict:
        """A page (re)loaded: this browser's id (made on its first visit) and its runs; a run of
        its still going is named."""
        import secrets

        page = self.page
        visitor = visitor or secrets.token_urlsafe(16)
        running = [e.name for e in self.studio.runs_of(visitor) if e.state == "running"]
        said = {page.visitor: visitor, page.history: self.history_update(visitor)}
        if running:
            said[page.status] = (f"{running[0]} of this browser is still running (a page reloaded mid-run stops it "
                                 "after its current batch): reopen it from 'your runs' once it has ended")
        return said

    def reopen(self, visitor: str, name) -> dict:
        """Show the run `name` of this browser's history: its results and its inputs (the photo
        and the mask used, the prompt, the seed, the options), ready to run again or to change."""
        from bdjax import painting

        page = self.page
        entry = self.studio.entry(visitor, name) if name else None
        if entry is None:
            return {page.history: self.history_update(visitor)}
        if entry.state == "running":
            return {page.status: f"{entry.name} is still running: reopen it once it has ended",
                    page.history: self.history_update(visitor)}
        if not entry.gallery:
            return {page.status: f"{entry.name}: {entry.state} (no results to show)"}
        try:
            value, frame = painting.framed(os.path.join(entry.directory, SOURCE))
        except (ValueError, OSError) as e:  # its folder was removed or changed since
            return {page.status: plain(f"error: {entry.name} cannot be reopened: {e}")}
        restored = {page.photo: value, page.frame: frame, page.mask_file: os.path.join(entry.directory, MASK),
                    page.invert: False, page.grow: 0,
                    **{page.advanced[k]: v for k, v in entry.values.items() if k in page.advanced}}
        for field in ("prompt", "num_samples", "seed"):
            restored[getattr(page, field)] = entry.values.get(field)
        restored[page.strength] = strength_of(entry.values.get("skip_timesteps"),
                                              entry.values.get("timestep_respacing"))
        return {**self.show(entry, visitor), **restored,
                page.status: f"reopened {entry.name}: {entry.state}; its photo is in the editor and the mask used "
                             "in the mask box (press edit to run it again, or change them)"}

    def upload(self, value, frame) -> dict:
        """A photo put into the editor: framed by a transparent margin, so that strokes can start
        beside it (painting.framed). The editor says "upload" for a photo the page put there too
        (a framed one): that is left as it is."""
        from bdjax import painting

        page = self.page
        background = None if value is None else value.get("background") if isinstance(value, dict) else value
        if painting.is_framed(background, frame):
            return self.unchanged()
        if isinstance(background, Unreadable) or isinstance(value, Unreadable):
            return {page.photo: None, page.frame: None,
                    page.status: plain(f"error: the photo could not be read: {background or value}")}
        if background is None:
            return {page.frame: None}
        try:
            framed, frame = painting.framed(background)
        except ValueError as e:
            return {page.photo: None, page.frame: None, page.status: plain(f"error: {e}")}
        return {page.photo: framed, page.frame: frame,
                page.status: f"photo {frame['width']}x{frame['height']} loaded: paint the region to change (a stroke "
                             "may start in the checkered margin)"}

    def mask_upload(self, value) -> dict:
        if isinstance(value, Unreadable):
            return {self.page.mask_file: None, self.page.status: plain(f"error: the uploaded mask could not be "
                                                                        f"read: {value}")}
        return self.unchanged()

    def preview(self, values: dict) -> dict:
        """The photo with the region to change tinted and the edit window drawn, and the mask as
        it will be used (grown, inverted), before anything runs."""
        page = self.page
        try:
            prepared, notes = self.prepare(values)
        except (ValueError, TypeError) as e:
            return self.say(plain("error: " + " ".join(str(e).split())))
        inputs = prepared.inputs
        return {page.source_used: window_preview(inputs, tint=True), page.mask_used: np.asarray(inputs.full_mask),
                page.status: "mask preview (tinted over the photo, the edit window framed): "
                             + plain(inputs.framing_line()) + "".join(f"\n\nnote: {plain(n)}" for n in notes)}

    def select(self, shown, index) -> dict:
        """A result clicked: compared with the photo, and remembered for 'use' and 'reuse'."""
        page = self.page
        if not shown or index is None or not 0 <= index < len(shown["paths"]):
            return self.unchanged()
        return {page.selected: index, page.compare: (shown["source"], shown["paths"][index])}

    def use(self, shown, selected) -> dict:
        """The clicked result (else the best) becomes the photo to edit next, at its full size."""
        from bdjax import painting

        page = self.page
        if not shown or not shown["paths"]:
            return self.say("no results yet: run an edit first, then click a result")
        index = selected if selected is not None else 0
        value, frame = painting.framed(shown["paths"][index])
        return {page.photo: value, page.frame: frame, page.mask_file: None, page.invert: False,
                page.status: f"result #{index} is now the photo: paint the next region to change and press edit"}

    def reuse(self, shown) -> dict:
        page = self.page
        if not shown:
            return self.say("no results yet: run an edit first")
        return {page.seed: shown["seed"], page.status: f"seed {shown['seed']}: with the same photo, mask, samples "
                                                       "and options, edit gives the same results again"}

    def example(self, index: int) -> dict:
        """Load example `index`: its photo, its mask (in the mask box), its prompt, and invert where
        it replaces a background."""
        from bdjax import painting

        page = self.page
        photo_path, mask_path, prompt, inverted = examples_at_hand()[index]
        value, frame = painting.framed(photo_path)
        return {page.photo: value, page.frame: frame, page.mask_file: mask_path, page.invert: inverted,
                page.prompt: prompt, page.status: "example loaded: press edit (or change the mask or the prompt)"}

    def submit(self, session: str) -> float:
        return self.studio.submitted(session)

    def cancel(self, session: str) -> str:
        if not self.studio.cancel(session):
            return "nothing to cancel"
        return "cancelling: the run stops after its current batch"


# The examples/ folder's edits the page offers: photo, mask (painted), prompt, invert.
EXAMPLES = (("coffee.png", "coffee_cup_mask.png", "a glass of orange juice", False),
            ("coffee.png", "coffee_removal_mask.png", "a wooden table", False),
            ("astronaut.png", "astronaut_subject_mask.png", "the surface of the moon", True),
            ("coffee_scribble.png", "coffee_scribble_mask.png", "an orange", False))


def build_page(studio: Studio):
    """The Gradio page over `studio`: `layout`'s components, their events wired to `Handlers`."""
    import gradio as gr

    with gr.Blocks(title="bdjax") as blocks:
        page = layout(studio)
        handlers = Handlers(studio, page)

        # Gradio reads from the signature of the function it calls what to pass it: the session's
        # request for a `gr.Request` annotation, a progress tracker for a `gr.Progress` default,
        # the clicked item for a `gr.SelectData` one. They need gradio, imported lazily (above),
        # so these are defined here.
        def run(values: dict, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            yield from handlers.run(values, request.session_hash or "", progress)

        def submit(request: gr.Request) -> float:
            return handlers.submit(request.session_hash or "")

        def cancel(request: gr.Request) -> str:
            return handlers.cancel(request.session_hash or "")

        def select(shown, event: gr.SelectData):
            return handlers.select(shown, event.index)

        for event in (page.run_button.click, page.prompt.submit):  # the button, or Enter in the prompt
            event(submit, None, page.submitted, queue=False).then(run, page.inputs, page.results)
        quiet = dict(show_progress="hidden")  # quick events: no timer over the status
        page.cancel_button.click(cancel, None, page.status, queue=False, **quiet)
        blocks.load(handlers.load, page.visitor, [page.visitor, page.history, page.status], queue=False, **quiet)
        page.history.focus(handlers.history_update, page.visitor, page.history, queue=False)
        page.history.input(handlers.reopen, [page.visitor, page.history], page.results + page.restored, **quiet)
        page.photo.upload(handlers.upload, [page.photo, page.frame], [page.photo, page.frame, page.status], **quiet)
        page.mask_file.upload(handlers.mask_upload, page.mask_file, [page.mask_file, page.status], queue=False,
                              **quiet)
        page.preview.click(handlers.preview, page.inputs, [page.source_used, page.mask_used, page.status], **quiet)
        page.gallery.select(select, page.shown, [page.selected, page.compare, page.status], queue=False, **quiet)
        page.use_button.click(handlers.use, [page.shown, page.selected],
                              [page.photo, page.frame, page.mask_file, page.invert, page.status], **quiet)
        page.reuse_button.click(handlers.reuse, page.shown, [page.seed, page.status], queue=False, **quiet)
        page.dice.click(lambda: secrets_seed(), None, page.seed, queue=False, **quiet)
        respacing, skip = page.advanced["timestep_respacing"], page.advanced["skip_timesteps"]
        page.strength.input(lambda s, r: gr.skip() if skip_of(s, r) is None else skip_of(s, r),
                            [page.strength, respacing], skip, queue=False, **quiet)
        for field in (skip, respacing):
            field.input(lambda k, r: gr.skip() if strength_of(k, r) is None else strength_of(k, r),
                        [skip, respacing], page.strength, queue=False, **quiet)
        if page.examples is not None:
            page.examples.click(handlers.example, page.examples,
                                [page.photo, page.frame, page.mask_file, page.invert, page.prompt, page.status],
                                **quiet)
    return blocks


def secrets_seed() -> int:
    """A random seed for the page's dice: in [0, 2**31), as seeds are."""
    import secrets

    return secrets.randbelow(2 ** 31)

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
    editor = runtime.build_editor(runtime.with_lpips(guidance.needs_lpips(EditOptions(**options)))
                                  or FLAGS.config == "smoke" or _lpips_available())
    studio = Studio(editor, {**options, **framing}, output_dir, label=label, load_s=time.perf_counter() - start,
                    max_samples=FLAGS.max_samples, program=__name__)
    runtime.announce_compiles(editor, show=studio.show_compiling)
    # The page's default edit is prepared now (compiled, or loaded from the cache); nothing runs yet.
    print(runtime.describe_run(editor, [(editor.options(**options), True, FLAGS.num_samples)],
                               lead="preparing the page's default edit:"), file=sys.stderr, flush=True)
    editor.warm_up(editor.options(**options), num_samples=FLAGS.num_samples)
    page = build_page(studio)
    page.queue(default_concurrency_limit=1, max_size=64)
    examples = sorted({os.path.dirname(path) for example in examples_at_hand() for path in example[:2]})
    page.launch(server_name=FLAGS.host, server_port=FLAGS.port, share=FLAGS.share,
                allowed_paths=[output_dir, *examples],
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
