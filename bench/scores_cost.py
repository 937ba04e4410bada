"""What the quality scores (bdjax/scores.py) add to an edit: time per batch and FLOPs.

    python -m bench.scores_cost --config=smoke --batch_size=2 --output=scores_smoke.json
    python -m bench.scores_cost --config=real --batch_size=4 --notime --output=scores_real.json

Time (--time, on the machine JAX runs on): one batch is sampled with the editor's own compiled
programs (begin, every step of advance, end), then, from the same final state, the end program
(the result, its ranking distance and every score) is timed against a program computing only
the result and its ranking distance (what end computed before the scores): the difference is what
the scores add per batch. Medians over --iters calls, each after a warm-up.

FLOPs: XLA's cost analysis of the scores alone (`scores.result_scores`: CLIP of the whole result,
LPIPS of the background, PSNR, the seam) compiled for this machine's backend from shapes, next to
the analytic FLOPs of a whole edit of the real networks (bdjax/cost.py; `--config=real` only).
Networks are random (cost does not depend on their values); nothing is downloaded.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app, flags

from launch import cli, runtime

FLAGS = flags.FLAGS


def define_flags() -> None:
    runtime.define_config_flag()
    flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "Activations and parameters.")
    flags.DEFINE_integer("batch_size", 2, "Samples per batch.")
    flags.DEFINE_integer("iters", 5, "Timed calls of each program (the median is reported).")
    flags.DEFINE_bool("time", True, "Time a batch (--notime: FLOPs only, e.g. the real networks on a CPU).")
    flags.DEFINE_string("output", None, "Also write the report to this JSON file.")


def networks(config: str, dtype):
    """(Models with LPIPS, params as shapes) of the config."""
    import jax
    import jax.numpy as jnp

    from bdjax.blended import Models
    from bdjax.models import clip as clip_lib
    from bdjax.models import lpips as lpips_lib
    from bdjax.models import unet as unet_lib
    from bench.compile_report import model_fields

    unet_fields, clip_fields, _ = model_fields(config)
    models = Models(unet=unet_lib.UNetModel(**unet_fields, dtype=dtype), clip=clip_lib.CLIP(**clip_fields, dtype=dtype),
                    lpips=lpips_lib.LPIPS(dtype=dtype))
    shapes = {"clip": clip_lib.param_shapes(models.clip), "lpips": lpips_lib.param_shapes(models.lpips)}
    def cast(s):
        return jax.ShapeDtypeStruct(s.shape, dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype)
    return models, jax.tree.map(cast, shapes)


def scores_flops(config: str, batch: int, dtype) -> float | None:
    """XLA's FLOP count of `scores.result_scores` for a batch, compiled from shapes."""
    import jax
    import jax.numpy as jnp

    from bdjax import scores

    models, params = networks(config, dtype)
    size = models.unet.image_size
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
    text = jax.ShapeDtypeStruct((batch, models.clip.embed_dim), jnp.float32)
    distance = jax.ShapeDtypeStruct((batch,), jnp.float32)
    compiled = jax.jit(lambda p, *a: scores.result_scores(models, p, *a)).lower(
        params, image, image, mask, text, distance).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def time_batch(batch: int, iters: int) -> dict:
    """Seconds of one batch on the smoke editor: sampling whole, end with scores, end without."""
    import jax
    import numpy as np

    from bdjax import blended, parallel, scores, smoke

    editor = smoke.editor(with_lpips=True)
    options = editor.options(batch_size=batch)
    run = editor.sampler(options, True)
    size, width = editor.image_size, editor.models.clip.embed_dim
    rng = np.random.default_rng(0)
    init = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    args = tuple(parallel.put_batch(a, editor.mesh, batch) for a in (
        init, mask, rng.standard_normal((batch, width)).astype(np.float32), np.arange(batch, dtype=np.int32),
        np.zeros(batch, np.int32)))
    run.compile(editor.params, *args)

    def whole():
        jax.block_until_ready(run(editor.params, *args))

    whole()
    start = time.perf_counter()
    whole()
    batch_s = time.perf_counter() - start
    state = run.begin(editor.params, *args)
    for chunk in run.chunks:  # the compiled chunk length
        state = run.advance(editor.params, state, chunk)

    def ranking_only(params, state):
        images = blended.result_images(options, state["pred_xstart"], state["init"], state["mask"])
        return images, scores.ranking_distance(editor.models, params, images, state["mask"], state["text_embed"])

    plain = parallel.jit_over_samples(ranking_only, editor.mesh, num_args=2)
    programs = {"end_with_scores": lambda: run.end(editor.params, state),
                "end_ranking_only": lambda: plain(editor.params, state)}
    times = {}
    for name, fn in programs.items():
        jax.block_until_ready(fn())
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    added = times["end_with_scores"] - times["end_ranking_only"]
    return {"batch_s": batch_s, "num_steps": run.num_steps, **{f"{k}_s": v for k, v in times.items()},
            "scores_added_s": added, "scores_share_of_batch": added / batch_s}


def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.batch_size < 1 or FLAGS.iters < 1:
        raise cli.FlagError("--batch_size and --iters must be at least 1")
    if FLAGS.time and FLAGS.config != "smoke":
        raise cli.FlagError("--time runs the smoke editor: use --config=smoke, or --notime for FLOPs only")
    import jax
    import jax.numpy as jnp

    from bdjax import cost
    from bench.benchmark import machine_description

    dtype = jnp.bfloat16 if FLAGS.precision == "bf16" else jnp.float32
    report = {"command": " ".join(["python -m bench.scores_cost", *sys.argv[1:]]), "machine": machine_description(),
              "config": FLAGS.config, "precision": FLAGS.precision, "batch_size": FLAGS.batch_size}
    flops = scores_flops(FLAGS.config, FLAGS.batch_size, dtype)
    report["scores_flops_per_sample"] = None if flops is None else flops / FLAGS.batch_size
    if FLAGS.config == "real" and flops is not None:
        edit = 75 * cost.guided_step_flops(8)  # the reference's 75 steps, 8 crops
        report["edit_flops_per_sample_analytic"] = edit
        report["scores_share_of_edit_flops"] = report["scores_flops_per_sample"] / edit
    if FLAGS.time:
        report["time"] = time_batch(FLAGS.batch_size, FLAGS.iters)
    report["backend"] = jax.devices()[0].platform
    print(json.dumps(report, indent=2))
    if FLAGS.output:
        from bdjax import outputs

        outputs.save_json(FLAGS.output, report)


if __name__ == "__main__":
    define_flags()
    app.run(cli.program(main), flags_parser=cli.parse_flags)
