"""launch/extrapolate.py: the canvas grows by a strip per side and round, the old canvas is kept
pixel for pixel, intermediate canvases are saved. Smoke preset, the sampler configuration of
tests/test_batch_edit.py (skip_timesteps 20, batch_size 2)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import bdjax
from bdjax import extrapolate as lib
from bdjax import outputs, smoke
from bdjax.options import EditOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".jax_cache")


def test_edge_window_and_paste_keep_the_canvas():
    canvas = np.arange(4 * 10 * 3, dtype=np.uint8).reshape(4, 10, 3)
    window, mask = lib.edge_window(canvas, "right", 3, 8)
    assert np.array_equal(window[:, :5], canvas[:, -5:]) and (mask[:, 5:] == 255).all() and not mask[:, :5].any()
    assert np.array_equal(window[:, 5:], np.repeat(canvas[:, -1:], 3, axis=1))  # the edge column repeated
    grown = lib.paste_strip(canvas, window + 1, "right", 3)
    assert np.array_equal(grown[:, :10], canvas) and np.array_equal(grown[:, 10:], window[:, 5:] + 1)
    window, mask = lib.edge_window(canvas, "left", 3, 8)
    assert np.array_equal(window[:, 3:], canvas[:, :5]) and (mask[:, :3] == 255).all() and not mask[:, 3:].any()
    grown = lib.paste_strip(canvas, window, "left", 3)
    assert grown.shape == (4, 13, 3) and np.array_equal(grown[:, 3:], canvas)
    assert len({lib.round_seed(404, r, s) for r in (1, 2) for s in ("left", "right")}) == 4


def test_two_rounds_on_both_sides(tmp_path):
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "out"
    strip = 8
    proc = subprocess.run(
        [sys.executable, "-m", "launch.extrapolate", "--config=smoke", f"--init_image={tmp_path / 'img.png'}",
         "--prompt_left=hell", "--prompt_right=heaven", "--side=both", f"--strip={strip}", "--repeats=2",
         "--num_samples=2", "--batch_size=2", "--skip_timesteps=20", "--seed=5", f"--output_dir={out}",
         f"--compilation_cache_dir={CACHE}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE TEST" in proc.stdout
    canvases = [np.asarray(Image.open(out / f"canvas_{r}.png")) for r in range(3)]
    final = np.asarray(Image.open(out / "extrapolated.png"))
    assert [c.shape for c in canvases] == [(64, 64, 3), (64, 80, 3), (64, 96, 3)]  # height: the model size
    assert np.array_equal(final, canvases[2])
    assert final.shape[1] == 64 + 2 * 2 * strip
    assert np.array_equal(final[:, 2 * strip:2 * strip + 64], canvases[0])  # the original, untouched
    assert np.array_equal(canvases[2][:, strip:-strip], canvases[1])
    # The new strips are the diffusion's, not the edge-column fill they started from.
    assert not np.array_equal(final[:, :strip], np.repeat(canvases[1][:, :1], strip, axis=1))
    assert not np.array_equal(final[:, -strip:], np.repeat(canvases[1][:, -1:], strip, axis=1))

    report = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["side"], r["prompt"], r["width"]) for r in report["rounds"]] == [
        (1, "left", "hell", 72), (1, "right", "heaven", 80), (2, "left", "hell", 88), (2, "right", "heaven", 96)]
    assert [r["seed"] for r in report["rounds"]] == [lib.round_seed(5, r, s)
                                                     for r in (1, 2) for s in ("left", "right")]
    assert report["size"] == {"height": 64, "width": 96} and report["flags"]["strip"] == strip
    assert report["options"]["skip_timesteps"] == 20 and report["label"].startswith("SMOKE TEST")
    assert sorted(os.listdir(out)) == ["canvas_0.png", "canvas_1.png", "canvas_2.png", "extrapolated.png",
                                       "grid.png", "report.json"]  # no temporary files left
    assert not set(report["flags"]) & set(EditOptions.names())  # the options once, as they ran
    assert report["options"]["timestep_respacing"] == "25"

    # Every PNG carries its provenance; grid.png shows canvas_0 .. canvas_2, the original aligned.
    common = {"prompts": {"left": "hell", "right": "heaven"}, "seed": 5, "strip": strip,
              "options": report["options"], "label": smoke.LABEL, "bdjax_version": bdjax.__version__}
    for r in range(3):
        about = outputs.read_provenance(str(out / f"canvas_{r}.png"))
        assert {k: about[k] for k in common} == common and (about["kind"], about["round"]) == ("canvas", r)
        assert about.get("rounds", []) == [e for e in report["rounds"] if e["round"] == r]
    about = outputs.read_provenance(str(out / "extrapolated.png"))
    assert {k: about[k] for k in common} == common and about["rounds"] == report["rounds"]
    assert all(0 <= e["sample_id"] < 2 for e in about["rounds"])
    about = outputs.read_provenance(str(out / "grid.png"))
    assert {k: about[k] for k in common} == common and about["kind"] == "grid" and about["shown_rounds"] == [0, 1, 2]
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] == 96 and grid.shape[0] > 3 * 64  # one canvas per row, with captions
    rows = [r for r in range(grid.shape[0] - 63) if np.array_equal(grid[r:r + 64, 16:80], canvases[0])]
    assert len(rows) == 3  # every round's canvas shows the original in the same columns

    # A typo in the image with --overwrite: refused before the previous results are touched.
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.extrapolate", "--config=smoke", f"--init_image={tmp_path / 'im.png'}",
         "--prompt=sky", f"--strip={strip}", f"--output_dir={out}", "--overwrite"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "no such file" in err, err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
