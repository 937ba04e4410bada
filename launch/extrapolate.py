"""Text-guided extrapolation (the paper's Fig. 11): grow the image sideways, one strip at a time.

    python -m launch.extrapolate --init_image=img.png --prompt_left=hell --prompt_right=heaven \
        --side=both --strip=64 --repeats=4 --output_dir=out

The image is prepared as for an edit (model size, the reference's resize) and becomes the
canvas. Each round, on each chosen side, the model-size window at that edge (the new strip plus
the canvas next to it) is edited with the strip as the mask and that side's prompt; the
best-ranked result's strip is pasted onto the canvas. Writes OUTPUT_DIR/canvas_<round>.png
(canvas_0 is the start), OUTPUT_DIR/extrapolated.png, OUTPUT_DIR/grid.png (the canvases one
per round, captioned) and OUTPUT_DIR/report.json, every PNG with its provenance. All edit
flags (--num_samples per round, --seed, --skip_timesteps, ...) apply to every round, and the
inputs get launch/edit.py's checks before anything is built, removed or written; --overwrite
removes only the files named above. Non-finite samples never win a round; a round whose samples
all turn non-finite stops the run (exit status 1). The rounds are bdjax/extrapolate.py's `grow`;
this program adds the flags, the checks and the files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

import numpy as np
from absl import app, flags

from bdjax.extrapolate import grow
from launch import edit, runtime

FLAGS = flags.FLAGS
SIDES = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
FINAL = "extrapolated.png"
MAX_WIDTH = 65535  # pixels: the canvas is held in memory, and wider images few programs open


def define_flags():
    edit.define_flags()
    flags.adopt_module_key_flags(edit)  # --help lists them too
    flags.DEFINE_string("prompt_left", None, "Prompt for the strips grown on the left (default: --prompt).")
    flags.DEFINE_string("prompt_right", None, "Prompt for the strips grown on the right (default: --prompt).")
    flags.DEFINE_enum("side", "both", list(SIDES), "Where the canvas grows.")
    flags.DEFINE_integer("strip", None, "Pixels added per side and round (at model resolution); default: a "
                         "quarter of the model size (64 at 256, 16 with --config=smoke).")
    flags.DEFINE_integer("repeats", 4, "Rounds; the canvas grows by strip x repeats on each chosen side.")


def prompts_from_flags(sides) -> dict:
    prompts = {}
    for side in sides:
        prompt = FLAGS[f"prompt_{side}"].value
        prompts[side] = FLAGS.prompt if prompt is None else prompt
        if prompts[side] is None:
            raise runtime.FlagError(f"--side={FLAGS.side} needs --prompt_{side} (or --prompt for every side)")
    return prompts


# The files this program writes (patterns for outputs.own_outputs): --overwrite removes these
# and nothing else.
OUTPUTS = (r"canvas_\d+\.png", re.escape(FINAL), re.escape("grid.png"), re.escape("report.json"))


def strip_width() -> int:
    """--strip, else a quarter of the model size."""
    return edit.model_size() // 4 if FLAGS.strip is None else FLAGS.strip


def check_flags() -> dict:
    """The checks on this program's own flags (before the shared preflight); returns the prompt
    of each side."""
    if FLAGS.init_image is None:
        raise runtime.FlagError("--init_image is required")
    if FLAGS.mask is not None or FLAGS.invert_mask:
        raise runtime.FlagError("--mask/--invert_mask do not apply: each round's mask is the new strip")
    prompts = prompts_from_flags(SIDES[FLAGS.side])
    if FLAGS.repeats < 1:
        raise runtime.FlagError(f"--repeats={FLAGS.repeats} must be at least 1")
    size = edit.model_size()
    if not 0 < strip_width() < size:
        raise runtime.FlagError(f"--strip={strip_width()} must be in (0, {size}): each window keeps {size} - strip "
                                "columns of the canvas as context")
    width = size + strip_width() * FLAGS.repeats * len(prompts)
    if width > MAX_WIDTH:
        raise runtime.FlagError(f"--repeats={FLAGS.repeats} rounds of --strip={strip_width()} would make the canvas "
                                f"{width} pixels wide, more than {MAX_WIDTH}; use fewer rounds or a narrower strip")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise runtime.FlagError(f"unexpected arguments: {argv[1:]}")
    prompts = check_flags()
    runtime.setup()
    import jax

    from bdjax import guidance, outputs, parallel, smoke

    lead = jax.process_index() == 0
    options = runtime.options_from_flags()
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    files = ("canvas_0.png", "canvas_1.png", FINAL, outputs.GRID, outputs.REPORT)
    requests = dict(zip(prompts, edit.preflight(options, list(prompts.values()), FLAGS.output_dir, OUTPUTS,
                                                writes=((), files), mask=False)))
    prepared = requests[next(iter(prompts))]
    start = time.perf_counter()
    editor = runtime.build_editor(guidance.needs_lpips(prepared.options))
    size = editor.image_size
    if size != prepared.size:
        raise ValueError(f"the UNet works at {size}x{size}, not the {prepared.size} of --model_output_size")
    parallel.barrier("extrapolate preflight")  # every process has checked (and probed) the output directory
    if lead:  # everything is checked: only now is the previous run removed
        outputs.clear_for_run(FLAGS.output_dir, OUTPUTS, overwrite=FLAGS.overwrite)
    # The canvas starts as the image prepared exactly as for an edit (model size, Lanczos).
    canvas = prepared.source
    # What every PNG records, with its round's data (see outputs.read_provenance).
    about = edit.provenance(editor, prepared.options, label, prompts=dict(prompts), seed=FLAGS.seed,
                            strip=strip_width())
    if lead:
        outputs.save_png(os.path.join(FLAGS.output_dir, "canvas_0.png"), canvas, {"kind": "canvas", **about,
                                                                                  "round": 0})
    loaded = time.perf_counter()
    runtime.announce_run(editor, [(r.options, r.prompt != "", r.num_samples * FLAGS.repeats)
                                  for r in requests.values()])
    runtime.announce_compiles(editor)
    rounds = []
    last_side = list(prompts)[-1]
    for done_round in grow(editor, requests, strip_width(), FLAGS.repeats, progress=lead):
        r, side, canvas = done_round.round, done_round.side, done_round.canvas
        if not np.isfinite(done_round.distance):
            print(f"error: round {r} ({side}): all {FLAGS.num_samples} samples turned non-finite (NaN or "
                  f"infinite); the canvas so far is canvas_{r - 1}.png", file=sys.stderr)
            sys.exit(1)
        rounds.append({"round": r, "side": side, "prompt": done_round.prompt, "seed": done_round.seed,
                       "sample_id": done_round.sample_id, "distance": done_round.distance,
                       "width": int(canvas.shape[1])})
        if lead and side == last_side:
            outputs.save_png(os.path.join(FLAGS.output_dir, f"canvas_{r}.png"), canvas,
                             {"kind": "canvas", **about, "round": r, "rounds": [e for e in rounds if e["round"] == r]})
            print(f"round {r}/{FLAGS.repeats}: canvas {canvas.shape[1]}x{canvas.shape[0]}", flush=True)
    done = time.perf_counter()
    if lead:
        outputs.save_png(os.path.join(FLAGS.output_dir, FINAL), canvas, {"kind": "extrapolation", **about,
                                                                         "rounds": rounds})
        grid, shown = rounds_grid(prompts, rounds, size, label)
        outputs.save_png(os.path.join(FLAGS.output_dir, outputs.GRID), grid,
                         {"kind": "grid", **about, "shown_rounds": shown, "rounds": rounds})
        report = edit.run_report(dataclasses.asdict(prepared.options),
                                 {"load": loaded - start, "extrapolate": done - loaded})
        report["flags"].update(edit.reported_flags(sys.modules[__name__]))
        report.update(label=label or None, strip=strip_width(), rounds=rounds, size={"height": int(canvas.shape[0]),
                                                                "width": int(canvas.shape[1])})
        outputs.save_json(os.path.join(FLAGS.output_dir, outputs.REPORT), report)
        print(f"{os.path.join(FLAGS.output_dir, FINAL)}: {canvas.shape[1]}x{canvas.shape[0]} after "
              f"{FLAGS.repeats} rounds in {done - loaded:.1f} s" + (f"\n{label}" if label else ""))


GRID_ROWS = 16     # canvases in grid.png at most: evenly spaced rounds, the first and last always
GRID_WIDTH = 4096  # pixels: wider canvases are shown scaled down in grid.png


def rounds_grid(prompts: dict, rounds: list[dict], size: int, label: str) -> tuple[np.ndarray, list[int]]:
    """(grid.png, the rounds it shows): canvas_0 .. canvas_<repeats>, read back from disk, one per
    row and placed so that the original image keeps its columns, each captioned with its round's
    sides and distances."""
    from PIL import Image

    from bdjax import outputs

    strip, repeats = strip_width(), FLAGS.repeats
    scale = min(1.0, GRID_WIDTH / (size + strip * repeats * len(prompts)))
    shown = sorted({int(r) for r in np.linspace(0, repeats, min(GRID_ROWS, repeats + 1)).round()})
    tiles, offsets, captions = [], [], []
    for r in shown:
        canvas = outputs.read_png(os.path.join(FLAGS.output_dir, f"canvas_{r}.png"))
        if scale < 1:
            height, width = canvas.shape[:2]
            canvas = np.asarray(Image.fromarray(canvas).resize((max(1, round(width * scale)),
                                                                max(1, round(height * scale))), Image.LANCZOS))
        tiles.append(canvas)
        offsets.append(round(strip * (repeats - r) * scale) if "left" in prompts else 0)
        sides = ", ".join(f"{e['side']} d={e['distance']:.4f}" for e in rounds if e["round"] == r)
        captions.append(f"round {r}: {sides}" if r else "round 0: the start")
    heading = ", ".join(f"{side} {prompt!r}" for side, prompt in prompts.items())
    heading = f"{heading}: the canvas after each round (strip {strip})"
    return outputs.sheet(tiles, captions, f"{label}\n{heading}" if label else heading, columns=1, offsets=offsets), shown


if __name__ == "__main__":
    define_flags()
    app.run(runtime.program(main), flags_parser=runtime.parse_flags)
