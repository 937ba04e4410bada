"""launch/extrapolate.py: the canvas grows by a strip per side and round, the old canvas is kept
pixel for pixel, intermediate canvases are saved. First the window and paste helpers on their own
(full resolution and at the model size) and `grow` with a stand-in edit. Then smoke-preset runs,
the sampler configuration of tests/test_batch_edit.py (skip_timesteps 20, batch_size 2): with
--fit=stretch (the canvas at the model size, as the reference) and the default --fit=window (the
photo at its own size). Then, on a stand-in sampler: every check before the output is touched,
rounds of non-finite samples, the default strip, the photo decoded as window mode decodes it; and
the preflight's one-line refusals before any network is built."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bdjax
from bdjax import extrapolate as lib
from bdjax import outputs, smoke
from bdjax.options import EditOptions
from launch_helpers import SIZE, FakeRun, run_module, run_program, snapshot, strict_json

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


def lanczos(image, width, height):
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def fake_edit(window, mask, value=7):
    """What an edit does: the strip (mask) repainted, the rest of the window left as it was."""
    edit = window.copy()
    edit[mask > 0] = value
    return edit


@pytest.mark.parametrize("side", ["right", "left"])
def test_full_edge_window_and_paste_at_the_photo_scale(side):
    """A 200x120 canvas at model size 64: the 120x120 square at the edge (90 canvas columns and 30
    of edge fill) resized to 64 with the strip's 16 model columns masked; only the 30 new columns
    come back (the edit resized to 120x120, cut), the canvas byte for byte."""
    canvas = np.random.RandomState(3).randint(0, 256, (120, 200, 3), dtype=np.uint8)
    window, mask = lib.full_edge_window(canvas, side, 30, 64)
    assert window.shape == (64, 64, 3) and window.dtype == np.uint8 and mask.shape == (64, 64)
    assert lib.model_strip(30, 120, 64) == 16
    strip_cols = slice(48, 64) if side == "right" else slice(0, 16)
    assert (mask[:, strip_cols] == 255).all() and np.count_nonzero(mask) == 64 * 16
    square = (np.concatenate([canvas[:, -90:], np.repeat(canvas[:, -1:], 30, axis=1)], axis=1) if side == "right"
              else np.concatenate([np.repeat(canvas[:, :1], 30, axis=1), canvas[:, :90]], axis=1))
    assert np.array_equal(window, lanczos(square, 64, 64))

    edit = fake_edit(window, mask)
    grown = lib.full_paste_strip(canvas, edit, side, 30)
    assert grown.shape == (120, 230, 3) and grown.dtype == np.uint8
    old, new = (slice(0, 200), slice(200, 230)) if side == "right" else (slice(30, 230), slice(0, 30))
    assert np.array_equal(grown[:, old], canvas)  # only the strip changed
    back = lanczos(edit, 120, 120)
    assert np.array_equal(grown[:, new], back[:, 90:] if side == "right" else back[:, :30])
    assert not np.array_equal(grown[:, new], square[:, 90:] if side == "right" else square[:, :30])


def test_full_window_at_the_model_size_is_the_stretch_window():
    """A canvas as tall as the model: nothing resampled, exactly edge_window and paste_strip."""
    canvas = np.random.RandomState(4).randint(0, 256, (64, 80, 3), dtype=np.uint8)
    for side in ("left", "right"):
        window, mask = lib.full_edge_window(canvas, side, 16, 64)
        old_window, old_mask = lib.edge_window(canvas, side, 16, 64)
        assert np.array_equal(window, old_window) and np.array_equal(mask, old_mask)
        edit = fake_edit(window, mask)
        assert np.array_equal(lib.full_paste_strip(canvas, edit, side, 16), lib.paste_strip(canvas, edit, side, 16))


def test_full_window_pads_a_narrow_canvas_on_its_far_side():
    """A canvas narrower than the window's context (20 columns where 64 - 16 = 48 are kept): the
    far side is filled by reflection, never pasted."""
    canvas = np.random.RandomState(5).randint(0, 256, (64, 20, 3), dtype=np.uint8)
    window, mask = lib.full_edge_window(canvas, "right", 16, 64)  # at the model size: no resampling
    padded = np.pad(canvas, ((0, 0), (28, 0), (0, 0)), mode="reflect")
    assert np.array_equal(window[:, :48], padded) and np.array_equal(window[:, 28:48], canvas)
    assert np.array_equal(window[:, 48:], np.repeat(canvas[:, -1:], 16, axis=1)) and (mask[:, 48:] == 255).all()
    grown = lib.full_paste_strip(canvas, fake_edit(window, mask), "right", 16)
    assert grown.shape == (64, 36, 3) and np.array_equal(grown[:, :20], canvas) and (grown[:, 20:] == 7).all()
    window, mask = lib.full_edge_window(canvas, "left", 16, 64)
    assert np.array_equal(window[:, 16:], np.pad(canvas, ((0, 0), (0, 28), (0, 0)), mode="reflect"))
    assert np.array_equal(window[:, 16:36], canvas) and np.array_equal(window[:, 36:55], canvas[:, -2::-1])
    grown = lib.full_paste_strip(canvas, fake_edit(window, mask), "left", 16)
    assert np.array_equal(grown[:, 16:], canvas) and (grown[:, :16] == 7).all()
    # A one-column canvas, taller than the model: padded with its edge, then resized.
    line = canvas[:40, :1]
    window, mask = lib.full_edge_window(line, "left", 10, 64)
    assert window.shape == (64, 64, 3) and np.count_nonzero(mask) == 64 * lib.model_strip(10, 40, 64)
    assert np.array_equal(window, lanczos(np.repeat(line, 40, axis=1), 64, 64))


def test_full_window_of_a_photo_shorter_than_the_model_upscales_it():
    """A 32-pixel-tall canvas at model size 64: the window is upscaled 2x (strip 8 -> 16 model
    columns) and the pasted strip downscaled back to 8 columns of height 32."""
    canvas = np.random.RandomState(6).randint(0, 256, (32, 50, 3), dtype=np.uint8)
    window, mask = lib.full_edge_window(canvas, "right", 8, 64)
    assert window.shape == (64, 64, 3) and (mask[:, 48:] == 255).all() and not mask[:, :48].any()
    square = np.concatenate([canvas[:, -24:], np.repeat(canvas[:, -1:], 8, axis=1)], axis=1)
    assert np.array_equal(window, lanczos(square, 64, 64))
    edit = fake_edit(window, mask, value=200)
    grown = lib.full_paste_strip(canvas, edit, "right", 8)
    assert grown.shape == (32, 58, 3) and np.array_equal(grown[:, :50], canvas)
    assert np.array_equal(grown[:, 50:], lanczos(edit, 32, 32)[:, 24:])
    assert [lib.model_strip(s, h, 64) for s, h in [(1, 1000, ), (999, 1000), (8, 32), (30, 120), (5, 20)]] == [
        1, 63, 16, 16, 16]
    for strip, height in [(0, 32), (32, 32), (-1, 32)]:
        with pytest.raises(ValueError, match="must be an integer in"):
            lib.full_edge_window(canvas[:height], "right", strip, 64)


def test_grow_at_full_resolution_keeps_the_photo():
    """`grow` on a window-mode request: the canvas is the photo at its own size (40x24, model size
    16) and every round adds the strip at the photo's scale; a stand-in edit paints the window
    flat (so the strip, resized back, is flat too)."""
    from bdjax.editor import EditBatch
    from bdjax.request import prepare

    photo = np.random.RandomState(7).randint(0, 256, (24, 40, 3), dtype=np.uint8)
    first = prepare(photo, None, "hell", num_samples=1, seed=3, options=EditOptions(**smoke.OPTIONS), image_size=16)
    sides = {"left": first, "right": first.with_prompt("heaven")}
    assert first.inputs.fit == "window" and np.array_equal(lib.start_canvas(first), photo)
    seen = []

    class Stream:
        def __init__(self, request):
            self.request, self.source = request, request.source

        def __iter__(self):
            yield EditBatch(sample_ids=np.array([0]), images=np.full_like(self.source, 9)[None],
                            distances=np.array([0.5]), finite=np.array([True]))

    class Editor:
        def edit_batches(self, request, progress=True):
            seen.append(request)
            return Stream(request)

    rounds = list(lib.grow(Editor(), sides, strip=6, repeats=2))
    assert [(r.round, r.side, r.canvas.shape) for r in rounds] == [
        (1, "left", (24, 46, 3)), (1, "right", (24, 52, 3)), (2, "left", (24, 58, 3)), (2, "right", (24, 64, 3))]
    assert all(r.source.shape == (16, 16, 3) and np.count_nonzero(r.mask) == 16 * 4 for r in seen)
    assert all(r.inputs.fit == "stretch" for r in seen)  # each window is already square at the model size
    final = rounds[-1].canvas
    assert np.array_equal(final[:, 12:52], photo) and (final[:, :12] == 9).all() and (final[:, -12:] == 9).all()
    with pytest.raises(ValueError, match=r"strip=24 must be an integer in \(0, 24\)"):
        next(lib.grow(Editor(), sides, strip=24, repeats=1))


def test_stretch_two_rounds_on_both_sides(tmp_path):
    """--fit=stretch: the reference's way, as before window mode (the canvas the image at the model
    size, its height the model size; PNGs byte for byte those of the code before it)."""
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "out"
    strip = 8
    proc = subprocess.run(
        [sys.executable, "-m", "launch.extrapolate", "--config=smoke", f"--init_image={tmp_path / 'img.png'}",
         "--fit=stretch",
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
    assert report["batch_rows"] == 2 and report["batch_size_auto"] is None  # --batch_size=2, not auto
    assert report["flags"]["fit"] == "stretch" and "photo_size" not in report and "scale" not in report
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
    assert all(0 <= e["sample_id"] < 2 for e in about["rounds"]) and "fit" not in about  # read as before
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


def test_window_mode_grows_the_photo_at_its_own_size(tmp_path):
    """The default --fit=window: a 200x120 photo keeps its height and every pixel; one round per
    side adds the default strip (a quarter of the height: 30 photo pixels, 16 model pixels)."""
    photo = np.random.RandomState(2).randint(0, 256, (120, 200, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.extrapolate", "--config=smoke", f"--init_image={tmp_path / 'photo.png'}",
         "--prompt_left=hell", "--prompt_right=heaven", "--side=both", "--repeats=1", "--num_samples=2",
         "--batch_size=2", "--skip_timesteps=20", "--seed=5", f"--output_dir={out}",
         f"--compilation_cache_dir={CACHE}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "growing the 200x120 photo at its own size" in proc.stderr
    canvas_0, canvas_1 = (np.asarray(Image.open(out / f"canvas_{r}.png")) for r in range(2))
    final = np.asarray(Image.open(out / "extrapolated.png"))
    assert np.array_equal(canvas_0, photo) and np.array_equal(final, canvas_1)
    assert final.shape == (120, 200 + 2 * 30, 3)
    assert np.array_equal(final[:, 30:230], photo)  # the photo, byte for byte at its offset
    assert not np.array_equal(final[:, -30:], np.repeat(photo[:, -1:], 30, axis=1))  # the diffusion's strip

    report = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["side"], r["width"]) for r in report["rounds"]] == [(1, "left", 230), (1, "right", 260)]
    framing = {"fit": "window", "photo_size": {"height": 120, "width": 200}, "strip": 30, "model_strip": 16,
               "scale": 1.875, "note": None}
    assert {k: report[k] for k in framing} == framing and report["size"] == {"height": 120, "width": 260}
    about = outputs.read_provenance(str(out / "extrapolated.png"))
    assert {k: about[k] for k in framing} == framing and about["rounds"] == report["rounds"]
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] == 260
    rows = [r for r in range(grid.shape[0] - 119) if np.array_equal(grid[r:r + 120, 30:230], photo)]
    assert len(rows) == 2  # each round's canvas shows the photo in the same columns


# ---------------------------------------------------------------------------------------------
# In-process, on a stand-in sampler (tests/launch_helpers.py: no networks, nothing compiled).

def test_extrapolate_checks_everything_before_touching_the_output(program_flags, monkeypatch, image_file, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    common = ["--prompt=sky", "--side=right", "--strip=16", "--repeats=1", "--num_samples=2", "--batch_size=2",
              f"--output_dir={out}"]
    assert run_program(program_flags, monkeypatch, "extrapolate", [*common, f"--init_image={image_file}"]) == 0
    assert sorted(os.listdir(out)) == ["canvas_0.png", "canvas_1.png", "extrapolated.png", "grid.png", "report.json"]
    assert strict_json(out / "report.json")["rounds"][0]["distance"] == pytest.approx(0.5)
    (out / "canvas_notes.png").write_bytes(b"mine")
    (out / "sketch.png").write_bytes(b"mine")
    capsys.readouterr()
    before = snapshot(out)
    bad = [([f"--init_image={tmp_path / 'typo.png'}", "--overwrite"], "no such file"),
           ([f"--init_image={image_file}", "--overwrite", "--seed=-1"], "--seed=-1"),
           ([f"--init_image={image_file}", "--overwrite", "--prompt=" + "word " * 80], "tokens"),
           ([f"--init_image={image_file}"], "--overwrite")]
    for args, message in bad:
        status = run_program(program_flags, monkeypatch, "extrapolate", [*common, *args])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and message in err, (args, err)
        assert snapshot(out) == before, args
    (out / ".tmp-dead.png").write_bytes(b"half")
    assert run_program(program_flags, monkeypatch, "extrapolate",
                       [*common, f"--init_image={image_file}", "--overwrite", "--repeats=2"]) == 0
    assert sorted(os.listdir(out)) == ["canvas_0.png", "canvas_1.png", "canvas_2.png", "canvas_notes.png",
                                       "extrapolated.png", "grid.png", "report.json", "sketch.png"]


def test_extrapolate_round_of_non_finite_samples_stops_with_one_line(program_flags, monkeypatch, image_file,
                                                                     tmp_path, capsys):
    out = tmp_path / "out"
    status = run_program(program_flags, monkeypatch, "extrapolate",
                         ["--prompt=sky", "--side=left", "--strip=16", "--repeats=2", "--num_samples=2",
                          "--batch_size=2", f"--output_dir={out}", f"--init_image={image_file}"],
                         FakeRun(nan=[0], inf=[1]))
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: round 1 (left): all 2 samples")
    assert sorted(os.listdir(out)) == ["canvas_0.png"]


def test_extrapolate_best_never_picks_a_non_finite_sample(program_flags, monkeypatch, image_file, tmp_path):
    out = tmp_path / "out"
    # Sample 1 would win (lower distance) but its image is NaN: sample 0 (grey 0) is kept.
    assert run_program(program_flags, monkeypatch, "extrapolate",
                       ["--prompt=sky", "--side=right", "--strip=16", "--repeats=1", "--num_samples=2",
                        "--batch_size=2", f"--output_dir={out}", f"--init_image={image_file}"], FakeRun(nan=[1])) == 0
    final = np.asarray(Image.open(out / "extrapolated.png"))
    assert (final[:, -16:] == 0).all()
    assert strict_json(out / "report.json")["rounds"][0]["distance"] == pytest.approx(1.0)


def test_extrapolate_default_strip_is_a_quarter_of_the_canvas_height(program_flags, monkeypatch, image_file,
                                                                      tmp_path):
    """Without --strip the 24x20 photo grows by 5 photo pixels per round (--fit=window), and with
    --fit=stretch the smoke model (64 pixels) by 16, not the 64 meant for 256."""
    for fit, strip, size in [("window", 5, {"height": 20, "width": 24 + 5}),
                             ("stretch", 16, {"height": SIZE, "width": SIZE + 16})]:
        out = tmp_path / fit
        assert run_program(program_flags, monkeypatch, "extrapolate",
                           ["--prompt=sky", "--side=right", "--repeats=1", "--num_samples=2", "--batch_size=2",
                            f"--fit={fit}", f"--output_dir={out}", f"--init_image={image_file}"], FakeRun()) == 0
        report = strict_json(out / "report.json")
        assert report["strip"] == strip and report["size"] == size, fit


def test_extrapolate_canvas_is_the_photo_as_window_mode_decodes_it(program_flags, monkeypatch, tmp_path, capsys):
    """An RGBA photo stored sideways (EXIF orientation 6): the canvas is upright and RGB, as
    window.decode gives it, and the dropped alpha is said (stderr, report, provenance)."""
    from bdjax import window

    rgba = np.random.RandomState(8).randint(0, 256, (24, 20, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(rgba, "RGBA").save(tmp_path / "phone.png", exif=exif)
    upright = window.decode(str(tmp_path / "phone.png")).rgb
    assert upright.shape == (20, 24, 3)
    out = tmp_path / "out"
    assert run_program(program_flags, monkeypatch, "extrapolate",
                       ["--prompt=sky", "--side=right", "--strip=4", "--repeats=1", "--num_samples=2",
                        "--batch_size=2", f"--output_dir={out}", f"--init_image={tmp_path / 'phone.png'}"]) == 0
    assert "alpha channel is dropped" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out / "canvas_0.png")), upright)
    final = np.asarray(Image.open(out / "extrapolated.png"))
    assert final.shape == (20, 28, 3) and np.array_equal(final[:, :24], upright)
    report = strict_json(out / "report.json")
    assert "alpha channel is dropped" in report["note"] and report["model_strip"] == round(4 * SIZE / 20)
    assert outputs.read_provenance(str(out / "canvas_0.png"))["note"] == report["note"]


# The preflight, in a subprocess: its failures happen before any network is built.

def test_extrapolate_preflight_runs_before_any_network(image_file, tmp_path):
    """Each of these fails in the preflight (no network built): status 2, one line naming the
    flag, nothing left behind."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    common = ["--config=smoke", "--prompt=sky", f"--init_image={image_file}", f"--output_dir={out}"]
    png = image_file.read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 3])
    cases = [
        (["--strip=64", "--fit=stretch"], "--strip=64 must be in (0, 64)"),
        (["--strip=20"], "--strip=20 must be in (0, 20) photo pixels"),  # the photo is 20 pixels tall
        (["--strip=0"], "--strip=0 must be at least 1"),
        (["--strip=8", "--context=0.2"], "--context/--feather do not apply"),
        (["--strip=8", "--rank_by=clip_whole"], "--rank_by does not apply: each round keeps the result of lowest CLIP"),
        (["--strip=8", "--seed=-1"], "--seed=-1"),
        (["--strip=8", f"--output_dir={tmp_path / 'a_file' / 'out'}"], "is a file"),
        (["--strip=8", f"--init_image={tmp_path / 'truncated.png'}"], "not a readable image"),
        (["--strip=8", "--repeats=0"], "--repeats=0"),
        (["--strip=8", "--repeats=100000000"], "--repeats=100000000 rounds of --strip=8"),
    ]
    for args, message in cases:
        proc = run_module("launch.extrapolate", *common, *args)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and message in err, (args, err)
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a_file", "img.png", "truncated.png"]
