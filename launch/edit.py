"""Edit one image: python -m launch.edit --prompt="a red ball" --init_image=img.png --mask=mask.png

Flags follow the reference (omriav/blended-diffusion main.py). Writes OUTPUT_DIR/ranked/
NNN_<distance>.png best first, OUTPUT_DIR/grid.png and OUTPUT_DIR/report.json.
`--config=smoke` runs the whole pipeline on tiny random networks with no weights at all.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings

from absl import app, flags

from launch import runtime

FLAGS = flags.FLAGS


def define_flags():
    runtime.define_flags()
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


def preflight(options: dict) -> None:
    """Every check that needs no network: bad inputs fail in a second, before weights load, and
    leave nothing in the output directory."""
    from bdjax import image_io, outputs, smoke, tokenizer
    from bdjax.blended import EditOptions, check_request

    if FLAGS.prompt is None or FLAGS.init_image is None:
        raise runtime.FlagError("--prompt and --init_image are required (--prompt='' runs unguided)")
    check_request(FLAGS.num_samples, FLAGS.seed, flag_prefix="--")
    EditOptions(**options).validate()
    tokenizer.tokenize(FLAGS.prompt)
    size = smoke.IMAGE_SIZE if FLAGS.config == "smoke" else int(FLAGS.model_output_size)
    image = image_io.to_pil(FLAGS.init_image, "image")
    image_io.load_image(image, size)
    with warnings.catch_warnings():  # the edit itself warns about the mask, once
        warnings.simplefilter("ignore")
        image_io.load_mask(FLAGS.mask, size, image_size=image.size, invert_mask=FLAGS.invert_mask)
    if outputs.existing_outputs(FLAGS.output_dir) and not FLAGS.overwrite:
        raise FileExistsError(f"{FLAGS.output_dir} already holds results; choose another --output_dir "
                              "or pass --overwrite")
    outputs.check_writable(FLAGS.output_dir)


def main(argv):
    if len(argv) > 1:
        raise runtime.FlagError(f"unexpected arguments: {argv[1:]}")
    runtime.setup()
    import jax

    from bdjax import outputs, smoke

    options = options_from_flags()
    need_lpips = FLAGS.background_preservation_loss and FLAGS.lpips_sim_lambda != 0
    with runtime.user_errors():
        preflight(options)
        start = time.perf_counter()
        editor = runtime.build_editor(need_lpips)
        loaded = time.perf_counter()
        result = editor.edit(FLAGS.init_image, FLAGS.mask, FLAGS.prompt, num_samples=FLAGS.num_samples,
                             seed=FLAGS.seed, invert_mask=FLAGS.invert_mask, **options)
        done = time.perf_counter()
        timings = {"load": loaded - start, "edit": done - loaded,
                   "per_sample": (done - loaded) / FLAGS.num_samples}
        report = run_report(dataclasses.asdict(result.options), timings)
        label = smoke.LABEL if FLAGS.config == "smoke" else ""
        output_dir = FLAGS.output_dir
        if jax.process_count() > 1:  # each host writes the samples its devices produced
            output_dir = f"{output_dir}/process_{jax.process_index()}"
        outputs.write_edit(result, output_dir, report, overwrite=FLAGS.overwrite, label=label)
    if jax.process_index() == 0:
        best = ", ".join(f"{d:.4f}" for d in result.distances[:4])
        print(f"{len(result.images)} results in {output_dir}/ranked (best distances {best}); "
              f"edit took {timings['edit']:.1f} s" + (f"\n{label}" if label else ""))


if __name__ == "__main__":
    define_flags()
    app.run(runtime.program(main))
