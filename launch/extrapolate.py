"""Text-guided extrapolation (the paper's Fig. 11): grow the image sideways, one strip at a time.

    python -m launch.extrapolate --init_image=img.png --prompt_left=hell --prompt_right=heaven \
        --side=both --repeats=4 --output_dir=out

With --fit=window (the default) the canvas is the photo at its own size (decoded as an edit's
window mode decodes it: upright by its EXIF orientation, RGB; an alpha channel is dropped, with a
note). Each round, on each chosen side, the square of the canvas' height at that edge (--strip new
photo columns, a quarter of the height by default, plus the canvas next to them) is resized to the
model size and edited with the strip as the mask and that side's prompt; the best-ranked result's
strip is resized back to the photo's scale and pasted on, so the photo keeps its height and every
one of its pixels. A canvas narrower than the window's context is padded there by reflection.
With --fit=stretch (the reference's way) the canvas is the image prepared as for a stretched edit
(the model size) and the windows are the model size itself, --strip in model pixels.
--context and --feather do not apply (refused). Writes OUTPUT_DIR/canvas_<round>.png
(canvas_0 is the start), OUTPUT_DIR/extrapolated.png, OUTPUT_DIR/grid.png (the canvases one
per round, captioned) and OUTPUT_DIR/report.json, every PNG with its provenance. All edit
flags (--num_samples per round, --seed, --skip_timesteps, ...) apply to every round, and the
inputs get launch.edit's checks (cli.preflight) before anything is built, removed or written; --overwrite
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
import warnings

import numpy as np
from absl import app, flags

from bdjax.extrapolate import grow, model_strip
from bdjax.request import MAX_UPSCALE  # photo pixels per model pixel above which upscaled strips look soft
from launch import cli, runtime

FLAGS = flags.FLAGS
SIDES = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
FINAL = "extrapolated.png"
MAX_WIDTH = 65535  # pixels: the canvas is held in memory, and wider images few programs open


def define_flags():
    runtime.define_flags()
    runtime.define_option_flags()  # skip_timesteps, timestep_respacing, ... (bdjax/options.py)
    cli.define_edit_flags()  # --prompt, --init_image, --mask, --seed, --output_dir, ...
    # --fit picks the canvas' scale; --context and --feather are refused (check_flags): the window
    # is the square at the canvas' edge and only the strip is pasted, hard. (Defining them keeps
    # this program's flags a superset of launch.edit's, which tests/conftest.py relies on.)
    cli.define_framing_flags()
    flags.adopt_module_key_flags(runtime)  # --help lists them too
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("prompt_left", None, "Prompt for the strips grown on the left (default: --prompt).")
    flags.DEFINE_string("prompt_right", None, "Prompt for the strips grown on the right (default: --prompt).")
    flags.DEFINE_enum("side", "both", list(SIDES), "Where the canvas grows.")
    flags.DEFINE_integer("strip", None, "Columns added per side and round. --fit=window: photo pixels, default a "
                         "quarter of the photo's height (each window is a square of the photo's height, so that is "
                         "the quarter-window share of stretch mode); --fit=stretch: model pixels, default a quarter "
                         "of the model size (64 at 256, 16 with --config=smoke).")
    flags.DEFINE_integer("repeats", 4, "Rounds; the canvas grows by strip x repeats on each chosen side.")


def prompts_from_flags(sides) -> dict:
    prompts = {}
    for side in sides:
        prompt = FLAGS[f"prompt_{side}"].value
        prompts[side] = FLAGS.prompt if prompt is None else prompt
        if prompts[side] is None:
            raise cli.FlagError(f"--side={FLAGS.side} needs --prompt_{side} (or --prompt for every side)")
    return prompts


# The files this program writes (patterns for outputs.own_outputs): --overwrite removes these
# and nothing else.
OUTPUTS = (r"canvas_\d+\.png", re.escape(FINAL), re.escape("grid.png"), re.escape("report.json"))


def strip_width(height: int) -> int:
    """--strip, else a quarter of the canvas' height (at least 1): the photo's with --fit=window,
    the model size with --fit=stretch."""
    return max(1, height // 4) if FLAGS.strip is None else FLAGS.strip


def check_canvas(height: int, width: int, sides: int) -> None:
    """--strip and --repeats against the starting canvas (height x width pixels)."""
    strip = strip_width(height)
    if not 0 < strip < height:
        scale = " photo pixels" if FLAGS.fit == "window" else ""
        raise cli.FlagError(f"--strip={strip} must be in (0, {height}){scale}: each window keeps {height} - strip "
                            "columns of the canvas as context")
    grown = width + strip * FLAGS.repeats * sides
    if grown > MAX_WIDTH:
        raise cli.FlagError(f"--repeats={FLAGS.repeats} rounds of --strip={strip} would make the canvas "
                            f"{grown} pixels wide, more than {MAX_WIDTH}; use fewer rounds or a narrower strip")


def check_flags() -> dict:
    """The checks on this program's own flags (before the shared preflight); returns the prompt
    of each side."""
    if FLAGS.init_image is None:
        raise cli.FlagError("--init_image is required")
    if FLAGS.mask is not None or FLAGS.invert_mask:
        raise cli.FlagError("--mask/--invert_mask do not apply: each round's mask is the new strip")
    if FLAGS["context"].present or FLAGS["feather"].present:
        raise cli.FlagError("--context/--feather do not apply: each round edits the square at the canvas' edge and "
                            "pastes only the new strip")
    from bdjax.options import RANKING

    ranking = [name for name in RANKING + ("lpips_scores",) if FLAGS[name].present]
    if ranking:
        raise cli.FlagError(f"--{ranking[0]} does not apply: each round keeps the result of lowest CLIP distance "
                            "(clip_masked), as the reference extrapolates")
    prompts = prompts_from_flags(SIDES[FLAGS.side])
    if FLAGS.repeats < 1:
        raise cli.FlagError(f"--repeats={FLAGS.repeats} must be at least 1")
    if FLAGS.fit == "stretch":  # the canvas is the model size: checked now, as the photo's size is later
        size = cli.model_size()
        check_canvas(size, size, len(prompts))
    elif FLAGS.strip is not None and FLAGS.strip < 1:
        raise cli.FlagError(f"--strip={FLAGS.strip} must be at least 1 (photo pixels)")
    return prompts


def photo_canvas() -> tuple[np.ndarray, str]:
    """(--init_image at its own size as window mode decodes it (bdjax/window.py `decode`), RGB
    [H, W, 3] uint8; what the user should know of the decoding). The preflight decoded the same
    file and showed its warnings already."""
    from bdjax import window

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        photo = window.decode(FLAGS.init_image)
    notes = [photo.note] if photo.note else []
    if photo.alpha is not None:
        notes.append("its alpha channel is dropped (the canvas is RGB)")
    return photo.rgb, "; ".join(notes)


def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    prompts = check_flags()
    runtime.setup()
    import jax

    from bdjax import guidance, outputs, parallel, smoke

    lead = jax.process_index() == 0
    options = runtime.options_from_flags()
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    files = ("canvas_0.png", "canvas_1.png", FINAL, outputs.GRID, outputs.REPORT)
    # The checks of an edit, on the image stretched to the model size: with --fit=stretch that
    # image is the canvas; with --fit=window the photo is decoded again, at its own size.
    requests = dict(zip(prompts, cli.preflight(options, list(prompts.values()), FLAGS.output_dir, OUTPUTS,
                                                writes=((), files), mask=False, framing={"fit": "stretch"})))
    prepared = requests[next(iter(prompts))]
    model = prepared.size
    if FLAGS.fit == "window":
        canvas, note = photo_canvas()
        check_canvas(*canvas.shape[:2], len(prompts))
    else:  # the image prepared exactly as for a stretched edit (model size, Lanczos)
        canvas, note = prepared.source, ""
    height, width = canvas.shape[:2]
    strip = strip_width(height)
    # How the canvas maps onto the model, for the PNGs and the report ({} with --fit=stretch,
    # whose files read as before).
    framing = {} if FLAGS.fit == "stretch" else {
        "fit": "window", "photo_size": {"height": int(height), "width": int(width)},
        "model_strip": model_strip(strip, height, model), "scale": round(height / model, 4), "note": note or None}
    if framing and height / model > MAX_UPSCALE:
        warnings.warn(f"the photo is {height} px tall: each round is edited at {model} px and its strip upscaled "
                      f"{height / model:.1f}x (soft); use a smaller photo, --model_output_size=512 or --fit=stretch")
    start = time.perf_counter()
    editor = runtime.build_editor(guidance.needs_lpips(prepared.options))
    size = editor.image_size
    if size != prepared.size:
        raise ValueError(f"the UNet works at {size}x{size}, not the {prepared.size} of --model_output_size")
    parallel.barrier("extrapolate preflight")  # every process has checked (and probed) the output directory
    if lead:  # everything is checked: only now is the previous run removed
        outputs.clear_for_run(FLAGS.output_dir, OUTPUTS, overwrite=FLAGS.overwrite)
    # What every PNG records, with its round's data (see outputs.read_provenance).
    about = cli.provenance(editor, prepared.options, label, prompts=dict(prompts), seed=FLAGS.seed,
                           strip=strip, **framing)
    if lead:
        print(framing_line(height, width, strip, model, note), file=sys.stderr, flush=True)
        outputs.save_png(os.path.join(FLAGS.output_dir, "canvas_0.png"), canvas, {"kind": "canvas", **about,
                                                                                  "round": 0})
    loaded = time.perf_counter()
    runtime.announce_run(editor, [(r.options, r.prompt != "", r.num_samples * FLAGS.repeats)
                                  for r in requests.values()])
    runtime.announce_compiles(editor)
    rounds = []
    last_side = list(prompts)[-1]
    for done_round in grow(editor, requests, strip, FLAGS.repeats, progress=lead, canvas=canvas):
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
        grid, shown = rounds_grid(prompts, rounds, width, strip, label)
        outputs.save_png(os.path.join(FLAGS.output_dir, outputs.GRID), grid,
                         {"kind": "grid", **about, "shown_rounds": shown, "rounds": rounds})
        report = cli.run_report(dataclasses.asdict(prepared.options),
                                {"load": loaded - start, "extrapolate": done - loaded}, sys.modules[__name__])
        report.update(label=label or None, strip=strip, rounds=rounds, size={"height": int(canvas.shape[0]),
                                                                             "width": int(canvas.shape[1])},
                      **framing,
                      **editor.batch_choice(prepared.options, prepared.prompt != "", prepared.num_samples).report())
        outputs.save_json(os.path.join(FLAGS.output_dir, outputs.REPORT), report)
        print(f"{os.path.join(FLAGS.output_dir, FINAL)}: {canvas.shape[1]}x{canvas.shape[0]} after "
              f"{FLAGS.repeats} rounds in {done - loaded:.1f} s" + (f"\n{label}" if label else ""))


GRID_ROWS = 16     # canvases in grid.png at most: evenly spaced rounds, the first and last always
GRID_WIDTH = 4096  # pixels: wider canvases are shown scaled down in grid.png


def framing_line(height: int, width: int, strip: int, model: int, note: str) -> str:
    """One line saying how the canvas maps onto the model."""
    if FLAGS.fit == "stretch":
        return f"the whole image stretched to {model}x{model} (fit=stretch): strip {strip} px"
    scale = height / model
    how = (f"upscaled {scale:.1f}x" if scale > 1 else "downscaled {:.1f}x".format(1 / scale) if scale < 1
           else "at its own scale")
    return (f"growing the {width}x{height} photo at its own size: each round edits a {height}x{height} window at "
            f"{model} px, the strip of {strip} px ({model_strip(strip, height, model)} model px) {how} back"
            + (f" (image: {note})" if note else ""))


def rounds_grid(prompts: dict, rounds: list[dict], start_width: int, strip: int,
                label: str) -> tuple[np.ndarray, list[int]]:
    """(grid.png, the rounds it shows): canvas_0 (`start_width` wide) .. canvas_<repeats>, read
    back from disk, one per row and placed so that the original image keeps its columns, each
    captioned with its round's sides and distances."""
    from PIL import Image

    from bdjax import outputs

    repeats = FLAGS.repeats
    scale = min(1.0, GRID_WIDTH / (start_width + strip * repeats * len(prompts)))
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
    app.run(cli.program(main), flags_parser=cli.parse_flags)
