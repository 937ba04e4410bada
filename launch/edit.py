"""Edit one image: python -m launch.edit --prompt="a red ball" --init_image=img.png --mask=mask.png

Flags follow the reference (omriav/blended-diffusion main.py). Each sample k is written as its
batch finishes, to OUTPUT_DIR/samples/sample_<k>.png with its entry sample_<k>.json (seed,
distance), so a run that stops early keeps what it finished. At the end the run writes
OUTPUT_DIR/ranked/NNN_<distance>.png best first (links to the sample files), OUTPUT_DIR/grid.png
and OUTPUT_DIR/report.json. A sample that turns NaN or infinite is not written as an image: a
warning names it and report.json lists it under "failed"; the run exits 0 if any sample
succeeded, else 1. `--config=smoke` runs the whole pipeline on tiny random networks with no
weights at all.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

from absl import app, flags

from launch import runtime

if TYPE_CHECKING:
    from bdjax.request import Request

FLAGS = flags.FLAGS


def define_flags():
    runtime.define_flags()
    runtime.define_option_flags()  # skip_timesteps, timestep_respacing, ... (bdjax/options.py)
    flags.adopt_module_key_flags(runtime)  # --help lists them too
    flags.DEFINE_string("prompt", None, "Text describing the edit; an empty string runs unguided.")
    flags.DEFINE_string("init_image", None, "The image to edit.")
    flags.DEFINE_string("mask", None, "Mask image: non-zero pixels are edited. Default: the whole image.")
    flags.DEFINE_bool("invert_mask", False, "Edit the zero pixels of the mask instead.")
    flags.DEFINE_integer("seed", 404, "Random seed; sample k of a seed is reproducible on its own.")
    flags.DEFINE_integer("num_samples", 32, "Samples in total (the reference: batch_size x iterations_num).")
    flags.DEFINE_string("output_dir", "output", "Where results are written.")
    flags.DEFINE_bool("overwrite", False, "Replace results already in --output_dir.")


def reported_flags(module) -> dict:
    """A program's flags for its report, but the edit options: the report lists those once, as
    they ran (with --config=smoke the preset's values replace the defaults of unset flags)."""
    from bdjax.options import EditOptions

    names = set(EditOptions.names())
    return {name: value for name, value in runtime.flag_values(module).items() if name not in names}


def run_report(options: dict, timings: dict, program=None) -> dict:
    """What report.json says of a run besides its samples (outputs.EditWriter.finish adds those):
    the flags of `program` (a launch module; default this one), the options as run, timings,
    versions and devices. The edit program and the web app write the same report."""
    return {"flags": reported_flags(program or sys.modules[__name__]), "options": options, "timings_s": timings,
            **runtime.environment()}


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
              mask: bool = True) -> list[Request]:
    """Every check that needs no network, shared by the launch programs: bad inputs fail in a
    second, before weights load, and leave the output directory as it was. `directory` is where
    this process will write and `patterns` the program's own output files there (see
    outputs.own_outputs): a previous run's refuse the run unless --overwrite. `writes` are the
    (subdirectories, files) the run will write there (see files.check_writable).

    Returns the prepared request (bdjax/request.py) of each of `prompts`, which the run edits
    as they are: --init_image and (if `mask`) --mask are decoded once, here."""
    # Warnings (an animated image, say) are held back until every check has passed, so that a
    # refused run prints its one error line and nothing else.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        requests = _checked_requests(options, prompts, directory, patterns, writes, mask)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return requests


def _checked_requests(options, prompts, directory, patterns, writes, mask) -> list[Request]:
    from bdjax import files, outputs, request
    from bdjax.options import EditOptions, OptionError

    try:
        first = request.prepare(FLAGS.init_image, FLAGS.mask if mask else None, prompts[0],
                                num_samples=FLAGS.num_samples, seed=FLAGS.seed, invert_mask=FLAGS.invert_mask,
                                options=EditOptions(**options), image_size=model_size())
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


def main(argv):
    if len(argv) > 1:
        raise runtime.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.prompt is None or FLAGS.init_image is None:
        raise runtime.FlagError("--prompt and --init_image are required (--prompt='' runs unguided)")
    runtime.setup()
    import jax

    from bdjax import guidance, outputs, smoke

    options = runtime.options_from_flags()
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    directory = output_dir()
    [request] = preflight(options, [FLAGS.prompt], directory, outputs.EDIT_OUTPUTS,
                          writes=((outputs.RANKED_DIR, outputs.SAMPLES_DIR), (outputs.GRID, outputs.REPORT)))
    start = time.perf_counter()
    editor = runtime.build_editor(guidance.needs_lpips(request.options))
    loaded = time.perf_counter()
    stream = editor.edit_batches(request)
    runtime.announce_run(editor, [(stream.options, stream.prompt != "", stream.num_samples)])
    runtime.announce_compiles(editor)
    # Everything is checked and the networks are ready: only now is the previous run removed.
    outputs.clear_for_run(directory, outputs.EDIT_OUTPUTS, overwrite=FLAGS.overwrite)
    writer = outputs.EditWriter(directory, FLAGS.seed, provenance(editor, stream.options, label, prompt=stream.prompt))
    for batch in stream:
        failed = writer.add(batch)
        if failed:
            print(f"warning: sample(s) {', '.join(str(k) for k, _ in failed)} turned non-finite "
                  f"({failed[0][1]}); left out of the results", file=sys.stderr, flush=True)
    done = time.perf_counter()
    timings = {"load": loaded - start, "edit": done - loaded, "per_sample": (done - loaded) / FLAGS.num_samples}
    report = run_report(dataclasses.asdict(stream.options), timings)
    writer.finish(stream.source, stream.mask, FLAGS.prompt, report, label=label)
    if writer.failed and not writer.done:
        print(f"error: all {len(writer.failed)} samples turned non-finite (NaN or infinite); nothing was ranked "
              f"(see {os.path.join(directory, outputs.REPORT)})", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        best = ", ".join(f"{d:.4f}" for d, _ in sorted(writer.done)[:4])
        failed = f", {len(writer.failed)} failed" if writer.failed else ""
        print(f"{len(writer.done)} results in {directory}/ranked (best distances {best}{failed}); "
              f"edit took {timings['edit']:.1f} s" + (f"\n{label}" if label else ""))


if __name__ == "__main__":
    define_flags()
    app.run(runtime.program(main), flags_parser=runtime.parse_flags)
