"""Edits at the photo's own size, end to end on the smoke networks: window mode through
bdjax/request.py (`prepare_inputs`, `Inputs.compose`) and `BlendedDiffusion.edit`, the reference's
`fit="stretch"` kept, and launch.edit's full-size outputs. The geometry itself is tested with a
stand-in model in tests/test_window.py."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from bdjax import image_io, outputs, request, smoke, window

FAST = {"skip_timesteps": 20}  # 5 steps; the configuration other smoke tests compile
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def editor():
    return smoke.editor(with_lpips=False)


def grown(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` dilated by a disk of `radius` pixels (brute force over offsets)."""
    out = mask.copy()
    height, width = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                shifted = np.zeros_like(mask)
                shifted[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
                    mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
                out |= shifted
    return out


def scene(height: int, width: int) -> np.ndarray:
    rng = np.random.RandomState(height * 7 + width)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 // max(width - 1, 1), y * 200 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.randint(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def masks(height: int, width: int) -> dict:
    """The mask cases of a non-square photo: a pixel, each border, everything, two far blobs."""
    cases = {}
    for name, (rows, cols) in {
        "pixel": (slice(height // 2, height // 2 + 1), slice(width // 3, width // 3 + 1)),
        "top": (slice(0, 12), slice(width // 4, width // 2)),
        "bottom": (slice(height - 12, height), slice(width // 4, width // 2)),
        "left": (slice(height // 4, height // 2), slice(0, 10)),
        "right": (slice(height // 4, height // 2), slice(width - 10, width)),
        "all": (slice(0, height), slice(0, width)),
    }.items():
        m = np.zeros((height, width), np.uint8)
        m[rows, cols] = 255
        cases[name] = m
    m = np.zeros((height, width), np.uint8)
    m[2:10, 3:12] = 255
    m[height - 10:height - 2, width - 14:width - 4] = 255
    cases["two blobs"] = m
    return cases


@pytest.mark.parametrize("height,width", [(90, 160), (160, 90)])
def test_results_have_the_photos_size_and_keep_everything_outside_the_feather(editor, height, width):
    photo = scene(height, width)
    for name, mask in masks(height, width).items():
        result = editor.edit(photo, mask, "a red ball", num_samples=2, seed=1, progress=False, **FAST)
        assert result.images.shape == (2, height, width, 3), name
        assert result.crops.shape == (2, editor.image_size, editor.image_size, 3), name
        # the window is the one the geometry gives for this mask
        expected = window.choose(mask > 0, context=window.DEFAULT_CONTEXT, model_size=editor.image_size)
        assert result.framing["window"] == expected.as_dict(), name
        x0, y0, x1, y1 = window.mask_box(mask > 0)
        left, top, right, bottom = expected.box
        assert left <= x0 and top <= y0 and x1 <= right and y1 <= bottom, name
        outside = ~grown(mask > 0, window.DEFAULT_FEATHER)
        for image in result.images:
            assert np.array_equal(image[outside], photo[outside]), name
        if name != "all":  # something inside the mask changed
            assert any((image[mask > 0] != photo[mask > 0]).any() for image in result.images), name
        assert np.array_equal(result.source, photo) and np.array_equal(result.mask, mask)


def test_the_seam_changes_only_inside_the_feather_band(editor):
    photo, mask = scene(90, 160), masks(90, 160)["top"]
    inputs = {f: request.prepare_inputs(photo, mask, image_size=editor.image_size, feather=f) for f in (0, 6)}
    assert np.array_equal(inputs[0].source, inputs[6].source)  # the feather does not change what is edited
    crops = editor.edit(photo, mask, "a cat", num_samples=1, seed=2, progress=False, feather=0, **FAST).crops
    hard, soft = inputs[0].compose(crops)[0], inputs[6].compose(crops)[0]
    band = grown(mask > 0, 6) & ~(mask > 0)
    assert np.array_equal(hard[~band], soft[~band])
    assert (hard[band] != soft[band]).any()
    assert np.array_equal(hard[mask == 0], photo[mask == 0])  # feather 0: a hard paste


def test_rgba_and_greyscale_photos(editor, tmp_path):
    rgba = np.dstack([scene(60, 100), np.linspace(0, 255, 60 * 100).reshape(60, 100).astype(np.uint8)])
    mask = np.zeros((60, 100), np.uint8)
    mask[20:30, 40:60] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(scene(60, 100)[..., 0], "L").save(tmp_path / "grey.png")
    result = editor.edit(str(tmp_path / "rgba.png"), mask, "x", num_samples=1, seed=0, progress=False, **FAST)
    assert result.images.shape == (1, 60, 100, 4)
    assert np.array_equal(result.images[0, ..., 3], rgba[..., 3])  # alpha kept exactly
    outside = ~grown(mask > 0, window.DEFAULT_FEATHER)
    assert np.array_equal(result.images[0, ..., :3][outside], rgba[..., :3][outside])
    grey = editor.edit(str(tmp_path / "grey.png"), mask, "x", num_samples=1, seed=0, progress=False, **FAST)
    assert grey.images.shape == (1, 60, 100, 3)
    assert np.array_equal(grey.images[0][outside], np.repeat(scene(60, 100)[..., :1], 3, axis=2)[outside])


def test_stretch_is_the_references_square_edit(editor, tmp_path):
    """fit="stretch": the inputs are image_io's stretched image and mask bit for bit, the results
    stay at the model size with no crops, and reports carry no window."""
    photo, mask = scene(90, 160), masks(90, 160)["left"]
    inputs = request.prepare_inputs(photo, mask, image_size=editor.image_size, fit="stretch")
    assert np.array_equal(inputs.init, image_io.load_image(photo, editor.image_size))
    assert np.array_equal(inputs.region, image_io.load_mask(mask, editor.image_size))
    assert inputs.framing() == {} and inputs.photo is None
    result = editor.edit(photo, mask, "a cat", num_samples=2, seed=4, progress=False, fit="stretch", **FAST)
    assert result.images.shape == (2, editor.image_size, editor.image_size, 3) and result.crops is None
    assert np.array_equal(result.source, inputs.source)


def test_framing_is_checked_before_anything_is_decoded(editor):
    for framing, name in (({"fit": "square"}, "fit"), ({"context": -1.0}, "context"), ({"context": float("nan")},
                          "context"), ({"feather": 65}, "feather"), ({"feather": 2.5}, "feather")):
        with pytest.raises(ValueError) as raised:
            editor.prepare("no such file.png", None, "x", **framing)
        assert raised.value.name == name


def test_the_upscale_is_stated_and_warned_about():
    photo = scene(300, 400)
    mask = np.zeros((300, 400), np.uint8)
    mask[50:250, 100:300] = 255  # 200 px: window 400 px, 6.25 model pixels... at 64 px
    with pytest.warns(UserWarning, match=r"spans 400 px: the edit is made at 64 px and upscaled 6\.2x"):
        inputs = request.prepare_inputs(photo, mask, image_size=64)
        inputs.show_warnings()
    assert "400x400 window at (0, -50) of the 400x300 photo at 64 px, upscaled 6.2x" in inputs.framing_line()
    assert inputs.framing()["scale"] == 6.25


def edit_cli(tmp_path, photo: np.ndarray, mask: np.ndarray, *flags: str):
    """launch.edit at the smoke config (2 samples, 5 steps) on `photo` and `mask`, into tmp_path/out;
    returns the finished process."""
    Image.fromarray(photo).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    proc = subprocess.run([sys.executable, "-m", "launch.edit", "--config=smoke", "--prompt=x", "--num_samples=2",
                           "--skip_timesteps=20", f"--init_image={tmp_path / 'p.png'}", f"--mask={tmp_path / 'm.png'}",
                           f"--output_dir={tmp_path / 'out'}", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_launch_edit_writes_full_size_results_and_crops(tmp_path):
    photo, mask = scene(72, 120), masks(72, 120)["two blobs"]
    proc = edit_cli(tmp_path, photo, mask, "--feather=2")
    assert "window at" in proc.stderr and "of the 120x72 photo at 64 px" in proc.stderr
    out = tmp_path / "out"
    ranked = sorted(os.listdir(out / "ranked"))
    assert len(ranked) == 2 and sorted(os.listdir(out / "crops")) == ["sample_0.png", "sample_1.png"]
    outside = ~grown(mask > 0, 2)
    for name in ranked:
        image = outputs.read_png(str(out / "ranked" / name))
        assert image.shape == (72, 120, 3) and np.array_equal(image[outside], photo[outside])
        record = outputs.read_provenance(str(out / "ranked" / name))
        assert record["fit"] == "window" and record["feather"] == 2 and record["window"]["photo_size"] == [120, 72]
    assert outputs.read_png(str(out / "crops" / "sample_0.png")).shape == (64, 64, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["fit"] == "window" and report["window"]["side"] == 120 and report["scale"] == 1.875


def test_a_24_megapixel_photo_edits_within_a_few_copies_of_it(tmp_path):
    """A 6000x4000 photo with a small mask, through launch.edit at the smoke config, 2 samples in
    one batch: the peak resident memory exceeds that of the same run on a 600x400 photo by less
    than 8 copies of the photo (8 x 72 MB: the decoded photo, its mask, each batch row's pasted
    result and the PNG encoder's buffers); a measured bound, not a time."""
    peaks = {}
    for width, height in ((600, 400), (6000, 4000)):
        photo = np.zeros((height, width, 3), np.uint8)
        photo[..., 0] = 120
        photo[::7, :, 1] = 200
        mask = np.zeros((height, width), np.uint8)
        mask[height // 2:height // 2 + 60, width // 2:width // 2 + 60] = 255
        Image.fromarray(photo).save(tmp_path / f"p{width}.png", compress_level=1)
        Image.fromarray(mask).save(tmp_path / f"m{width}.png")
        code = textwrap.dedent(f"""
            import resource, runpy, sys
            sys.argv = ["launch.edit", "--config=smoke", "--prompt=x", "--num_samples=2", "--skip_timesteps=20",
                        "--init_image={tmp_path / f'p{width}.png'}", "--mask={tmp_path / f'm{width}.png'}",
                        "--output_dir={tmp_path / f'out{width}'}"]
            try:
                runpy.run_module("launch.edit", run_name="__main__")
            finally:
                print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
            """)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        peaks[width] = int(proc.stderr.rsplit("PEAK", 1)[1].split()[0]) * 1024  # ru_maxrss is in KiB on Linux
        image = outputs.read_png(str(next((tmp_path / f"out{width}" / "ranked").iterdir())))
        assert image.shape == (height, width, 3)
    photo_bytes = 6000 * 4000 * 3
    assert peaks[6000] - peaks[600] < 8 * photo_bytes, peaks


def test_launch_edit_with_fit_stretch_writes_what_the_reference_does(tmp_path):
    """--fit=stretch: model-size results, no crops/, and no window in the report or the PNGs (their
    provenance reads as before window mode existed)."""
    proc = edit_cli(tmp_path, scene(72, 120), masks(72, 120)["left"], "--fit=stretch")
    assert "stretched to 64x64 (fit=stretch)" in proc.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["grid.png", "ranked", "report.json", "samples"]
    for name in os.listdir(out / "ranked"):
        assert outputs.read_png(str(out / "ranked" / name)).shape == (64, 64, 3)
        assert not {"fit", "window", "scale", "feather"} & set(outputs.read_provenance(str(out / "ranked" / name)))
    report = json.loads((out / "report.json").read_text())
    assert not {"fit", "window", "scale"} & set(report) and report["flags"]["fit"] == "stretch"
