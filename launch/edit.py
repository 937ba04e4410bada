"""Edit one image: python -m launch.edit --prompt="a red ball" --init_image=img.png --mask=mask.png

Flags follow the reference (omriav/blended-diffusion main.py). Each sample k is written as its
batch finishes, to OUTPUT_DIR/samples/sample_<k>.png with its entry sample_<k>.json (seed,
distance), so a run that stops early keeps what it finished. At the end the run writes
OUTPUT_DIR/ranked/NNN_<distance>.png best first (links to the sample files), OUTPUT_DIR/grid.png
and OUTPUT_DIR/report.json. A sample that turns NaN or infinite is not written as an image: a
warning names it and report.json lists it under "failed"; the run exits 0 if any sample
succeeded, else 1. Ctrl-C ranks what finished (report.json says "interrupted"), says so in one
line and exits 130. A run holds a lock on OUTPUT_DIR: a second run into it refuses at once, naming
the first. `--config=smoke` runs the whole pipeline on tiny random networks with no weights at all.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags

from launch import cli, runtime

FLAGS = flags.FLAGS


def define_flags():
    runtime.define_flags()
    runtime.define_option_flags()  # skip_timesteps, timestep_respacing, ... (bdjax/options.py)
    cli.define_edit_flags()  # --prompt, --init_image, --mask, --seed, --num_samples, --output_dir, ...
    cli.define_framing_flags()  # --fit, --context, --feather
    flags.adopt_module_key_flags(runtime)  # --help lists them too
    flags.adopt_module_key_flags(cli)


# What the run has done so far, for the line said after Ctrl-C (`interrupted`).
RUN: dict = {}


def interrupted() -> str:
    """What a run stopped by Ctrl-C kept, and how to get the rest."""
    writer = RUN.get("writer")
    if writer is None:
        return "nothing was written"
    kept = len(writer.done)
    ranked = " and ranked (grid.png, report.json)" if RUN.get("interrupted") else ""
    return (f"{kept} of the {RUN['total']} samples finished and are kept in {RUN['directory']}{ranked}; rerun "
            f"with --overwrite for all {RUN['total']} (the kept ones come out the same)")


def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.prompt is None or FLAGS.init_image is None:
        raise cli.FlagError("--prompt and --init_image are required (--prompt='' runs unguided)")
    runtime.setup()
    from bdjax import files

    options = runtime.options_from_flags()
    directory = cli.output_dir()
    with files.output_lock(directory):  # a second run into the directory refuses at once, naming this one
        edit(options, directory)


def edit(options: dict, directory: str):
    """The run, once `directory` is this run's alone."""
    import jax

    from bdjax import guidance, outputs, smoke

    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    [request] = cli.preflight(options, [FLAGS.prompt], directory, outputs.EDIT_OUTPUTS,
                              writes=((outputs.RANKED_DIR, outputs.SAMPLES_DIR, outputs.CROPS_DIR),
                                      (outputs.GRID, outputs.REPORT)))
    start = time.perf_counter()
    editor = runtime.build_editor(guidance.needs_lpips(request.options))
    loaded = time.perf_counter()
    stream = editor.edit_batches(request)
    runtime.announce_run(editor, [(stream.options, stream.prompt != "", stream.num_samples)])
    if jax.process_index() == 0:
        print(stream.inputs.framing_line(), file=sys.stderr, flush=True)
    runtime.announce_compiles(editor)
    # Everything is checked and the networks are ready: only now is the previous run removed.
    outputs.clear_for_run(directory, outputs.EDIT_OUTPUTS, overwrite=FLAGS.overwrite)
    about = cli.provenance(editor, stream.options, label, prompt=stream.prompt, **stream.inputs.framing())
    writer = outputs.EditWriter(directory, FLAGS.seed, about)
    RUN.update(writer=writer, directory=directory, total=stream.num_samples)
    try:
        for batch in stream:
            failed = writer.add(batch)
            if failed:
                print(f"warning: sample(s) {', '.join(str(k) for k, _ in failed)} turned non-finite "
                      f"({failed[0][1]}); left out of the results", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        RUN["interrupted"] = True  # rank what finished, as an uninterrupted run would, then stop
    done = time.perf_counter()
    finished = len(writer.done) + len(writer.failed)
    timings = {"load": loaded - start, "edit": done - loaded, "per_sample": (done - loaded) / max(finished, 1)}
    report = {**cli.run_report(dataclasses.asdict(stream.options), timings, sys.modules[__name__]),
              **stream.inputs.framing()}
    if RUN.get("interrupted"):
        report["interrupted"] = {"finished": finished, "asked": stream.num_samples}
    writer.finish(stream.full_source, stream.full_mask, FLAGS.prompt, report, label=label)
    if RUN.get("interrupted"):
        raise KeyboardInterrupt
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
    app.run(cli.program(main, interrupted), flags_parser=cli.parse_flags)
