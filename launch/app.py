"""The web app: python -m launch.app [--config=smoke], then open http://127.0.0.1:7860

Upload a photo, paint the region to change (or upload a mask), type the prompt and press
"edit": the samples appear as their batches finish, then ranked best first by CLIP distance.
The app needs the optional Gradio extra (pip install -e ".[app]").

The networks load and the default configuration compiles once, at start-up (later starts read
the compiled programs from the persistent compilation cache). Requests run one at a time; the
others wait in a queue that shows their position. Every edit goes through the same editor API
(`BlendedDiffusion.prepare` and `edit_batches`) and the same result writer as `launch.edit`:
each run is written to OUTPUT_DIR/run_NNNN/ (samples/, ranked/, grid.png, report.json, plus the
source and the mask actually used at the model's size); without --output_dir, into a new
temporary folder named at start-up. Gradio's uploads (and its copies of the files it serves) go to
another temporary folder, removed when the app stops. Besides these, only the caches are written:
compiled programs (the compilation cache) and, for the real networks, fetched weights.

The app has no authentication: it listens on 127.0.0.1 unless --host says otherwise.
"""

import atexit
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

from absl import app, flags

from launch import edit, runtime

FLAGS = flags.FLAGS

TITLE = "bdjax: Blended Diffusion, text-driven editing of a painted region"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "100mb"  # Gradio refuses larger uploads; the image decoder refuses huge pixel counts


def define_flags():
    runtime.define_flags()
    runtime.define_option_flags()  # the advanced section's defaults (bdjax/options.py)
    flags.adopt_module_key_flags(runtime)
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
        """`options`: the page's option values (the flags'); `label`: the smoke preset's label, or "";
        `load_s`: the seconds the networks took to load, for reports."""
        self.editor, self.defaults, self.output_dir, self.label = editor, options, output_dir, label
        self.load_s, self.max_samples = load_s, max_samples
        self.lock = threading.Lock()  # one sampler run at a time (the queue already serialises requests)
        self.cancelled: dict[str, float] = {}  # session -> when its user last pressed "cancel"
        self.pending: dict[str, int] = {}  # session -> its requests queued or running
        self.progress = None  # the running request's progress tracker, for the compile stage

    def new_run_dir(self) -> str:
        """OUTPUT_DIR/run_NNNN, the first number not taken: a run never writes into another's."""
        number = 1 + max([int(n[4:]) for n in os.listdir(self.output_dir)
                          if n.startswith("run_") and n[4:].isdigit()], default=0)
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
        """Say on the running request's page that its configuration compiles (a request with new
        advanced options, say), as a stage of its progress."""
        if self.progress is not None:
            self.progress(0, desc="compiling, first run only")

    def is_cancelled(self, run: Run) -> bool:
        return self.cancelled.get(run.session, float("-inf")) >= run.submitted

    def prepare(self, editor_value, mask_file, invert: bool, prompt: str, num_samples, seed, options: dict):
        """The request of the page's inputs, checked (bdjax/painting.py, editor.prepare), and the
        warnings its inputs raised; ValueError says what is wrong in one line."""
        from bdjax import painting

        if isinstance(num_samples, (int, float)) and not isinstance(num_samples, bool) \
                and num_samples > self.max_samples:
            raise ValueError(f"num_samples={num_samples} is more than this app's limit of {self.max_samples} "
                             "(--max_samples)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            painted = painting.from_editor(editor_value, mask_file, invert_mask=invert)
            request = self.editor.prepare(painted.image, painted.mask, prompt or "", num_samples=_int(num_samples),
                                          seed=_int(seed), invert_mask=bool(invert),
                                          **{name: _int(value) for name, value in options.items()})
        return request, [str(w.message) for w in caught]

    def edit(self, request, run: Run, mask_source: str):
        """Run `request` into `run.directory`, yielding ("progress", k, writer) after each batch
        and ("done", ranked paths, writer) at the end (also after a cancel, with what finished)."""
        from bdjax import outputs

        editor = self.editor
        about = edit.provenance(editor, request.options, self.label, prompt=request.prompt)
        for name, image, kind in (("source.png", request.source, "source"), ("mask.png", request.mask, "mask")):
            outputs.save_png(os.path.join(run.directory, name), image, {"kind": kind, **about})
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
        report = edit.run_report(dataclasses.asdict(request.options), timings, sys.modules[__name__])
        report["inputs"] = {"prompt": request.prompt, "num_samples": request.num_samples, "seed": request.seed,
                            "invert_mask": request.invert_mask, "mask": mask_source,
                            "cancelled_after": finished if finished < request.num_samples else None}
        ranked = writer.finish(request.source, request.mask, request.prompt, report, label=self.label)
        yield "done", ranked, writer


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


# The source and mask at the model size are small (64 pixels for the smoke preset): shown enlarged.
CSS = ("#source-used img, #mask-used img { width: 100% !important; height: 100% !important; "
       "object-fit: contain !important; image-rendering: pixelated; }")


def build_page(studio: Studio):
    """The Gradio page over `studio`."""
    import gradio as gr

    from bdjax import outputs
    from bdjax.options import EditOptions, reference_name

    options = studio.defaults
    smoke = bool(studio.label)

    with gr.Blocks(title="bdjax") as page:
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
                    elem_id="photo")
                mask_file = gr.Image(label="or upload a mask instead (white: change, black: keep)", type="filepath",
                                     sources=("upload",), height=160, elem_id="mask-upload")
                invert = gr.Checkbox(label="invert mask: change everything not painted (background replacement)",
                                     value=False, elem_id="invert")
                prompt = gr.Textbox(label="prompt", placeholder="e.g. a glass of orange juice", elem_id="prompt")
                with gr.Row():
                    num_samples = gr.Number(label="samples", value=FLAGS.num_samples, precision=0,
                                            elem_id="num-samples")
                    seed = gr.Number(label="seed", value=FLAGS.seed, precision=0, elem_id="seed")
                advanced = {}
                with gr.Accordion("advanced: the reference's options", open=False, elem_id="advanced"):
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
                with gr.Row():
                    run_button = gr.Button("edit", variant="primary", elem_id="run")
                    cancel_button = gr.Button("cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(label="results, best first" + (" (SMOKE: random networks)" if smoke else ""),
                                     columns=4, height="auto", elem_id="results")
                mark = " (smoke)" if smoke else ""  # short: the label sits over the image
                with gr.Row():
                    source_used = gr.Image(label="source at the model size" + mark, type="filepath",
                                           interactive=False, height=220, elem_id="source-used")
                    mask_used = gr.Image(label="mask used at the model size" + mark, type="filepath",
                                         interactive=False, height=220, elem_id="mask-used")
                grid = gr.Image(label="grid", type="filepath", interactive=False, elem_id="grid")
                downloads = gr.File(label="downloads: source, mask, grid, report.json", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        submitted = gr.State(0.0)
        outs = [status, gallery, source_used, mask_used, grid, downloads]
        inputs = {photo, mask_file, invert, prompt, num_samples, seed, submitted, *advanced.values()}

        def say(text: str) -> tuple:
            return (text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())

        def gallery_of(writer, ranked=None) -> list:
            """The finished samples best first, captioned: while sampling from samples/, at the end
            the `ranked` files."""
            order = sorted(writer.done)
            if ranked is None:
                ranked = [os.path.join(writer.output_dir, outputs.SAMPLES_DIR, outputs.sample_name(k))
                          for _, k in order]
            return [(path, caption(rank, d, writer.seed, k, studio.label))
                    for rank, ((d, k), path) in enumerate(zip(order, ranked))]

        def run(values: dict, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            job = Run(directory="", session=request.session_hash or "", submitted=values[submitted])
            try:
                yield from edit_page(values, job, progress)
            finally:
                studio.finished(job)

        def edit_page(values: dict, job: Run, progress):
            if studio.is_cancelled(job):
                yield say("cancelled before it started")
                return
            try:
                prepared, notes = studio.prepare(
                    values[photo], values[mask_file], values[invert], values[prompt], values[num_samples],
                    values[seed], {name: values[c] for name, c in advanced.items()})
            except (ValueError, TypeError) as e:
                yield say(plain("error: " + " ".join(str(e).split())))
                return
            job.directory = studio.new_run_dir()
            note = "".join(f"\n\nnote: {plain(n)}" for n in notes)
            n = prepared.num_samples
            yield (f"sampling {n} sample{'s' * (n != 1)}..." + note, [], None, None, None, None)
            studio.progress = progress
            try:
                for kind, result, writer in studio.edit(prepared, job,
                                                        "uploaded" if values[mask_file] is not None else "painted"):
                    if kind == "progress":
                        yield (f"{result} of {n} samples done" + note, gallery_of(writer),
                               os.path.join(job.directory, "source.png"), os.path.join(job.directory, "mask.png"),
                               gr.skip(), gr.skip())
                    else:
                        files = [os.path.join(job.directory, name)
                                 for name in ("source.png", "mask.png", outputs.GRID, outputs.REPORT)]
                        done = len(writer.done) + len(writer.failed)
                        head = (f"cancelled after {done} of {n} samples; " if done < n else "") + \
                            f"{len(writer.done)} results ranked"
                        if writer.done:
                            head += f" (best distance {sorted(writer.done)[0][0]:.4f})"
                        if writer.failed:
                            head += f", {len(writer.failed)} turned non-finite and were left out"
                        head += f"; written to {plain(job.directory)}"
                        if studio.label:
                            head += f"\n\n{studio.label}"
                        yield (head + note, gallery_of(writer, result), files[0], files[1], files[2], files)
            except Exception as e:  # the server stays up; the traceback goes to its log
                import traceback

                traceback.print_exc()
                yield say(plain("error: " + (" ".join(str(e).split()) or type(e).__name__)[:300]))
            finally:
                studio.progress = None

        def submit(request: gr.Request) -> float:
            return studio.submitted(request.session_hash or "")

        def cancel(request: gr.Request) -> str:
            if not studio.cancel(request.session_hash or ""):
                return "nothing to cancel"
            return "cancelling: the run stops after its current batch"

        run_button.click(submit, None, submitted, queue=False).then(run, inputs, outs)
        cancel_button.click(cancel, None, status, queue=False)
    return page




def main(argv):
    if len(argv) > 1:
        raise runtime.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        raise runtime.FlagError("the web app runs in one process: drop --distributed (use launch.batch_edit for "
                                "multi-process runs)")
    if not 1 <= FLAGS.num_samples <= FLAGS.max_samples:
        raise runtime.FlagError(f"--num_samples={FLAGS.num_samples} must be in "
                                f"[1, --max_samples={FLAGS.max_samples}]")
    if not 1 <= FLAGS.port < 65536:
        raise runtime.FlagError(f"--port={FLAGS.port} must be in [1, 65535]")
    from bdjax import files, guidance, smoke
    from bdjax.options import EditOptions, OptionError

    options = runtime.options_from_flags()
    try:
        EditOptions(**options).validate()
    except OptionError as e:  # the option's flag: "--skip_timesteps=30 must be ..."
        raise runtime.FlagError(f"--{e}") from None
    if importlib.util.find_spec("gradio") is None:
        raise runtime.FlagError("the web app needs Gradio: pip install -e '.[app]'")
    check_port(FLAGS.host, FLAGS.port)
    if FLAGS.output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="bdjax-app-")
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
    if FLAGS.host not in LOOPBACK:
        print(f"warning: --host={FLAGS.host} serves this app to every machine that can reach this one, with no "
              "authentication", file=sys.stderr, flush=True)
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    start = time.perf_counter()
    editor = runtime.build_editor(guidance.needs_lpips(EditOptions(**options)) or FLAGS.config == "smoke"
                                  or _lpips_available())
    studio = Studio(editor, options, output_dir, label=label, load_s=time.perf_counter() - start,
                    max_samples=FLAGS.max_samples)
    runtime.announce_compiles(editor, show=studio.show_compiling)
    runtime.announce_run(editor, [(editor.options(**options), True, FLAGS.num_samples)])
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


def check_port(host: str, port: int) -> None:
    """FlagError unless `port` on `host` is free to listen on: said before the networks load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise runtime.FlagError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or "
                                "--host") from None


def plain(text: str) -> str:
    """`text` shown as written in a Markdown element (its *, _, [, ], <, ` and \\ escaped)."""
    return "".join("\\" + c if c in "\\*_[]<>`#|~" else c for c in text)


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
    app.run(runtime.program(main), flags_parser=runtime.parse_flags)
