"""Edit one image: python -m launch.edit --prompt="a red ball" --init_image=img.png --mask=mask.png

Flags follow the reference (omriav/blended-diffusion main.py). Writes OUTPUT_DIR/ranked/
NNN_<distance>.png best first, OUTPUT_DIR/grid.png and OUTPUT_DIR/report.json.
`--config=smoke` runs the whole pipeline on tiny random networks with no weights at all.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
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
    flags.DEFINE_enum("model_output_size", "256", ["256", "512"], "256: unconditional ADM; 512: class-conditional.")
    flags.DEFINE_enum("config", "real", ["real", "smoke"], "smoke: tiny random networks, no weights needed.")
    flags.DEFINE_string("checkpoint_dir", None, "Converted weights; default: the cache of checkpoints_convert.fetch.")
    flags.DEFINE_bool("download", True, "Fetch missing weights (checkpoints_convert.fetch) into the cache.")
    flags.DEFINE_string("output_dir", "output", "Where results are written.")
    flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "bf16: bfloat16 activations and parameters.")
    flags.DEFINE_enum("remat", "none", ["none", "dots", "blocks"],
                      "UNet rematerialisation in the guidance gradient: less memory, more compute.")
    flags.DEFINE_bool("overwrite", False, "Replace results already in --output_dir.")
    flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache directory.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host; automatic on TPU pods).")


EDIT_OPTION_FLAGS = ("skip_timesteps", "timestep_respacing", "ddim", "clip_guidance_lambda", "range_lambda",
                     "aug_num", "local_clip_guided_diffusion", "background_preservation_loss", "lpips_sim_lambda",
                     "l2_sim_lambda", "enforce_background", "batch_size")


def build_editor(config: str, precision: str, model_output_size: int, checkpoint_dir: str | None,
                 download: bool, need_lpips: bool, remat: str = "none"):
    """The editor for --config/--precision: smoke networks, or converted weights (fetched if allowed)."""
    import jax.numpy as jnp

    from bdjax import smoke
    from bdjax.editor import BlendedDiffusion

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    if config == "smoke":
        return smoke.editor(dtype=dtype, with_lpips=need_lpips)
    if checkpoint_dir is None:
        from checkpoints_convert.fetch import ensure_weights, model_dir

        models = ["adm256" if model_output_size == 256 else "adm512", "clip"] + (["lpips"] if need_lpips else [])
        checkpoint_dir = ensure_weights(models=models, download=download)
        unet_dir = model_dir(checkpoint_dir, models[0])
    else:
        unet_dir = checkpoint_dir
    return BlendedDiffusion.from_pretrained(checkpoint_dir, dtype=dtype, param_dtype=dtype, unet_dir=unet_dir,
                                            remat=remat)


def options_from_flags() -> dict:
    from bdjax import smoke

    options = {name: FLAGS[name].value for name in EDIT_OPTION_FLAGS}
    if FLAGS.config == "smoke":  # fewer steps and copies unless the user set them
        options.update({k: v for k, v in smoke.OPTIONS.items() if not FLAGS[k].present})
    return options


def run_report(editor, options: dict, timings: dict) -> dict:
    import flax
    import jax

    import bdjax

    device = jax.devices()[0]
    return {
        "flags": {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])},
        "options": options,
        "versions": {"bdjax": bdjax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "python": platform.python_version()},
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                   "processes": jax.process_count(), "process_index": jax.process_index()},
        "timings_s": timings,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from launch import runtime

    runtime.setup(FLAGS.distributed, FLAGS.compilation_cache_dir)
    import jax

    from bdjax import outputs, smoke

    if FLAGS.prompt is None or FLAGS.init_image is None:
        raise app.UsageError("--prompt and --init_image are required (--prompt='' runs unguided)")
    options = options_from_flags()
    need_lpips = FLAGS.background_preservation_loss and FLAGS.lpips_sim_lambda != 0
    with runtime.user_errors():
        existing = outputs.existing_outputs(FLAGS.output_dir)
        if existing and not FLAGS.overwrite:  # before any slow work
            raise FileExistsError(f"{FLAGS.output_dir} already holds results; choose another --output_dir "
                                  "or pass --overwrite")
        start = time.perf_counter()
        editor = build_editor(FLAGS.config, FLAGS.precision, int(FLAGS.model_output_size), FLAGS.checkpoint_dir,
                              FLAGS.download, need_lpips, FLAGS.remat)
        loaded = time.perf_counter()
        result = editor.edit(FLAGS.init_image, FLAGS.mask, FLAGS.prompt, num_samples=FLAGS.num_samples,
                             seed=FLAGS.seed, invert_mask=FLAGS.invert_mask, **options)
        done = time.perf_counter()
        timings = {"load": loaded - start, "edit": done - loaded,
                   "per_sample": (done - loaded) / FLAGS.num_samples}
        report = run_report(editor, dataclasses.asdict(result.options), timings)
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
    app.run(main)
