"""The command-line plumbing every launch program shares: flag parsing and exit statuses, the
wrapper that turns a user's mistake into one line, the checks made before any network loads
(`preflight`), and what each program's PNGs and report.json record of a run.

Programs import this module and launch/runtime.py (the model and runtime flags, the editor);
no program imports another.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
import warnings
from typing import TYPE_CHECKING

from absl import flags

from bdjax.absl_flags import parse_flags  # noqa: F401  app.run(..., flags_parser=cli.parse_flags)
from bdjax.errors import is_user_os_error, os_error_line

if TYPE_CHECKING:
    from bdjax.request import Request

FLAGS = flags.FLAGS


USER_ERROR = 2  # exit status for a problem with the user's inputs (1 stays for crashes)


class FlagError(ValueError):
    """Missing or contradictory flags."""


LOST_PEER = 3  # exit status when another process of a multi-process run died
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT, as shells report it)


def program(main, interrupted=None):
    """An absl main whose user errors, wherever raised, end as one line and exit status 2, and
    which stops cleanly (status 3, naming the lost process) when a peer process dies.

    Ctrl-C ends it with one line, `interrupted: <interrupted()>` (what the run kept and how to
    resume it; `interrupted` is the program's own function, called after the interrupt), and
    exit status 130."""
    @functools.wraps(main)
    def wrapped(argv):
        from launch import platform

        platform.settle()  # before JAX is imported: the CPU where a CUDA plugin finds no GPU
        import jax

        try:
            with user_errors():
                return main(argv)
        except KeyboardInterrupt:
            said = interrupted() if interrupted is not None else "stopped before finishing"
            print(f"interrupted: {said}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # What was kept is on disk (written atomically) and the locks are released; skip the
            # interpreter's teardown, which can crash while an interrupted XLA compile winds down.
            os._exit(INTERRUPTED)
        except (MemoryError, jax.errors.JaxRuntimeError) as e:
            if _out_of_memory(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"error: out of memory ({first}); {_memory_advice(e)}", file=sys.stderr, flush=True)
                sys.exit(USER_ERROR)
            if jax.process_count() == 1:
                raise
            lost = _lost_processes()
            who = f"process(es) {lost}" if lost else "another process"
            print(f"error: {who} of this {jax.process_count()}-process run stopped ({str(e).splitlines()[0][:200]}); "
                  "finished items are on disk: rerun the same command on every process to resume",
                  file=sys.stderr, flush=True)
            # Skip JAX's exit-time shutdown barrier: it cannot succeed without the lost peer.
            os._exit(LOST_PEER)
    return wrapped


def _out_of_memory(e: BaseException) -> bool:
    """Host memory (numpy) or device memory (XLA's RESOURCE_EXHAUSTED) ran out."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e).split("\n", 1)[0]


# Where host memory runs out reading the user's files rather than computing: bdjax's modules
# that decode and frame inputs.
_INPUT_MODULES = ("image_io.py", "window.py", "request.py", "painting.py", "manifest.py", "files.py")


def _memory_advice(e: BaseException) -> str:
    """What to change after running out of memory: the inputs, when decoding them took it (the
    innermost bdjax frame is an input module), else the batch."""
    import bdjax

    bdjax_root = os.path.dirname(os.path.abspath(bdjax.__file__)) + os.sep
    frames = [f.filename for f in traceback.extract_tb(e.__traceback__)] if e.__traceback__ else []
    ours = [f for f in frames if f.startswith(bdjax_root)]
    if isinstance(e, MemoryError) and ours and os.path.basename(ours[-1]) in _INPUT_MODULES:
        return "reading the inputs took it: use a smaller image or mask (or split a manifest)"
    return "lower --batch_size or --aug_num, or pass --remat=blocks"


def _lost_processes() -> list[int]:
    """The processes the coordination service no longer hears from, waiting up to the heartbeat
    timeout for it to notice (the peer that closed a connection may not be flagged yet)."""
    import time

    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        return []
    everyone = list(range(jax.process_count()))
    deadline = time.monotonic() + FLAGS.heartbeat_timeout + 5
    while time.monotonic() < deadline:
        try:
            live = client.get_live_nodes(everyone)
        except Exception:  # the service itself may be gone with process 0
            return [0] if jax.process_index() != 0 else []
        lost = sorted(set(everyone) - set(live))
        if lost:
            return lost
        time.sleep(0.5)
    return []


def _raised_in_library(e: BaseException) -> bool:
    """Whether the innermost frame of `e` is inside JAX or Flax (tracing, compiling), apart from
    jax.distributed's checks on the multi-process flags."""
    roots = [os.path.dirname(m.__file__) + os.sep for m in (sys.modules.get(n) for n in ("jax", "jaxlib", "flax"))
             if m is not None and getattr(m, "__file__", None)]
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    return (bool(frames) and any(frames[-1].filename.startswith(root) for root in roots)
            and os.path.basename(frames[-1].filename) != "distributed.py")


def is_user_error(e: BaseException) -> bool:
    """Whether `e` is a problem with the user's inputs or environment (one line, status 2),
    rather than a crash that needs its traceback. The project's checks raise ValueError (or a
    subclass, as json.JSONDecodeError and UnicodeDecodeError are); a ValueError that JAX or Flax
    raised while tracing is a bug, and so is a NaN reaching a JSON report."""
    from bdjax.outputs import NonFiniteJSONError
    from checkpoints_convert.common import ConversionError

    if isinstance(e, NonFiniteJSONError):
        return False
    if isinstance(e, ConversionError):
        return True
    if isinstance(e, OSError):  # the rule every program follows (bdjax/errors.py)
        return is_user_os_error(e)
    return isinstance(e, ValueError) and not _raised_in_library(e)


@contextlib.contextmanager
def user_errors():
    """Turn problems with the user's inputs (`is_user_error`) into one line on stderr and exit
    status 2; anything else keeps its traceback."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e):
            raise
        message = " ".join((os_error_line(e) if isinstance(e, OSError) else str(e)).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR)


def define_edit_flags():
    """The flags of one edit's inputs and outputs (`preflight` reads them): launch.edit's, and
    launch.extrapolate's beside its own."""
    flags.DEFINE_string("prompt", None, "Text describing the edit; an empty string runs unguided.", short_name="p")
    flags.DEFINE_string("init_image", None, "The image to edit.", short_name="i")
    flags.DEFINE_string("mask", None, "Mask image: non-zero pixels are edited. Default: the whole image.")
    flags.DEFINE_bool("invert_mask", False, "Edit the zero pixels of the mask instead.")
    flags.DEFINE_integer("seed", 404, "Random seed; sample k of a seed is reproducible on its own.")
    flags.DEFINE_integer("num_samples", 32, "Samples in total (the reference: batch_size x iterations_num).")
    flags.DEFINE_string("output_dir", "output", "Where results are written.")
    flags.DEFINE_bool("overwrite", False, "Replace results already in --output_dir.")


def define_framing_flags():
    """How an edit maps onto the photo (bdjax/request.py `prepare_inputs`): launch.edit's,
    launch.batch_edit's (every job's default) and the web app's."""
    from bdjax import window

    flags.DEFINE_enum("fit", "window", ["window", "stretch"],
                      "window: edit a square around the mask at the model size and paste it back into the photo "
                      "at its own size (pixels farther than --feather from the mask are kept byte for byte); "
                      "stretch: the reference's way, the whole image stretched to the model size, results at "
                      "that size.")
    flags.DEFINE_float("context", window.DEFAULT_CONTEXT, "Window mode: the margin around the mask on each side, "
                       "as a fraction of the mask's long side (the window is at least the model size).")
    flags.DEFINE_integer("feather", window.DEFAULT_FEATHER, "Window mode: photo pixels of soft edge outside the "
                         "mask where the edit fades into the photo; 0 pastes hard.")


def framing_from_flags() -> dict:
    """--fit, --context and --feather as `request.prepare` takes them."""
    return {"fit": FLAGS.fit, "context": FLAGS.context, "feather": FLAGS.feather}


def flag_values(module) -> dict:
    """The flags of a launch program (its own and the shared ones) with their values, for reports."""
    found = [f for m in (module, __name__, "launch.runtime") for f in FLAGS.get_key_flags_for_module(m)]
    return {f.name: f.value for f in found}


def environment() -> dict:
    """Versions and devices, for reports."""
    import platform

    import flax
    import jax

    import bdjax

    device = jax.devices()[0]
    return {
        "versions": {"bdjax": bdjax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "python": platform.python_version()},
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                   "processes": jax.process_count(), "process_index": jax.process_index()},
    }


def reported_flags(module) -> dict:
    """A program's flags for its report, but the edit options: the report lists those once, as
    they ran (with --config=smoke the preset's values replace the defaults of unset flags)."""
    from bdjax.options import EditOptions

    names = set(EditOptions.names())
    return {name: value for name, value in flag_values(module).items() if name not in names}


def run_report(options: dict, timings: dict, program) -> dict:
    """What report.json says of a run besides its samples (outputs.EditWriter.finish adds those):
    the flags of `program` (a launch module), the options as run, timings, versions and devices.
    The edit program and the web app write the same report."""
    return {"flags": reported_flags(program), "options": options, "timings_s": timings,
            **environment()}


def diversity(editor, writer, request) -> float | None:
    """The run's diversity (bdjax/scores.py) over the best of what `writer` wrote, read back from
    disk (nothing of the samples is held in memory meanwhile)."""
    import numpy as np

    from bdjax import outputs, scores

    paths = writer.ranked_edits(scores.DIVERSITY_MAX)
    if len(paths) < 2 or editor.models.lpips is None:
        return None
    return editor.diversity(np.stack([outputs.read_png(p) for p in paths]), request.region)


def provenance(editor, options, label: str, **fields) -> dict:
    """What every PNG of a launch program's run records (outputs.edit_provenance): `fields`
    (the prompt, ...), the options as run, the run's identity and the smoke label."""
    from bdjax import batch, outputs

    run = batch.run_identity(FLAGS.precision, FLAGS.config, editor.image_size, editor.weights_digest)
    return outputs.edit_provenance(options, label, run, **fields)


def model_size() -> int:
    """The model's image size, known from the flags before any network is built."""
    from bdjax import smoke

    return smoke.IMAGE_SIZE if FLAGS.config == "smoke" else int(FLAGS.model_output_size)


def output_dir() -> str:
    """Where this process writes: --output_dir, or its process_<i>/ there on multi-process runs
    (each host writes the samples its devices produced)."""
    import jax

    return FLAGS.output_dir if jax.process_count() == 1 else f"{FLAGS.output_dir}/process_{jax.process_index()}"


def preflight(options: dict, prompts: list[str], directory: str, patterns, writes=((), ()),
              mask: bool = True, framing: dict | None = None) -> list[Request]:
    """Every check that needs no network, shared by the launch programs: bad inputs fail in a
    second, before weights load, and leave the output directory as it was. `directory` is where
    this process will write and `patterns` the program's own output files there (see
    outputs.own_outputs): a previous run's refuse the run unless --overwrite. `writes` are the
    (subdirectories, files) the run will write there (see files.check_writable).

    Returns the prepared request (bdjax/request.py) of each of `prompts`, which the run edits
    as they are: --init_image and (if `mask`) --mask are decoded once, here, and framed as
    `framing` says (default: --fit, --context and --feather)."""
    # Warnings (an animated image, say) are held back until every check has passed, so that a
    # refused run prints its one error line and nothing else.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        requests = _checked_requests(options, prompts, directory, patterns, writes, mask,
                                     framing_from_flags() if framing is None else framing)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return requests


def _checked_requests(options, prompts, directory, patterns, writes, mask, framing) -> list[Request]:
    from bdjax import files, outputs, request
    from bdjax.options import EditOptions, OptionError

    try:
        first = request.prepare(FLAGS.init_image, FLAGS.mask if mask else None, prompts[0],
                                num_samples=FLAGS.num_samples, seed=FLAGS.seed, invert_mask=FLAGS.invert_mask,
                                options=EditOptions(**options), image_size=model_size(), **framing)
        prepared = {prompts[0]: first}
        for prompt in prompts[1:]:
            if prompt not in prepared:
                prepared[prompt] = first.with_prompt(prompt)
    except OptionError as e:  # "seed=-1 must be ..." said of a flag: "--seed=-1 must be ..."
        if e.name in FLAGS:
            raise ValueError(f"--{e}") from None
        raise
    old = outputs.own_outputs(directory, patterns)
    if old and not FLAGS.overwrite:
        raise FileExistsError(f"{directory} already holds results ({len(old)} files, e.g. {old[0]}); choose "
                              "another --output_dir or pass --overwrite")
    files.check_writable(directory, *writes)
    return [prepared[prompt] for prompt in prompts]
