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

The reference's own spellings are accepted too, so that the authors' command runs unchanged: -p,
-i, --output_path, -o/--output_file, --iterations_num, --no_enforce_background, --gpu_id, --vid and
--export_assets (docs/flags.md); given --output_path, --output_file or --iterations_num, the ranked
results take the reference's names. --vid and --export_assets are an `on_step` of the editor
(bdjax.outputs.StepRecorder).
"""

from __future__ import annotations

import dataclasses
import os
import re
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
    define_reference_flags()


def define_reference_flags():
    """The reference's own spellings (its main.py), beside bdjax's: -p and -i are --prompt's and
    --init_image's short names (cli.define_edit_flags); these are read by `reference_flags`."""
    flags.DEFINE_string("output_path", None, "The reference's name of --output_dir (give one of the two).")
    flags.DEFINE_string("output_file", None, "The reference's: the best result's file name in the output directory "
                        "(a .png), and the stem of the ranked files, named as the reference names them "
                        "(<distance>_<stem>_i_<iteration>_b_<row>.png).", short_name="o")
    flags.DEFINE_integer("iterations_num", None, "The reference's: samples = iterations_num x --batch_size "
                         "(4 with --batch_size=auto; give this or --num_samples, not both).")
    flags.DEFINE_bool("no_enforce_background", False, "The reference's: --noenforce_background.")
    flags.DEFINE_integer("gpu_id", None, "The reference's: run on this local device only (default: every device).")
    flags.DEFINE_bool("vid", False, "The reference's: a video of each sample's predicted image at every diffusion step "
                      "(at the model size, the background pasted as in the result; lossless animated WebP, or GIF "
                      "where Pillow lacks WebP), in videos/ (the reference's naming: beside the results).")
    flags.DEFINE_bool("export_assets", False, "The reference's: each sample's raw final prediction at the model size "
                      "(the model's own pixels, no background pasted) and the mask it used, in assets/.")


def reference_flags(options: dict) -> dict:
    """Apply the reference's spellings to bdjax's flags and `options` (FlagError for a pair given
    both ways); returns how the run names its results: {"stem": ...} in the reference's naming
    (any of --output_path, --output_file, --iterations_num given), else {}."""
    from bdjax.options import EditOptions

    given = lambda name: FLAGS[name].present  # noqa: E731
    for ours, theirs in (("output_dir", "output_path"), ("num_samples", "iterations_num"),
                         ("enforce_background", "no_enforce_background")):
        if given(ours) and given(theirs):
            raise cli.FlagError(f"--{ours} and --{theirs} (the reference's spelling) say the same thing: give one")
    if FLAGS.output_path is not None:
        FLAGS.output_dir = FLAGS.output_path
    if FLAGS.iterations_num is not None:
        if FLAGS.iterations_num < 1:
            raise cli.FlagError(f"--iterations_num={FLAGS.iterations_num} must be at least 1")
        FLAGS.num_samples = FLAGS.iterations_num * EditOptions(batch_size=options["batch_size"]).nominal_batch
    if FLAGS.no_enforce_background:
        options["enforce_background"] = False
    if FLAGS.output_file is not None:
        name = FLAGS.output_file
        if os.path.basename(name) != name or not name.lower().endswith(".png") or name.lower() == ".png":
            raise cli.FlagError(f"--output_file={name!r} must be a file name ending in .png (the reference's "
                                "rule), without a folder: the folder is --output_path")
    if FLAGS.gpu_id is not None and FLAGS.distributed:
        raise cli.FlagError("--gpu_id runs on one local device: drop --distributed, or drop --gpu_id")
    if any(given(name) for name in ("output_path", "output_file", "iterations_num")):
        return {"stem": os.path.splitext(FLAGS.output_file or "output.png")[0]}
    return {}


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
    options = runtime.options_from_flags()
    naming = reference_flags(options)
    runtime.setup()
    from bdjax import files

    directory = cli.output_dir()
    with files.output_lock(directory):  # a second run into the directory refuses at once, naming this one
        edit(options, directory, naming)


def edit(options: dict, directory: str, naming: dict | None = None):
    """The run, once `directory` is this run's alone."""
    import jax

    from bdjax import guidance, outputs, smoke

    naming = naming or {}
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    devices = None
    if FLAGS.gpu_id is not None:
        local = jax.local_devices()
        if not 0 <= FLAGS.gpu_id < len(local):
            raise cli.FlagError(f"--gpu_id={FLAGS.gpu_id}: this machine has {len(local)} local "
                                f"{local[0].platform} device{'s' * (len(local) != 1)} (ids 0 to {len(local) - 1})")
        devices = [local[FLAGS.gpu_id]]
    patterns = outputs.EDIT_OUTPUTS + extra_outputs(naming)
    if naming:
        patterns += outputs.reference_outputs(naming["stem"], FLAGS.output_file)
    [request] = cli.preflight(options, [FLAGS.prompt], directory, patterns,
                              writes=((outputs.RANKED_DIR, outputs.SAMPLES_DIR, outputs.CROPS_DIR,
                                       *([outputs.VIDEOS_DIR] if FLAGS.vid and not naming else []),
                                       *([outputs.ASSETS_DIR] if FLAGS.export_assets else [])),
                                      (outputs.GRID, outputs.REPORT, *([FLAGS.output_file] if FLAGS.output_file
                                                                      else []))))
    start = time.perf_counter()
    editor = runtime.build_editor(runtime.with_lpips(guidance.needs_lpips(request.options)), devices=devices)
    loaded = time.perf_counter()
    recorder = None
    if FLAGS.vid or FLAGS.export_assets:
        name = (outputs.reference_sample_name(naming["stem"], request.options.nominal_batch) if naming
                else outputs.sample_name)
        recorder = outputs.StepRecorder(directory, request, video=FLAGS.vid, assets=FLAGS.export_assets,
                                        name=name, videos_dir="" if naming else outputs.VIDEOS_DIR)
    stream = editor.edit_batches(request, on_step=recorder, every_step=FLAGS.vid)
    runtime.announce_run(editor, [(stream.options, stream.prompt != "", stream.num_samples)])
    if jax.process_index() == 0:
        print(stream.inputs.framing_line(), file=sys.stderr, flush=True)
    runtime.announce_compiles(editor)
    # Everything is checked and the networks are ready: only now is the previous run removed.
    outputs.clear_for_run(directory, patterns, overwrite=FLAGS.overwrite)
    about = cli.provenance(editor, stream.options, label, prompt=stream.prompt, **stream.inputs.framing())
    ranked_name = (outputs.reference_naming(naming["stem"], stream.options.nominal_batch) if naming
                   else outputs.ranked_name)
    writer = outputs.EditWriter(directory, FLAGS.seed, about, ranked_name=ranked_name, options=stream.options)
    RUN.update(writer=writer, directory=directory, total=stream.num_samples)
    if recorder is not None:
        recorder.start(about)
    try:
        for batch in stream:
            failed = writer.add(batch)
            if recorder is not None:
                recorder.write(batch)
            if failed:
                print(f"warning: sample(s) {', '.join(str(k) for k, _ in failed)} turned non-finite "
                      f"({failed[0][1]}); left out of the results", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        RUN["interrupted"] = True  # rank what finished, as an uninterrupted run would, then stop
    done = time.perf_counter()
    finished = len(writer.done) + len(writer.failed)
    timings = {"load": loaded - start, "edit": done - loaded, "per_sample": (done - loaded) / max(finished, 1)}
    report = {**cli.run_report(dataclasses.asdict(stream.options), timings, sys.modules[__name__]),
              **stream.inputs.framing(),
              **editor.batch_choice(stream.options, stream.prompt != "", stream.num_samples).report()}
    if RUN.get("interrupted"):
        report["interrupted"] = {"finished": finished, "asked": stream.num_samples}
    report["diversity"] = cli.diversity(editor, writer, request)
    ranked = writer.finish(stream.full_source, stream.full_mask, FLAGS.prompt, report, label=label)
    if FLAGS.output_file and ranked:  # the reference's best result, by the name it was given
        outputs.link_or_copy(ranked[0], os.path.join(directory, FLAGS.output_file))
    if RUN.get("interrupted"):
        raise KeyboardInterrupt
    if writer.failed and not writer.done:
        print(f"error: all {len(writer.failed)} samples turned non-finite (NaN or infinite); nothing was ranked "
              f"(see {os.path.join(directory, outputs.REPORT)})", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        best = ", ".join(f"{d:.4f}" for d, _ in sorted(writer.done)[:4])
        failed = f", {len(writer.failed)} failed" if writer.failed else ""
        ranked_by = "distances" if stream.options.rank_by == "clip_masked" else f"{stream.options.rank_by} values"
        print(f"{len(writer.done)} results in {directory}/ranked (best {ranked_by} {best}{failed}); "
              f"edit took {timings['edit']:.1f} s" + (f"\n{label}" if label else ""))


def extra_outputs(naming: dict) -> tuple:
    """The patterns (as outputs.EDIT_OUTPUTS) of what --vid and --export_assets write."""
    from bdjax import outputs

    video = r"\.(webp|gif)"
    stem = rf"{re.escape(naming['stem'])}_i_\d+_b_\d+" if naming else r"sample_\d+"
    found = ()
    if FLAGS.vid:
        found += (stem + video,) if naming else (rf"{outputs.VIDEOS_DIR}/{stem}{video}",)
    if FLAGS.export_assets:
        found += (rf"{outputs.ASSETS_DIR}/{stem}\.png", rf"{outputs.ASSETS_DIR}/{re.escape(outputs.ASSET_MASK)}")
    return found


if __name__ == "__main__":
    define_flags()
    app.run(cli.program(main, interrupted), flags_parser=cli.parse_flags)
