"""Text-guided extrapolation (the paper's Fig. 11): grow the image sideways, one strip at a time.

    python -m launch.extrapolate --init_image=img.png --prompt_left=hell --prompt_right=heaven \
        --side=both --strip=64 --repeats=4 --output_dir=out

The image is prepared as for an edit (model size, the reference's resize) and becomes the
canvas. Each round, on each chosen side, the model-size window at that edge (the new strip plus
the canvas next to it) is edited with the strip as the mask and that side's prompt; the
best-ranked result's strip is pasted onto the canvas. Writes OUTPUT_DIR/canvas_<round>.png
(canvas_0 is the start), OUTPUT_DIR/extrapolated.png and OUTPUT_DIR/report.json. All edit
flags (--num_samples per round, --seed, --skip_timesteps, ...) apply to every round.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time

import numpy as np
from absl import app, flags

from bdjax.extrapolate import best_result, edge_window, paste_strip, round_seed
from launch import edit, runtime

FLAGS = flags.FLAGS
SIDES = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
FINAL = "extrapolated.png"


def define_flags():
    edit.define_flags()
    flags.DEFINE_string("prompt_left", None, "Prompt for the strips grown on the left (default: --prompt).")
    flags.DEFINE_string("prompt_right", None, "Prompt for the strips grown on the right (default: --prompt).")
    flags.DEFINE_enum("side", "both", list(SIDES), "Where the canvas grows.")
    flags.DEFINE_integer("strip", 64, "Pixels added per side and round (at model resolution).")
    flags.DEFINE_integer("repeats", 4, "Rounds; the canvas grows by strip x repeats on each chosen side.")


def prompts_from_flags(sides) -> dict:
    prompts = {}
    for side in sides:
        prompt = FLAGS[f"prompt_{side}"].value
        prompts[side] = FLAGS.prompt if prompt is None else prompt
        if prompts[side] is None:
            raise runtime.FlagError(f"--side={FLAGS.side} needs --prompt_{side} (or --prompt for every side)")
    return prompts


def existing_outputs(output_dir: str) -> list[str]:
    from bdjax import outputs

    found = sorted(glob.glob(os.path.join(output_dir, "canvas_*.png")))
    return found + [p for p in (os.path.join(output_dir, FINAL), os.path.join(output_dir, outputs.REPORT))
                    if os.path.exists(p)]


def main(argv):
    if len(argv) > 1:
        raise runtime.FlagError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.init_image is None:
        raise runtime.FlagError("--init_image is required")
    if FLAGS.mask is not None or FLAGS.invert_mask:
        raise runtime.FlagError("--mask/--invert_mask do not apply: each round's mask is the new strip")
    sides = SIDES[FLAGS.side]
    prompts = prompts_from_flags(sides)
    if FLAGS.repeats < 1:
        raise runtime.FlagError(f"--repeats={FLAGS.repeats} must be at least 1")
    runtime.setup()
    import jax

    from bdjax import image_io, outputs, smoke

    lead = jax.process_index() == 0
    options = edit.options_from_flags()
    need_lpips = FLAGS.background_preservation_loss and FLAGS.lpips_sim_lambda != 0
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    with runtime.user_errors():
        old = existing_outputs(FLAGS.output_dir)
        if old and not FLAGS.overwrite:
            raise FileExistsError(f"{FLAGS.output_dir} already holds results ({old[0]}); choose another "
                                  "--output_dir or pass --overwrite")
        start = time.perf_counter()
        editor = runtime.build_editor(need_lpips)
        size = editor.image_size
        if not 0 < FLAGS.strip < size:
            raise ValueError(f"--strip={FLAGS.strip} must be in (0, {size}): each window keeps "
                             f"{size} - strip columns of the canvas as context")
        for path in old if lead else ():
            os.remove(path)
        # The canvas starts as the image prepared exactly as for an edit (model size, Lanczos).
        canvas = np.round((image_io.load_image(FLAGS.init_image, size) + 1) * 127.5).astype(np.uint8)
        if lead:
            outputs.save_png(os.path.join(FLAGS.output_dir, "canvas_0.png"), canvas)
        loaded = time.perf_counter()
        rounds = []
        for r in range(1, FLAGS.repeats + 1):
            for side in sides:
                seed = round_seed(FLAGS.seed, r, side)
                window, mask = edge_window(canvas, side, FLAGS.strip, size)
                result = editor.edit(window, mask, prompts[side], num_samples=FLAGS.num_samples, seed=seed,
                                     progress=lead, **options)
                best, distance = best_result(result)
                canvas = paste_strip(canvas, best, side, FLAGS.strip)
                rounds.append({"round": r, "side": side, "prompt": prompts[side], "seed": seed,
                               "distance": distance, "width": int(canvas.shape[1])})
            if lead:
                outputs.save_png(os.path.join(FLAGS.output_dir, f"canvas_{r}.png"), canvas)
                print(f"round {r}/{FLAGS.repeats}: canvas {canvas.shape[1]}x{canvas.shape[0]}", flush=True)
        done = time.perf_counter()
        if lead:
            outputs.save_png(os.path.join(FLAGS.output_dir, FINAL), canvas)
            report = edit.run_report(dataclasses.asdict(editor.options(**options)),
                                     {"load": loaded - start, "extrapolate": done - loaded})
            report["flags"].update(runtime.flag_values(sys.modules[__name__]))
            report.update(label=label or None, rounds=rounds, size={"height": int(canvas.shape[0]),
                                                                    "width": int(canvas.shape[1])})
            outputs.save_json(os.path.join(FLAGS.output_dir, outputs.REPORT), report)
            print(f"{os.path.join(FLAGS.output_dir, FINAL)}: {canvas.shape[1]}x{canvas.shape[0]} after "
                  f"{FLAGS.repeats} rounds in {done - loaded:.1f} s" + (f"\n{label}" if label else ""))


if __name__ == "__main__":
    define_flags()
    app.run(runtime.program(main))
