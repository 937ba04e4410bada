"""Inputs a careless or hostile user may give: rotated phone photos, animations, float TIFFs,
decompression bombs, non-finite or mistyped options, huge sample counts, malformed respacings and
over-long prompts. Each is used correctly or refused with one line naming the fix."""

import dataclasses
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image

from bdjax import diffusion, image_io, tokenizer
from bdjax.options import MAX_NUM_SAMPLES, EditOptions, check_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def upright_photo():
    """12 wide, 8 tall: every orientation mistake shows."""
    return np.random.RandomState(0).randint(0, 256, (8, 12, 3), dtype=np.uint8)


# The pixels as stored for each EXIF orientation, from the upright picture (the EXIF spec's meaning).
STORED = {
    2: lambda a: a[:, ::-1],                      # mirrored left-right
    3: lambda a: a[::-1, ::-1],                   # rotated 180
    4: lambda a: a[::-1],                         # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),            # transposed
    6: lambda a: np.rot90(a, 1),                  # a phone held upright: shown turned 90 clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),                 # shown turned 90 counter-clockwise
}


def save_with_orientation(path, pixels, orientation, **kw):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, exif=exif, **kw)
    return str(path)


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, orientation):
    upright = upright_photo()
    path = save_with_orientation(tmp_path / "photo.png", STORED[orientation](upright), orientation)
    pil = image_io.to_pil(path, "image")
    assert pil.size == (12, 8)
    np.testing.assert_array_equal(np.asarray(pil.convert("RGB")), upright)
    np.testing.assert_array_equal(image_io.load_image(path, 16), image_io.load_image(upright, 16))
    with Image.open(path) as opened:  # a PIL image passed in is turned too
        np.testing.assert_array_equal(image_io.load_image(opened, 16), image_io.load_image(upright, 16))

    mask = np.zeros((8, 12), np.uint8)
    mask[:3, :4] = 255  # the top-left corner of the upright picture
    mask_path = save_with_orientation(tmp_path / "mask.png", STORED[orientation](mask[..., None])[..., 0],
                                      orientation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # upright image and upright mask have the same size
        got = image_io.load_mask(mask_path, 12, image_size=pil.size)
    want = image_io.load_mask(mask, 12)
    np.testing.assert_array_equal(got, want)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    upright = np.zeros((32, 48, 3), np.uint8)
    upright[:16, :24] = (255, 0, 0)  # red top-left quadrant, the rest black
    path = save_with_orientation(tmp_path / "phone.jpg", STORED[6](upright), 6, quality=95)
    got = np.asarray(image_io.to_pil(path, "image").convert("RGB"), np.int32)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 4 and np.abs(got[4:12, 4:20] - upright[4:12, 4:20]).max() < 16


def test_float_tiff_in_unit_range_is_scaled_not_black(tmp_path):
    values = np.linspace(0, 1, 10 * 14, dtype=np.float32).reshape(10, 14)
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    got = image_io.load_image(str(tmp_path / "float.tif"), 14)
    want = image_io.load_image(np.round(values * 255).astype(np.uint8), 14)
    np.testing.assert_array_equal(got, want)
    assert got.max() == 1.0 and got.min() == -1.0

    Image.fromarray(values * 255).save(tmp_path / "float255.tif")  # floats in 0..255: refused, not clipped
    with pytest.raises(image_io.InputError, match=r"float255.tif.*\[0, 255\].*\[0, 1\]"):
        image_io.load_image(str(tmp_path / "float255.tif"), 14)


FIRST_FRAME = np.zeros((6, 10, 3), np.uint8)
FIRST_FRAME[:, 5:] = (255, 0, 0)  # black left half, red right half; the second frame is all blue


def two_frames(path):
    blue = Image.new("RGB", (10, 6), (0, 0, 255))
    Image.fromarray(FIRST_FRAME).save(path, save_all=True, append_images=[blue], duration=100)
    return str(path)


@pytest.mark.parametrize("suffix", ["gif", "png", "tiff"])
def test_animated_or_multipage_file_warns_and_uses_its_first_frame(tmp_path, suffix):
    path = two_frames(tmp_path / f"anim.{suffix}")
    assert Image.open(path).n_frames == 2
    with pytest.warns(UserWarning, match=r"anim.* has 2 frames.*only its first frame is used") as caught:
        pil = image_io.to_pil(path, "image")
        image = image_io.load_image(pil, 8)  # the editor's path: the warning is given once
    assert len(caught) == 1
    np.testing.assert_array_equal(image, image_io.load_image(FIRST_FRAME, 8))
    with pytest.warns(UserWarning, match="mask .* first frame"):
        mask = image_io.load_mask(path, 10)
    np.testing.assert_array_equal(mask[..., 0], np.broadcast_to(np.arange(10) >= 5, (10, 10)))

    with Image.open(path) as opened:  # a PIL image on frame 1: frame 0 is used, the image stays on frame 1
        opened.seek(1)
        with pytest.warns(UserWarning, match="first frame"):
            np.testing.assert_array_equal(image_io.load_image(opened, 8), image)
        assert opened.tell() == 1


def write_bomb_png(path, width=100_000, height=100_000):
    """A valid PNG header declaring width x height 8-bit grey pixels, with a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("pillow_limit", ["default", "none"])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, pillow_limit):
    if pillow_limit == "none":  # bdjax's own limit holds even where Pillow's check is switched off
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert os.path.getsize(bomb) < 200
    with pytest.raises(image_io.InputError, match=r"image .*bomb.png is too large to decode.*downscale") as caught:
        image_io.load_image(bomb, 16)
    assert "\n" not in str(caught.value)
    with pytest.raises(image_io.InputError, match=r"mask .*bomb.png is too large to decode"):
        image_io.load_mask(bomb, 16)
    just_over = write_bomb_png(tmp_path / "over.png", image_io.MAX_PIXELS // 10_000 + 1, 10_000)
    with pytest.raises(image_io.InputError, match="too large to decode"):
        image_io.to_pil(just_over, "image")
    if pillow_limit == "none":  # a lazily opened PIL image is checked before it is decoded too
        with Image.open(bomb) as opened, pytest.raises(image_io.InputError, match="100000x100000 pixels"):
            image_io.load_image(opened, 16)


def test_empty_paths_and_images_are_refused():
    with pytest.raises(image_io.InputError, match="the mask path is empty"):
        image_io.load_mask("", 16)
    with pytest.raises(image_io.InputError, match=r"image is empty \(0x3 pixels\)"):
        image_io.load_image(np.zeros((3, 0, 3), np.uint8), 16)


FLOAT_OPTIONS = [f.name for f in dataclasses.fields(EditOptions) if f.type == "float"]


def test_every_float_option_refuses_non_finite_values():
    assert "clip_guidance_lambda" in FLOAT_OPTIONS and len(FLOAT_OPTIONS) >= 4
    for name in FLOAT_OPTIONS:
        for value in (float("nan"), float("inf"), -float("inf"), np.float32("nan"), 10 ** 400):
            with pytest.raises(ValueError, match=rf"^{name}=\S+ must be a finite number$"):
                EditOptions(**{name: value}).validate()
        EditOptions(**{name: -3}).validate()  # ints are floats; signs are the user's business, as in the reference


@pytest.mark.parametrize("name, value", [
    ("skip_timesteps", 25.0), ("skip_timesteps", True), ("aug_num", "8"), ("batch_size", 2.5),
    ("ddim", 1), ("timestep_respacing", 100), ("clip_guidance_lambda", "1000"), ("range_lambda", False),
])
def test_options_of_the_wrong_type_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name}=.* should be of type "):
        EditOptions(**{name: value}).validate()


def test_num_samples_is_bounded_and_requests_are_typed():
    check_request(MAX_NUM_SAMPLES, 0)
    check_request(np.int64(3), np.int32(5))
    with pytest.raises(ValueError, match=rf"^num_samples=1000000000 is more than {MAX_NUM_SAMPLES:,}.*several runs"):
        check_request(10 ** 9, 0)  # the launch programs name it as the flag (test_launch_edit)
    with pytest.raises(ValueError, match="num_samples=100001 is more than"):
        check_request(MAX_NUM_SAMPLES + 1, 0)
    for num_samples, seed in ((2.0, 0), (True, 0), ("4", 0), (4, 1.5), (4, False)):
        with pytest.raises(ValueError, match="should be an integer"):
            check_request(num_samples, seed)
    with pytest.raises(ValueError, match=r"seed=-1 must be in \[0, 2\*\*31\)"):
        check_request(4, -1)


@pytest.mark.parametrize("respacing, why", [
    ("0", "keeps no step"), ("0,0", "keeps no step"), ("-5", "is not a step count"), ("ddim", "needs a step count"),
    ("ddimX", "needs a step count"), ("ddim0", "keeps no step"), ("ddim-3", "needs a step count"),
    ("10,,20", "is not a step count"), (" 100 ", "is not a step count"), ("1_000", "is not a step count"),
    ("100,", "is not a step count"), ("fast", "is not a step count"), ("2000", "asks for 2000 steps"),
    ("ddim400", "integer stride"),
])
def test_bad_respacing_names_the_value_and_the_valid_forms(respacing, why):
    for check in (lambda: diffusion.space_timesteps(1000, respacing),
                  lambda: EditOptions(timestep_respacing=respacing, skip_timesteps=15).validate()):
        with pytest.raises(ValueError) as caught:
            check()
        message = str(caught.value)
        assert message.startswith(f"timestep_respacing={respacing!r} ") and why in message, message
        assert "'100'" in message and "'10,20,30'" in message and "'ddim50'" in message
        assert "skip_timesteps" not in message


def test_good_respacings_still_parse():
    assert len(diffusion.space_timesteps(1000, "")) == 1000  # the reference's "no respacing"
    assert len(diffusion.space_timesteps(1000, "10,0,20")) == 30  # an empty middle section, as the reference
    assert len(diffusion.space_timesteps(1000, "ddim50")) == 50


def test_a_78_token_prompt_says_how_to_fix_it():
    prompt = "a " * 76  # 78 tokens with start and end
    with pytest.raises(ValueError) as caught:
        tokenizer.tokenize(prompt)
    message = str(caught.value)
    assert "78 tokens" in message and "77" in message and "shorten the prompt" in message
    assert "truncate" not in message and "\n" not in message and len(message) < 300
    assert tokenizer.tokenize("a " * 75).shape == (1, 77)


def test_a_manifest_line_with_hostile_values_is_refused_alone(tmp_path):
    from bdjax import batch

    Image.fromarray(upright_photo()).save(tmp_path / "img.png")
    good = '{"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0'
    def count(n):
        return good.replace('"num_samples": 1', f'"num_samples": {n}') + "}"
    lines = [good + "}", good + ', "clip_guidance_lambda": NaN}', count("1e9"), count("1000000000"),
             good + ', "timestep_respacing": "ddim"}', good + ', "name": "last"}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    jobs, errors = batch.read_manifest(str(tmp_path / "m.jsonl"), 16, EditOptions())
    assert [j.line for j in jobs] == [1, 6]
    reasons = {e.line: e.reason for e in errors}
    assert reasons[2] == "clip_guidance_lambda=nan must be a finite number"
    assert "num_samples=1000000000.0 should be of type int" in reasons[3]
    assert f"num_samples=1000000000 is more than {MAX_NUM_SAMPLES:,}" in reasons[4]
    assert reasons[5].startswith("timestep_respacing='ddim' needs a step count")


def test_launch_edit_refuses_each_hostile_input_before_loading_networks(tmp_path):
    """exit status 2, one line starting with "error:", and the output directory untouched."""
    image = tmp_path / "img.png"
    Image.fromarray(upright_photo()).save(image)
    bomb = write_bomb_png(tmp_path / "bomb.png")
    Image.fromarray(np.full((8, 12), 255, np.float32)).save(tmp_path / "float255.tif")
    frames = [Image.fromarray(np.full((8, 12, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(tmp_path / "empty_mask.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    cases = [
        # The animated image's warning is held back: the refused run prints only its error.
        ([f"--init_image={tmp_path / 'animated.gif'}", f"--mask={tmp_path / 'empty_mask.png'}"],
         "the mask selects no pixel to edit"),
        (["--clip_guidance_lambda=nan"], "clip_guidance_lambda=nan must be a finite number"),
        (["--l2_sim_lambda=-inf"], "l2_sim_lambda=-inf must be a finite number"),
        (["--num_samples=1000000000"], f"--num_samples=1000000000 is more than {MAX_NUM_SAMPLES:,}"),
        ([f"--init_image={bomb}"], "too large to decode"),
        ([f"--mask={bomb}"], "too large to decode"),
        ([f"--init_image={tmp_path / 'float255.tif'}"], "[0, 1]"),
        (["--timestep_respacing=ddim"], "timestep_respacing='ddim' needs a step count"),
        (["--timestep_respacing=0"], "timestep_respacing='0' keeps no step"),
        (["--prompt=" + "a " * 76], "shorten the prompt"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "launch.edit", "--config=smoke", "--prompt=x", f"--init_image={image}",
             f"--output_dir={out}", f"--compilation_cache_dir={tmp_path / 'xla'}", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, proc.stderr)
        assert "truncate" not in lines[0]
        assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "the user's file"
        assert not (tmp_path / "xla").exists()  # stopped before anything was compiled
