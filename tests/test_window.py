"""Window mode (bdjax/window.py): geometry, decoding, crop, feathered paste. numpy + Pillow only;
the model is stood in for by `invert` (255 - source), so every edited pixel is visibly changed."""

import math
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

from bdjax import image_io, window
from bdjax.window import Photo, Window

MODEL = 256


def invert(source):
    return 255 - source


def smooth_rgb(height, width, seed=0):
    """A smooth colour image (gradients), so a Lanczos round trip changes it by a few levels only."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width - 1, 1) * 200 + 20, y / max(height - 1, 1) * 200 + 30,
                    (x + y) / max(width + height - 2, 1) * 150 + 50 + seed], axis=-1)
    return np.round(rgb).astype(np.uint8)


def photo_with(height, width, boxes, rgb=None):
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return Photo(rgb=smooth_rgb(height, width) if rgb is None else rgb, alpha=None, mask=mask)


def disk_offsets(radius):
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if dy * dy + dx * dx <= radius * radius]


def grown(mask, radius):
    """Pixels within Euclidean distance `radius` of the mask (brute force, by shifting)."""
    height, width = mask.shape
    out = mask.copy()
    for dy, dx in disk_offsets(radius):
        out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] |= \
            mask[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def run(photo, *, feather=window.DEFAULT_FEATHER, context=window.DEFAULT_CONTEXT, model=MODEL):
    win = window.choose(photo.mask, context=context, model_size=model)
    source, region = window.crop(photo, win, model)
    out = window.paste(photo, win, invert(source), feather=feather)
    return win, source, region, out


def check_guarantees(photo, win, source, region, out, feather, model=MODEL):
    height, width = photo.mask.shape
    assert out.shape == (height, width, 3 if photo.alpha is None else 4) and out.dtype == np.uint8
    assert source.shape == (model, model, 3) and region.shape == (model, model)
    assert set(np.unique(region)) <= {0, 255} and region.any()
    # the mask's box lies inside the window
    x0, y0, x1, y1 = window.mask_box(photo.mask)
    left, top, right, bottom = win.box
    assert left <= x0 and top <= y0 and x1 <= right and y1 <= bottom
    assert win.side == right - left == bottom - top
    # farther than `feather` from the mask: byte-identical to the decoded input
    far = ~grown(photo.mask, feather)
    assert np.array_equal(out[..., :3][far], photo.rgb[far])
    # in the mask: the edit resized back to the window (Pillow's resize of the whole edit, cropped;
    # paste resizes only the part it needs, which may differ by one level)
    full = np.asarray(Image.fromarray(invert(source)).resize((win.side, win.side), Image.LANCZOS))
    il, it, ir, ib = win.inside
    expected = full[it - top:ib - top, il - left:ir - left]
    inside = photo.mask[it:ib, il:ir]
    diff = np.abs(out[it:ib, il:ir, :3][inside].astype(int) - expected[inside])
    assert diff.max() <= 1
    # and visibly edited: the inverted photo, up to the Lanczos round trip of a smooth image
    changed = np.abs(out[..., :3][photo.mask].astype(int) - (255 - photo.rgb[photo.mask].astype(int)))
    assert changed.mean() < 6


# ------------------------------------------------------------------------------------- geometry


def test_window_geometry_by_hand():
    mask = np.zeros((800, 1000), bool)
    mask[500:540, 300:400] = True  # 100x40 box: side 100 * (1 + 2 * 0.5) = 200 -> raised to 256, centred
    win = window.choose(mask, context=0.5, model_size=256)
    assert (win.left, win.top, win.side) == ((300 + 400 - 256) // 2, (500 + 540 - 256) // 2, 256) == (222, 392, 256)
    assert win.box == (222, 392, 478, 648) and win.inside == win.box and win.photo_size == (1000, 800)
    assert win.scale(256) == 1.0 and win.scale(512) == 0.5

    mask[:] = False
    mask[500:540, 880:980] = True  # near the right border: centred at 802 would end at 1058 -> shifted to 744
    win = window.choose(mask, context=0.5, model_size=256)
    assert (win.left, win.top, win.side) == (744, 392, 256)

    mask[:] = False
    mask[600:800, 0:300] = True  # 300x200 box in the bottom-left corner: side 600, shifted inside
    win = window.choose(mask, context=0.5, model_size=256)
    assert (win.left, win.top, win.side) == (0, 200, 600)
    assert win.as_dict() == {"left": 0, "top": 200, "side": 600, "box": [0, 200, 600, 800],
                             "inside": [0, 200, 600, 800], "photo_size": [1000, 800]}

    mask[:] = False
    mask[10:11, 10:11] = True  # 1 pixel: a model-size window in the corner
    assert window.choose(mask, context=0.5, model_size=512).box == (0, 0, 512, 512)

    # side never beyond max(W, H); a shorter axis is centred (the window passes both borders)
    whole = window.choose(np.ones((360, 640), bool), context=0.5, model_size=256)
    assert (whole.left, whole.top, whole.side) == (0, -140, 640) and whole.inside == (0, 0, 640, 360)
    small = window.choose(np.ones((60, 100), bool), context=0.5, model_size=256)
    assert (small.left, small.top, small.side) == (0, -20, 100)


def test_window_rule_holds_for_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(300):
        height, width = rng.integers(1, 900, 2)
        mask = np.zeros((height, width), bool)
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, height), rng.integers(0, width)
            mask[y:y + rng.integers(1, 300), x:x + rng.integers(1, 300)] = True
        context = float(rng.choice([0.0, 0.1, 0.5, 1.0, 3.0]))
        model = int(rng.choice([64, 256, 512]))
        win = window.choose(mask, context=context, model_size=model)
        x0, y0, x1, y1 = window.mask_box(mask)
        longest = max(x1 - x0, y1 - y0)
        assert win.side == min(max(math.ceil(longest * (1 + 2 * context)), model), max(width, height))
        left, top, right, bottom = win.box
        assert left <= x0 and top <= y0 and x1 <= right and y1 <= bottom
        for start, length in ((left, width), (top, height)):
            if win.side <= length:
                assert 0 <= start <= length - win.side
            else:
                assert start == (length - win.side) // 2 < 0


def test_choose_rejects_bad_arguments():
    with pytest.raises(ValueError, match="selects no pixel"):
        window.choose(np.zeros((10, 10), bool), context=0.5, model_size=256)
    with pytest.raises(ValueError, match="context"):
        window.choose(np.ones((10, 10), bool), context=-1, model_size=256)
    with pytest.raises(ValueError, match="bool"):
        window.choose(np.ones((10, 10), np.uint8), context=0.5, model_size=256)


# -------------------------------------------------------------------------- end to end geometry


def mask_cases(height, width):
    return {
        "1x1 pixel": [(width // 3, height // 2, width // 3 + 1, height // 2 + 1)],
        "touching left": [(0, height // 3, 40, height // 3 + 50)],
        "touching right": [(width - 30, height // 4, width, height // 4 + 60)],
        "touching top": [(width // 2, 0, width // 2 + 70, 25)],
        "touching bottom": [(width // 5, height - 35, width // 5 + 45, height)],
        "whole photo": [(0, 0, width, height)],
        "two blobs, opposite corners": [(2, 3, 22, 18), (width - 25, height - 20, width - 1, height - 2)],
    }


@pytest.mark.parametrize("height,width", [(360, 640), (640, 360)])
@pytest.mark.parametrize("case", list(mask_cases(10, 10)))
def test_pipeline_keeps_everything_outside_the_band(height, width, case):
    photo = photo_with(height, width, mask_cases(height, width)[case])
    win, source, region, out = run(photo, feather=4)
    check_guarantees(photo, win, source, region, out, 4)
    if case == "1x1 pixel":
        assert win.side == MODEL  # the model sees it at the photo's scale
        assert np.count_nonzero(region) == 1
    if case == "whole photo":
        assert win.side == max(height, width) and (win.left, win.top) in ((0, -140), (-140, 0))
    if case == "two blobs, opposite corners":
        assert win.side == max(height, width)


def test_tiny_mask_lost_by_nearest_keeps_its_model_pixels():
    photo = photo_with(360, 640, [(1, 1, 2, 2), (638, 358, 639, 359)])
    win = window.choose(photo.mask, context=0.5, model_size=MODEL)
    assert win.side == 640  # 2.5 photo pixels per model pixel: nearest samples miss both pixels
    _, region = window.crop(photo, win, MODEL)
    ys, xs = np.nonzero(region)
    cells = {(int(y), int(x)) for y, x in zip(ys, xs)}
    # photo (1, 1) is window (141, 1); photo (358, 638) is window (498, 638); cell = floor(p * 256 / 640)
    assert cells == {(141 * 256 // 640, 1 * 256 // 640), (498 * 256 // 640, 638 * 256 // 640)}


# ------------------------------------------------------------------------------------ decoding


def test_rgb_png(tmp_path):
    rgb = smooth_rgb(120, 200)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    mask = np.zeros((120, 200), np.uint8)
    mask[40:70, 90:130] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    photo = window.decode(tmp_path / "p.png", tmp_path / "m.png")
    assert np.array_equal(photo.rgb, rgb) and photo.alpha is None and photo.note == ""
    assert np.array_equal(photo.mask, mask > 0) and photo.size == (200, 120)
    check_guarantees(photo, *run(photo), 4)


def test_rgba_keeps_alpha_exactly(tmp_path):
    rgb = smooth_rgb(90, 150)
    alpha = np.tile(np.arange(150, dtype=np.uint8), (90, 1))
    alpha[:10] = 0  # fully transparent rows keep their colours too
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "p.png")
    mask = np.zeros((90, 150), bool)
    mask[30:60, 60:100] = True
    photo = window.decode(tmp_path / "p.png", mask)
    assert np.array_equal(photo.rgb, rgb) and np.array_equal(photo.alpha, alpha)
    win, source, region, out = run(photo)
    assert out.shape == (90, 150, 4)
    assert np.array_equal(out[..., 3], alpha)
    check_guarantees(photo, win, source, region, out, 4)


def test_la_and_pa_alpha(tmp_path):
    grey = np.tile(np.arange(0, 200, 2, dtype=np.uint8), (50, 1))
    alpha = np.full((50, 100), 77, np.uint8)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    photo = window.decode(tmp_path / "la.png")
    assert np.array_equal(photo.alpha, alpha) and np.array_equal(photo.rgb, np.dstack([grey] * 3))
    pa = Image.fromarray(grey).convert("P").convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    assert pa.mode == "PA"
    assert np.array_equal(window.decode(pa).alpha, alpha)


def test_greyscale_becomes_rgb(tmp_path):
    grey = smooth_rgb(80, 120)[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    mask = np.zeros((80, 120), bool)
    mask[20:40, 50:70] = True
    photo = window.decode(tmp_path / "g.png", mask)
    assert photo.rgb.shape == (80, 120, 3) and photo.alpha is None
    win, source, region, out = run(photo)
    assert out.shape == (80, 120, 3)
    far = ~grown(mask, 4)
    assert np.array_equal(out[far], np.repeat(grey[far][:, None], 3, axis=1))
    check_guarantees(photo, win, source, region, out, 4)


def test_sixteen_bit_png_written_as_eight_bit(tmp_path):
    values = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 10 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode in ("I;16", "I")  # a real 16-bit file
    photo = window.decode(tmp_path / "deep.png")
    assert photo.note == "16-bit input written as 8-bit"
    assert np.array_equal(photo.rgb, np.dstack([(values >> 8).astype(np.uint8)] * 3))
    assert window.decode(np.zeros((4, 4, 3), np.uint16)).note == "16-bit input written as 8-bit"
    assert window.decode(np.zeros((4, 4, 3), np.uint8)).note == ""


def test_sixteen_bit_mask_selects_any_non_zero(tmp_path):
    values = np.zeros((30, 40), np.uint16)
    values[5:9, 6:12] = 1  # top 8 bits are 0: still selected
    Image.fromarray(values).save(tmp_path / "mask16.png")
    photo = window.decode(np.zeros((30, 40, 3), np.uint8), tmp_path / "mask16.png")
    assert np.array_equal(photo.mask, values > 0)
    with pytest.raises(image_io.InputError, match="NaN"):
        window.decode(np.zeros((30, 40, 3), np.uint8), np.full((30, 40), np.nan, np.float32))


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(smooth_rgb(20, 40)).save(tmp_path / "phone.jpg", exif=exif)
    photo = window.decode(tmp_path / "phone.jpg")
    assert photo.rgb.shape == (40, 20, 3) and photo.size == (20, 40) and photo.mask.shape == (40, 20)


def test_mask_of_another_size_empty_mask_and_invert():
    rgb = smooth_rgb(100, 200)
    small = np.zeros((50, 100), np.uint8)
    small[10:20, 30:40] = 255
    with pytest.warns(UserWarning, match=r"mask size \(100, 50\) differs from image size \(200, 100\)"):
        photo = window.decode(rgb, small)
    assert photo.mask.shape == (100, 200)
    assert np.array_equal(photo.mask, np.repeat(np.repeat(small > 0, 2, axis=0), 2, axis=1))

    with pytest.raises(image_io.InputError, match="selects no pixel"):
        window.decode(rgb, np.zeros((100, 200), np.uint8))
    with pytest.raises(image_io.InputError, match="after invert_mask"):
        window.decode(rgb, np.full((100, 200), 255, np.uint8), invert_mask=True)
    with pytest.warns(UserWarning, match="whole image"):
        window.decode(rgb, np.full((100, 200), 255, np.uint8))

    mask = np.zeros((100, 200), np.uint8)
    mask[:, :150] = 255
    assert np.array_equal(window.decode(rgb, mask, invert_mask=True).mask, mask == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mask: the whole photo, without a warning
        assert window.decode(rgb).mask.all()


# --------------------------------------------------------------------------------- feathering


def test_feather_alpha_matches_euclidean_distance():
    rng = np.random.default_rng(3)
    mask = np.zeros((70, 90), bool)
    mask[30:34, 40:47] = True
    mask[rng.integers(0, 70, 6), rng.integers(0, 90, 6)] = True
    ys, xs = np.nonzero(mask)
    py, px = np.mgrid[0:70, 0:90]
    dist = np.sqrt(((py[..., None] - ys) ** 2 + (px[..., None] - xs) ** 2).min(axis=-1))
    for feather in (0, 1, 3, 8):
        expected = np.where(dist <= feather, 1 - dist / (feather + 1), 0) if feather else mask.astype(float)
        alpha = window.feather_alpha(mask, feather)
        assert alpha.dtype == np.float32
        np.testing.assert_allclose(alpha, expected, atol=1e-6)
    assert np.array_equal(window.feather_alpha(np.zeros((5, 5), bool), 4), np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="feather"):
        window.feather_alpha(mask, window.MAX_FEATHER + 1)
    with pytest.raises(ValueError, match="feather"):
        window.feather_alpha(mask, -1)


def test_feather_changes_only_the_band():
    photo = photo_with(360, 640, [(300, 150, 360, 200)])
    win = window.choose(photo.mask, context=0.5, model_size=MODEL)
    source, _ = window.crop(photo, win, MODEL)
    hard = window.paste(photo, win, invert(source), feather=0)
    soft = window.paste(photo, win, invert(source), feather=8)
    band = grown(photo.mask, 8) & ~photo.mask
    differ = np.any(hard != soft, axis=-1)
    assert differ.any() and not (differ & ~band).any()
    assert np.array_equal(hard[photo.mask], soft[photo.mask])
    assert np.array_equal(hard[~photo.mask], photo.rgb[~photo.mask])  # feather 0: only the mask changes


def test_feather_band_clipped_to_the_window():
    photo = photo_with(360, 640, [(100, 100, 140, 140)])
    win = Window(left=98, top=100, side=256, photo_size=(640, 360))  # box 2 px from the left edge
    source, _ = window.crop(photo, win, MODEL)
    out = window.paste(photo, win, invert(source), feather=8)
    assert np.array_equal(out[:, :98], photo.rgb[:, :98])
    assert not np.array_equal(out[100:140, 98:100], photo.rgb[100:140, 98:100])
    with pytest.raises(ValueError, match="whole mask"):
        window.paste(photo, Window(left=120, top=100, side=256, photo_size=(640, 360)), invert(source), feather=4)


# ---------------------------------------------------------------------- padding, small photos


def test_window_past_the_short_side_is_reflected():
    photo = photo_with(360, 640, [(0, 0, 640, 360)])
    win = window.choose(photo.mask, context=0.5, model_size=640)  # no resize: the crop is the window itself
    assert (win.left, win.top, win.side) == (0, -140, 640)
    source, region = window.crop(photo, win, 640)
    rows = np.arange(140)
    assert np.array_equal(source[:140], photo.rgb[140 - rows])             # mirrored about photo row 0
    assert np.array_equal(source[140:500], photo.rgb)
    assert np.array_equal(source[500:], photo.rgb[718 - (rows + 500 - 140)])  # mirrored about row 359
    assert not region[:140].any() and not region[500:].any() and region[140:500].all()

    win, source, region, out = run(photo)  # model 256: the padded window downscaled
    assert out.shape == (360, 640, 3)
    check_guarantees(photo, win, source, region, out, 4)


def test_one_pixel_axis_uses_edge_padding():
    photo = photo_with(1, 40, [(0, 0, 40, 1)])
    win = window.choose(photo.mask, context=0.5, model_size=16)
    assert (win.top, win.side) == (-20, 40)
    source, region = window.crop(photo, win, 40)
    assert np.array_equal(source, np.repeat(photo.rgb, 40, axis=0))
    out = window.paste(photo, win, invert(source), feather=2)
    assert np.array_equal(out, invert(photo.rgb))


def test_small_photo_is_upscaled_for_the_model():
    photo = photo_with(60, 100, [(30, 20, 50, 40)])
    win, source, region, out = run(photo)
    assert (win.left, win.top, win.side) == (0, -20, 100)
    assert source.shape == (256, 256, 3) and win.scale(256) == 100 / 256
    assert out.shape == (60, 100, 3)
    check_guarantees(photo, win, source, region, out, 4)


def test_downscaled_preview():
    thumb = window.downscaled(np.zeros((400, 1000, 3), np.uint8), 250)
    assert thumb.size == (250, 100)
    assert window.downscaled(Image.new("RGB", (100, 40)), 250).size == (100, 40)  # never upscaled


# --------------------------------------------------------------------------------- big photos


def test_big_photo_memory():
    """A 6000x4000 photo with a 50x50 mask: crop gives the model 256x256 and paste the full photo.
    Peak memory allocated during crop + paste stays under 1.5x the photo's RGB bytes (72 MB; about
    1.01x measured): the output is one copy of the photo; everything else is window- or band-sized."""
    height, width = 4000, 6000
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[...] = (np.arange(width, dtype=np.uint8) * 7)[None, :, None]
    mask = np.zeros((height, width), bool)
    mask[2000:2050, 3000:3050] = True
    photo = Photo(rgb=rgb, alpha=None, mask=mask)
    win = window.choose(mask, context=0.5, model_size=256)
    assert win.side == 256

    tracemalloc.start()
    try:
        source, region = window.crop(photo, win, 256)
        out = window.paste(photo, win, invert(source), feather=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert source.shape == (256, 256, 3) and region.shape == (256, 256)
    assert out.shape == (4000, 6000, 3)
    assert peak < 1.5 * rgb.nbytes, f"peak {peak / 1e6:.0f} MB for a {rgb.nbytes / 1e6:.0f} MB photo"
    out[1990:2060, 2990:3060] = rgb[1990:2060, 2990:3060]  # the grown band (4 px) lies inside this square
    assert np.array_equal(out, rgb)
