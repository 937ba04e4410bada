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
