"""Input handling as the reference does it: RGB conversion, Lanczos resize to [-1, 1], masks from
any non-zero pixel of the first channel with nearest-neighbour resizing, and the errors/warnings."""

import warnings

import numpy as np
import pytest
from PIL import Image

from bdjax import image_io


def reference_image(pil, size):
    """The reference: Image.open(..).convert("RGB").resize(LANCZOS), to_tensor * 2 - 1."""
    return np.asarray(pil.convert("RGB").resize((size, size), Image.LANCZOS), np.float32) / 255 * 2 - 1


@pytest.fixture
def photo():
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 256, (48, 40, 3), dtype=np.uint8))


def test_rgb_image_matches_reference_preparation(photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    want = reference_image(photo, 32)
    for src in (photo, str(path), np.asarray(photo), np.asarray(photo) / 255.0):
        got = image_io.load_image(src, 32)
        assert got.shape == (32, 32, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_are_converted_to_rgb(photo, mode):
    img = photo.convert(mode)
    np.testing.assert_allclose(image_io.load_image(img, 32), reference_image(img, 32), atol=1e-6)


def test_16_bit_grey_keeps_its_range():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    got = image_io.load_image(img, 64)
    np.testing.assert_allclose(got[..., 0], (ramp >> 8).astype(np.float32) / 255 * 2 - 1, atol=1e-6)
    assert got.max() > 0.9  # not clipped to white or crushed to black
    np.testing.assert_allclose(image_io.load_image(ramp, 64), got)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(image_io.InputError, match="no such file"):
        image_io.load_image(str(tmp_path / "missing.png"), 32)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(image_io.InputError, match="not a readable image"):
        image_io.load_image(str(tmp_path / "bad.png"), 32)
    with pytest.raises(image_io.InputError, match=r"\[0, 1\]"):
        image_io.load_image(np.full((8, 8, 3), 2.0), 32)
    with pytest.raises(image_io.InputError, match="shape"):
        image_io.load_image(np.zeros((8, 8, 5), np.uint8), 32)


def test_mask_is_any_nonzero_pixel_of_the_first_channel():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[4:10, 4:10, 0] = 1      # faint but non-zero red: edited
    arr[20:30, 20:30, 1] = 255  # green only: not the first channel, kept
    mask = image_io.load_mask(arr, 32)
    assert mask.shape == (32, 32, 1)
    assert mask[..., 0].sum() == 36 and mask[4:10, 4:10].all()
    assert not mask[20:30, 20:30].any()


def test_mask_resize_is_nearest_neighbour_and_warns_on_size_mismatch():
    arr = (np.random.RandomState(1).rand(64, 64) > 0.5).astype(np.uint8) * 255  # smoothing would show
    with pytest.warns(UserWarning, match="differs from image size"):
        mask = image_io.load_mask(arr, 32, image_size=(48, 48))
    want = np.asarray(Image.fromarray(arr).convert("RGB").resize((32, 32), Image.NEAREST))[..., 0] > 0
    np.testing.assert_array_equal(mask[..., 0], want)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_io.load_mask(arr, 32, image_size=(64, 64))  # same size: no warning


def test_invert_empty_and_full_masks():
    arr = np.zeros((16, 16), np.uint8)
    arr[:8] = 255
    np.testing.assert_array_equal(image_io.load_mask(arr, 16, invert_mask=True), 1 - image_io.load_mask(arr, 16))
    with pytest.raises(image_io.InputError, match="selects no pixel"):
        image_io.load_mask(np.zeros((16, 16), np.uint8), 16)
    with pytest.raises(image_io.InputError, match="after invert_mask"):
        image_io.load_mask(np.full((16, 16), 255, np.uint8), 16, invert_mask=True)
    with pytest.warns(UserWarning, match="whole image"):
        full = image_io.load_mask(np.full((16, 16), 7, np.uint8), 16)
    assert full.all()
    assert image_io.load_mask(None, 16).all()  # no mask: edit everything, as the reference


def _photo_array():
    return np.random.RandomState(2).randint(0, 256, (6, 5, 3), dtype=np.uint8)


def _round_trip(mode):
    """An RGB photo converted to `mode`: loading it must give the photo back (up to rounding)."""
    photo = _photo_array()
    return Image.fromarray(photo).convert(mode), photo


def _lab():
    """LAB as littleCMS converts it to sRGB (8-bit LAB cannot hold every sRGB colour: no round trip)."""
    from PIL import ImageCms

    img = Image.fromarray(_photo_array()).convert("LAB")
    to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return img, np.asarray(ImageCms.applyTransform(img, to_srgb))


def _with_alpha(mode, base):
    """Colours in `base` mode plus a varying alpha channel; alpha is dropped on loading."""
    photo = _photo_array()
    colours = np.asarray(Image.fromarray(photo).convert(base))
    alpha = np.linspace(200, 255, colours.shape[0] * colours.shape[1]).astype(np.uint8).reshape(colours.shape[:2])
    stacked = np.dstack([colours if colours.ndim == 3 else colours[..., None], alpha])
    img = Image.fromarray(stacked, "LA" if base == "L" else "RGBA").convert(mode)
    want = colours if colours.ndim == 3 else np.repeat(colours[..., None], 3, axis=-1)
    return img, want


def _palette(mode):
    indices = np.arange(30, dtype=np.uint8).reshape(6, 5) % 7
    palette = np.random.RandomState(3).randint(0, 256, (256, 3), dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette(palette.tobytes())
    if mode == "PA":
        img = img.convert("PA")
    return img, palette[indices]


def _grey(values, mode, want):
    img = Image.fromarray(values).convert(mode) if mode in ("1", "L") else Image.new(mode, values.shape[::-1])
    if mode not in ("1", "L"):
        for (y, x), v in np.ndenumerate(values):
            img.putpixel((x, y), int(v) if mode != "F" else float(v))
    return img, np.repeat(np.asarray(want, np.uint8)[..., None], 3, axis=-1)


RAMP16 = np.array([[0, 255, 256, 4660], [32768, 40000, 65280, 65535]], np.uint16)
UNIT = np.array([[0.0, 0.25, 0.5], [0.75, 0.999, 1.0]], np.float32)

# Every Pillow mode: an image in it and the RGB pixels it must give.
MODE_CASES = {
    "1": lambda: _grey(np.array([[0, 255], [255, 0]], np.uint8), "1", [[0, 255], [255, 0]]),
    "L": lambda: _grey(np.array([[0, 7], [128, 255]], np.uint8), "L", [[0, 7], [128, 255]]),
    "P": lambda: _palette("P"),
    "PA": lambda: _palette("PA"),
    "LA": lambda: _with_alpha("LA", "L"),
    "La": lambda: _with_alpha("La", "L"),
    "RGB": lambda: _round_trip("RGB"),
    "RGBA": lambda: _with_alpha("RGBA", "RGB"),
    "RGBa": lambda: _with_alpha("RGBa", "RGB"),
    "RGBX": lambda: _round_trip("RGBX"),
    "CMYK": lambda: _round_trip("CMYK"),
    "YCbCr": lambda: _round_trip("YCbCr"),
    "LAB": _lab,
    "HSV": lambda: _round_trip("HSV"),
    "I;16": lambda: _grey(RAMP16, "I;16", RAMP16 >> 8),
    "I;16L": lambda: _grey(RAMP16, "I;16L", RAMP16 >> 8),
    "I;16B": lambda: _grey(RAMP16, "I;16B", RAMP16 >> 8),
    "I;16N": lambda: _grey(RAMP16, "I;16N", RAMP16 >> 8),
    "I": lambda: _grey(RAMP16.astype(np.int32), "I", RAMP16 >> 8),
    "F": lambda: _grey(UNIT, "F", np.round(UNIT * 255)),
}
# Tolerance in 0..255 levels: premultiplied alpha and colour-space round trips lose a little.
MODE_TOLERANCE = {"La": 1, "RGBa": 1, "YCbCr": 3, "LAB": 1, "HSV": 6}


def test_every_pillow_mode_is_covered():
    assert set(MODE_CASES) == set(Image.MODES)


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_each_pillow_mode_gives_the_right_rgb(mode):
    img, want = MODE_CASES[mode]()
    assert img.mode == mode
    got = np.asarray(image_io.to_rgb(img), np.int32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=MODE_TOLERANCE.get(mode, 0))
    # load_image takes the same path
    np.testing.assert_array_equal(image_io.load_image(img, 8), image_io.load_image(got.astype(np.uint8), 8))


@pytest.mark.parametrize("values, message", [
    (np.array([[0.0, 2.0]], np.float32), r"values in \[0, 2\].*\[0, 1\]"),
    (np.array([[0.0, -0.5]], np.float32), r"values in \[-0.5, 0\]"),
    (np.array([[0.0, np.nan]], np.float32), "NaN"),
    (np.array([[0.0, np.inf]], np.float32), r"\[0, inf\]"),
])
def test_float_images_outside_unit_range_are_refused(values, message):
    img = Image.fromarray(values)
    assert img.mode == "F"
    with pytest.raises(image_io.InputError, match=message) as caught:
        image_io.load_image(img, 8)
    assert "\n" not in str(caught.value) and "scale it to [0, 1]" in str(caught.value)
    for src in (values, np.dstack([values] * 3)):  # the same rule for float arrays
        with pytest.raises(image_io.InputError, match=message.split(".*")[0]):
            image_io.load_image(src, 8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_deep_masks_select_every_non_zero_value(mode):
    """Not only the values that survive a reduction to 8 bits: a 0/1 16-bit mask selects its ones."""
    values = np.zeros((6, 6))
    values[1:3, 2:5] = 0.001 if mode == "F" else 1
    img = Image.new(mode, (6, 6))
    for (y, x), v in np.ndenumerate(values):
        img.putpixel((x, y), float(v) if mode == "F" else int(v))
    want = (values != 0)[..., None]
    np.testing.assert_array_equal(image_io.load_mask(img, 6), want)
    array = values.astype(np.float32 if mode == "F" else np.uint16)  # arrays of those depths alike
    np.testing.assert_array_equal(image_io.load_mask(array, 6), want)
    if mode == "F":
        values[0, 0] = np.nan
        with pytest.raises(image_io.InputError, match="NaN"):
            image_io.load_mask(values.astype(np.float32), 6)


@pytest.mark.parametrize("value", [-1, 70000])
def test_32_bit_images_outside_16_bit_range_are_refused(value):
    img = Image.new("I", (2, 2))
    img.putpixel((0, 0), value)
    with pytest.raises(image_io.InputError, match="32-bit integer image"):
        image_io.load_image(img, 8)


def test_a_mode_without_a_faithful_conversion_is_refused(monkeypatch):
    img = Image.new("L", (2, 2))
    monkeypatch.setattr(Image.Image, "mode", property(lambda self: "BGR;24"))  # a mode Pillow no longer has
    with pytest.raises(image_io.InputError, match=r"mode 'BGR;24'.*save it as 8-bit RGB"):
        image_io.to_rgb(img)
