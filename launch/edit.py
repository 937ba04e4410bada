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
from typing import Any

from absl import app, flags

from launch import runtime

FLAGS = flags.FLAGS


def define_flags():
    runtime.define_flags()
    flags.adopt_module_key_flags(runtime)  # --help lists them too
    flags.DEFINE_string("prompt", None, "Text describing the edit; an empty string runs unguided.")
    flags.DEFINE_string("init_image", None, "The image to edit.")
    flags.DEFINE_string("mask", None, "Mask image: non-zero pixels are edited. Default: the whole image.")
    flags.DEFINE_bool("invert_mask", False, "Edit the zero pixels of the mask instead.")
    flags.DEFINE_integer("skip_timesteps", 25, "Diffusion steps skipped at the start.")
    flags.DEFINE_string("timestep_respacing", "100", "Respacing of the 1000 steps: '100', '10,20,30', 'ddim50'.")
    flags.DEFINE_bool("ddim", False, "DDIM sampling with score conditioning instead of ancestral steps.")
    flags.DEFINE_float("clip_guidance_lambda", 1000.0, "Weight of the CLIP loss.")
    flags.DEFINE_float("range_lambda", 50.0, "Weight of the loss keeping predictions in [-1, 1].")
    flags.DEFINE_integer("aug_num", 8, "Augmented copies per sample for the CLIP loss.")
    flags.DEFINE_bool("local_clip_guided_diffusion", False, "The Algorithm 1 baseline: no blending.")
    flags.DEFINE_bool("background_preservation_loss", False, "Algorithm 1: add LPIPS + L2 background losses.")
    flags.DEFINE_float("lpips_sim_lambda", 1000.0, "Weight of the LPIPS background loss.")
    flags.DEFINE_float("l2_sim_lambda", 10000.0, "Weight of the L2 background loss.")
    flags.DEFINE_bool("enforce_background", True, "Paste the original background into the final result.")
    flags.DEFINE_integer("seed", 404, "Random seed; sample k of a seed is reproducible on its own.")
    flags.DEFINE_integer("batch_size", 4, "Samples per diffusion run (spread over all devices).")
    flags.DEFINE_integer("num_samples", 32, "Samples in total (the reference: batch_size x iterations_num).")
    flags.DEFINE_string("output_dir", "output", "Where results are written.")
    flags.DEFINE_bool("overwrite", False, "Replace results already in --output_dir.")


EDIT_OPTION_FLAGS = ("skip_timesteps", "timestep_respacing", "ddim", "clip_guidance_lambda", "range_lambda",
                     "aug_num", "local_clip_guided_diffusion", "background_preservation_loss", "lpips_sim_lambda",
                     "l2_sim_lambda", "enforce_background", "batch_size")


def options_from_flags() -> dict:
    from bdjax import smoke

    options = {name: FLAGS[name].value for name in EDIT_OPTION_FLAGS}
    if FLAGS.config == "smoke":  # fewer steps and copies unless the user set them
        options.update({k: v for k, v in smoke.OPTIONS.items() if not FLAGS[k].present})
    return options


def run_report(options: dict, timings: dict) -> dict:
    return {"flags": runtime.flag_values(sys.modules[__name__]), "options": options, "timings_s": timings,
            **runtime.environment()}


@dataclasses.dataclass
class Inputs:
    """The inputs as the preflight decoded them: the run uses these, not the files again."""
    image: Any                # PIL image
    mask: Any                 # PIL image or None
    size: int                 # the model's image size


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
              mask: bool = True) -> Inputs:
    """Every check that needs no network, shared by the launch programs: bad inputs fail in a
    second, before weights load, and leave the output directory as it was. `directory` is where
    this process will write and `patterns` the program's own output files there (see
    outputs.own_outputs): a previous run's refuse the run unless --overwrite. `writes` are the
    (subdirectories, files) the run will write there (see outputs.check_writable). The image and
    (if `mask`) --mask are decoded once, here."""
    # Warnings (an animated image, say) are held back until every check has passed, so that a
    # refused run prints its one error line and nothing else.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        inputs = _checked_inputs(options, prompts, directory, patterns, writes, mask)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return inputs


def _checked_inputs(options, prompts, directory, patterns, writes, mask) -> Inputs:
    from bdjax import image_io, outputs, tokenizer
    from bdjax.blended import EditOptions, check_request

    check_request(FLAGS.num_samples, FLAGS.seed, flag_prefix="--")  # also bounds num_samples
    EditOptions(**options).validate()
    for prompt in prompts:
        tokenizer.tokenize(prompt)
    size = model_size()
    image = image_io.to_pil(FLAGS.init_image, "image")
    image_io.load_image(image, size)
    mask_image = None
    if mask and FLAGS.mask is not None:
        mask_image = image_io.to_pil(FLAGS.mask, "mask")
    with warnings.catch_warnings():  # the edit itself warns about the mask, once
        warnings.simplefilter("ignore")
        image_io.load_mask(mask_image, size, image_size=image.size, invert_mask=FLAGS.invert_mask)
    old = outputs.own_outputs(directory, patterns)
    if old and not FLAGS.overwrite:
        raise FileExistsError(f"{directory} already holds results ({len(old)} files, e.g. {old[0]}); choose "
                              "another --output_dir or pass --overwrite")
    outputs.check_writable(directory, *writes)
    return Inputs(image=image, mask=mask_image, size=size)


def main(argv):
    if len(argv) > 1:
        raise runtime.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.prompt is None or FLAGS.init_image is None:
        raise runtime.FlagError("--prompt and --init_image are required (--prompt='' runs unguided)")
    runtime.setup()
    import jax

    from bdjax import outputs, smoke

    options = options_from_flags()
    need_lpips = FLAGS.background_preservation_loss and FLAGS.lpips_sim_lambda != 0
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    directory = output_dir()
    inputs = preflight(options, [FLAGS.prompt], directory, outputs.EDIT_OUTPUTS,
                       writes=((outputs.RANKED_DIR, outputs.SAMPLES_DIR), (outputs.GRID, outputs.REPORT)))
    start = time.perf_counter()
    editor = runtime.build_editor(need_lpips)
    loaded = time.perf_counter()
    stream = editor.edit_batches(inputs.image, inputs.mask, FLAGS.prompt, num_samples=FLAGS.num_samples,
                                 seed=FLAGS.seed, invert_mask=FLAGS.invert_mask, **options)
    # Everything is checked and the networks are ready: only now is the previous run removed.
    outputs.clear_for_run(directory, outputs.EDIT_OUTPUTS, overwrite=FLAGS.overwrite)
    writer = outputs.EditWriter(directory, FLAGS.seed)
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
