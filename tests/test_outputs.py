"""bdjax/outputs.py: provenance in PNG text chunks, captions that wrap instead of being cut, the
captioned grid, strict JSON (non-finite numbers refused) and files that follow the umask. The
launch programs' files are checked in their own tests."""

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

import bdjax
from bdjax import outputs, smoke

RNG = np.random.RandomState(0)
IMAGE = RNG.randint(0, 256, (64, 64, 3), dtype=np.uint8)


def test_provenance_round_trip_keeps_any_prompt_and_the_pixels(tmp_path):
    provenance = {"kind": "sample", "prompt": "赤いボール, un ballon «rouge», мяч", "seed": 7, "sample_id": 3,
                  "distance": 0.8125, "options": {"skip_timesteps": 15, "ddim": False}, "label": smoke.LABEL}
    path = str(tmp_path / "a.png")
    outputs.save_png(path, IMAGE, provenance)
    assert outputs.read_provenance(path) == {**provenance, "bdjax_version": bdjax.__version__}
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), IMAGE)
        im.load()
        assert im.info["Software"] == f"bdjax {bdjax.__version__}"
        assert "prompt: 赤いボール" in im.info["Description"] and smoke.LABEL in im.info["Description"]
        assert "options: skip_timesteps=15, ddim=False" in im.info["Description"]
    # Nothing in the chunks changes between writes: a rerun writes the same bytes.
    outputs.save_png(str(tmp_path / "b.png"), IMAGE, provenance)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # A non-finite distance is stored as null, as in the JSON reports; a foreign PNG has none.
    outputs.save_png(path, IMAGE, {"distance": float("inf")})
    assert outputs.read_provenance(path)["distance"] is None
    Image.fromarray(IMAGE).save(tmp_path / "plain.png")
    assert outputs.read_provenance(str(tmp_path / "plain.png")) == {}


def test_wrap_breaks_long_text_into_lines_that_fit_and_drops_nothing():
    width = 3 * 64 - 2 * outputs.PAD  # the heading of a grid with one result
    lines = outputs.wrap(smoke.LABEL, width)
    assert len(lines) > 1 and all(outputs.FONT.getlength(line) <= width for line in lines)
    assert " ".join(lines) == smoke.LABEL
    word = "x" * 200  # a word wider than the line is cut inside, still whole when joined
    lines = outputs.wrap(f"{word}\nnext", 60)
    assert "".join(lines[:-1]) == word and lines[-1] == "next"
    assert all(outputs.FONT.getlength(line) <= 60 for line in lines)


def test_long_heading_and_captions_are_wrapped_not_cut():
    heading = f"{smoke.LABEL}\n'{'a very long prompt ' * 4}': source, mask, best 1 of 1"
    image = outputs.grid(IMAGE, np.zeros((64, 64), np.uint8), [IMAGE], [0.8123], heading)
    assert image.shape[1] == 3 * 64
    lines = outputs.wrap(heading, image.shape[1] - 2 * outputs.PAD)
    line = outputs.FONT.getbbox("Ag")[3] + outputs.LINE_SPACING
    top = len(lines) * line + outputs.PAD
    notes = max(len(outputs.wrap(c, 64 - 2 * outputs.PAD)) for c in ("source", "mask", outputs.tile_caption(0, 0.8123)))
    assert image.shape[0] == top + 64 + notes * line + outputs.PAD  # heading lines, the tiles, the captions
    assert (image[:top, -outputs.PAD:] == 255).all()  # no text runs into the right edge
    assert not (image[:top] == 255).all(axis=(1, 2))[:line].all()  # ... but there is text


def test_grid_tiles_are_captioned_with_rank_and_distance():
    assert outputs.tile_caption(2, 0.812345) == "#2 d=0.8123"
    images = [IMAGE, 255 - IMAGE]
    with_captions = outputs.grid(IMAGE, np.zeros((64, 64), np.uint8), images, [0.5, 0.75], "")
    notes = max(len(outputs.wrap(outputs.tile_caption(r, d), 64 - 2 * outputs.PAD)) for r, d in ((0, 0.5), (1, 0.75)))
    line = outputs.FONT.getbbox("Ag")[3] + outputs.LINE_SPACING
    assert with_captions.shape == (64 + notes * line + outputs.PAD, 4 * 64, 3)
    assert np.array_equal(with_captions[:64, 2 * 64:3 * 64], IMAGE)  # the tiles are pasted unchanged
    under = with_captions[64:]
    for tile in range(4):  # each tile has text under it, within its own column
        column = under[:, tile * 64:(tile + 1) * 64]
        assert (column != 255).any() and (column[:, -outputs.PAD:] == 255).all()
    # The captions are the ones named: drawing them alone gives the same strip.
    captions = ["source", "mask", outputs.tile_caption(0, 0.5), outputs.tile_caption(1, 0.75)]
    plain = outputs.sheet([np.full_like(IMAGE, 255)] * 4, captions, "")
    assert np.array_equal(plain[64:], under)


def test_sheet_places_tiles_of_different_widths_at_their_offsets():
    narrow, wide = IMAGE[:, :32], IMAGE
    image = outputs.sheet([narrow, wide], ["a", "b"], "", columns=1, offsets=[16, 0])
    cell = 64 + outputs.FONT.getbbox("Ag")[3] + outputs.LINE_SPACING + outputs.PAD
    assert image.shape == (2 * cell, 64, 3)
    assert np.array_equal(image[:64, 16:48], narrow) and (image[:64, :16] == 255).all()
    assert np.array_equal(image[cell:cell + 64], wide)


def test_save_json_refuses_non_finite_numbers(tmp_path):
    for bad in (float("nan"), float("inf"), np.float32("nan"), np.array([1.0, -np.inf])):
        with pytest.raises(outputs.NonFiniteJSONError, match="non-finite"):
            outputs.save_json(str(tmp_path / "r.json"), {"x": [1, {"y": bad}]})
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary
    outputs.save_json(str(tmp_path / "r.json"), outputs.finite_or_none({"x": [np.nan, np.float32(0.5)]}))
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [None, 0.5]}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        outputs.save_png(str(tmp_path / "a.png"), np.zeros((2, 2, 3), np.uint8))
        outputs.save_json(str(tmp_path / "a.json"), {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.png", "a.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def _blank_columns(text: str, font) -> list[int]:
    """The widths of the runs of blank pixel columns between the glyphs of `text` drawn in `font`."""
    from PIL import ImageDraw

    canvas = Image.new("L", (int(font.getlength(outputs.drawable(text, font))) + 8, 40), 0)
    ImageDraw.Draw(canvas).text((4, 4), outputs.drawable(text, font), fill=255, font=font)
    inked = (np.asarray(canvas) > 0).any(axis=0)
    first, last = np.flatnonzero(inked)[[0, -1]]
    runs, width = [], 0
    for column in inked[first:last + 1]:
        if column:
            if width:
                runs.append(width)
            width = 0
        else:
            width += 1
    return runs


def test_caption_spaces_show_in_every_font_captions_may_use(monkeypatch):
    """The words of a caption are visibly apart (a blank gap of 3 pixels or more, wider than any gap
    between the letters of a word) in the font captions use and in both fallbacks; the bitmap
    fallback draws what it cannot as "?" instead of failing."""
    from PIL import ImageFont

    fonts = [outputs.caption_font()]
    truetype = ImageFont.truetype

    def no_system_fonts(font=None, *args, **kwargs):
        if isinstance(font, str):
            raise OSError("cannot open resource")
        return truetype(font, *args, **kwargs)  # Pillow's own font, from memory

    monkeypatch.setattr(ImageFont, "truetype", no_system_fonts)
    fonts.append(outputs.caption_font())  # no system font: Pillow's scalable one

    def no_freetype(size=None):
        raise ImportError("The _imagingft C module is not installed")

    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    fonts.append(outputs.caption_font())  # no FreeType: the bitmap font
    assert [type(f).__name__ for f in fonts] == ["FreeTypeFont", "FreeTypeFont", "ImageFont"]
    for font in fonts:
        within = max(_blank_columns("images", font) + [0])
        gaps = _blank_columns("the images are left d=1.2734", font)
        assert sorted(gaps)[-4:] and min(sorted(gaps)[-4:]) >= max(3, within + 1), (font, gaps)
    assert outputs.drawable("une tasse de café, 日本", fonts[2]) == "une tasse de café, ??"
    monkeypatch.setattr(outputs, "FONT", fonts[2])
    grid = outputs.grid(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8), [np.zeros((16, 16, 3), np.uint8)],
                        [1.0], "'日本の猫': source, mask, best 1 of 1")
    assert grid.shape[1] == 3 * 16


def test_captions_draw_latin_greek_and_cyrillic_where_the_system_has_dejavu():
    """With DejaVu Sans (the font captions use where installed, as on this project's machines),
    accented, Greek and Cyrillic letters are drawn as themselves, not as the missing-glyph box."""
    font = outputs.caption_font()
    assert os.path.basename(font.path) == "DejaVuSans.ttf"
    missing = np.asarray(font.getmask("\U0010fffd"))
    for letter in "éßλЖ":
        assert not np.array_equal(np.asarray(font.getmask(letter)), missing), letter

