"""The mask of an image editor's value (bdjax/painting.py): painted layers, erased strokes, an
uploaded mask instead, inversion, and the one-line errors; then through request.prepare as the
app runs it, and through Gradio's own ImageEditor preprocessing."""

import numpy as np
import pytest
from PIL import Image

from bdjax import image_io, painting, request
from bdjax.options import EditOptions

H, W = 30, 40


def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    image[..., 3] = 255
    return image


def layer(boxes=(), erased=(), alpha=153) -> np.ndarray:
    """An RGBA layer painted (pink at `alpha`) in `boxes`, then erased (alpha 0) in `erased`;
    boxes are (top, bottom, left, right)."""
    out = np.zeros((H, W, 4), np.uint8)
    for top, bottom, left, right in boxes:
        out[top:bottom, left:right] = (255, 0, 160, alpha)
    for top, bottom, left, right in erased:
        out[top:bottom, left:right, 3] = 0
    return out


def expected(boxes=(), erased=()) -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    for top, bottom, left, right in boxes:
        out[top:bottom, left:right] = 255
    for top, bottom, left, right in erased:
        out[top:bottom, left:right] = 0
    return out


def test_the_painted_pixels_are_the_mask_at_the_photos_size():
    value = {"background": photo(), "layers": [layer([(5, 15, 10, 30)])], "composite": None}
    painted = painting.from_editor(value)
    np.testing.assert_array_equal(painted.image, value["background"][..., :3])  # opaque: its alpha dropped
    np.testing.assert_array_equal(painted.mask, expected([(5, 15, 10, 30)]))


def test_the_photo_is_passed_on_at_full_size_keeping_real_transparency():
    see_through = photo()
    see_through[:5, :5, 3] = 0
    for background in (see_through, Image.fromarray(see_through), Image.fromarray(photo()[..., :3])):
        assert painting.from_editor({"background": background, "layers": [layer([(0, 5, 0, 5)])]}).image \
            is background
    opaque = painting.from_editor({"background": Image.fromarray(photo()), "layers": [layer([(0, 5, 0, 5)])]})
    assert opaque.image.mode == "RGB" and opaque.image.size == (W, H)
    np.testing.assert_array_equal(np.asarray(opaque.image), photo()[..., :3])
    grey = np.stack([photo()[..., 0], np.full((H, W), 255, np.uint8)], axis=-1)  # LA
    np.testing.assert_array_equal(painting.opaque_as_rgb(grey), photo()[..., 0])


def test_a_large_photo_painted_on_a_downscaled_canvas_is_edited_at_full_size():
    """An editor that paints at half the photo's size (1600 x 900 shown as 800 x 450): the mask is
    at the photo's full size, the stroke where it was drawn, and window mode gets the photo at full
    resolution: the window is cut around the stroke's place in the full-size photo."""
    big = np.zeros((900, 1600, 4), np.uint8)
    big[..., 0] = np.arange(1600) % 256
    big[..., 1] = (np.arange(900) % 256)[:, None]
    big[..., 3] = 255
    small = np.zeros((450, 800, 4), np.uint8)
    small[100:150, 200:300] = (255, 0, 160, 153)  # rows 200-300, columns 400-600 of the photo
    painted = painting.from_editor({"background": big, "layers": [small], "composite": None})
    assert painted.image.shape == (900, 1600, 3)
    full = np.zeros((900, 1600), np.uint8)
    full[200:300, 400:600] = 255
    np.testing.assert_array_equal(painted.mask, full)

    prepared = request.prepare(painted.image, painted.mask, "a cat", num_samples=1, seed=0,
                               options=EditOptions(timestep_respacing="25", skip_timesteps=15), image_size=256)
    np.testing.assert_array_equal(prepared.full_source, big[..., :3])
    np.testing.assert_array_equal(prepared.full_mask, full)
    window = prepared.inputs.window
    assert window.side == 400 and window.box == (300, 50, 700, 450)  # 200 pixels and half of that each side
    # What the model sees: the window's crop of the full-size photo (the gradient's values there).
    assert abs(int(prepared.source[0, 0, 0]) - 300 % 256) <= 8 and abs(int(prepared.source[0, 0, 1]) - 50) <= 8


def test_any_alpha_counts_as_painted_and_colour_does_not_matter():
    faint = layer([(0, 3, 0, 3)], alpha=1)
    black = np.zeros((H, W, 4), np.uint8)
    black[20:25, 20:25, 3] = 255  # opaque black paint
    mask = painting.painted_mask(photo(), [faint, black])
    np.testing.assert_array_equal(mask, expected([(0, 3, 0, 3), (20, 25, 20, 25)]))


def test_erased_strokes_are_not_in_the_mask():
    value = {"background": photo(), "layers": [layer([(5, 25, 5, 35)], erased=[(10, 20, 10, 20)])]}
    np.testing.assert_array_equal(painting.from_editor(value).mask,
                                  expected([(5, 25, 5, 35)], erased=[(10, 20, 10, 20)]))


def test_every_layer_adds_to_the_mask():
    value = {"background": photo(), "layers": [layer([(0, 5, 0, 5)]), None, layer([(20, 30, 30, 40)])]}
    np.testing.assert_array_equal(painting.from_editor(value).mask, expected([(0, 5, 0, 5), (20, 30, 30, 40)]))


def test_layers_without_alpha_and_of_another_size():
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0:10, 0:20, 1] = 200
    grey = np.zeros((H // 2, W // 2), np.uint8)  # half size: resized with nearest neighbour
    grey[10:15, 10:20] = 1
    mask = painting.painted_mask(Image.fromarray(photo()), [rgb, Image.fromarray(grey)])
    np.testing.assert_array_equal(mask, expected([(0, 10, 0, 20), (20, 30, 20, 40)]))


def test_nothing_painted_or_everything_erased_is_a_one_line_error():
    for layers in ([], [layer()], [layer([(5, 15, 5, 15)], erased=[(0, 30, 0, 40)])]):
        with pytest.raises(image_io.InputError, match="^the mask is empty: paint over the region to change") as e:
            painting.from_editor({"background": photo(), "layers": layers})
        assert "\n" not in str(e.value)
    with pytest.raises(image_io.InputError, match="paint over what to keep"):
        painting.from_editor({"background": photo(), "layers": []}, invert_mask=True)


def test_no_photo_is_a_one_line_error():
    for value in (None, {"background": None, "layers": [layer([(0, 5, 0, 5)])], "composite": None}):
        with pytest.raises(image_io.InputError, match="^no image: upload a photo"):
            painting.from_editor(value)


def test_an_uploaded_mask_is_used_instead_of_painting(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(expected([(2, 12, 3, 33)])).save(path)
    value = {"background": photo(), "layers": [layer()]}  # an empty layer: nothing painted
    painted = painting.from_editor(value, str(path))
    assert painted.mask == str(path)
    with pytest.raises(image_io.InputError, match="both painted and uploaded: clear the painting or remove"):
        painting.from_editor({"background": photo(), "layers": [layer([(0, 5, 0, 5)])]}, str(path))


@pytest.mark.parametrize("fit", ["window", "stretch"])
@pytest.mark.parametrize("invert", [False, True])
def test_prepared_as_the_app_prepares_it(tmp_path, invert, fit):
    """The painting and an uploaded file of the same mask give the same request: in window mode
    the same mask at the photo's size (and the same window), with fit=stretch the same mask at
    the model size; invert_mask edits exactly the unpainted pixels."""
    boxes = [(4, 20, 8, 32)]
    path = tmp_path / "mask.png"
    Image.fromarray(expected(boxes)).save(path)
    options = EditOptions(timestep_respacing="25", skip_timesteps=15)
    prepared = []
    for value, upload in (({"background": photo(), "layers": [layer(boxes)]}, None),
                          ({"background": photo(), "layers": []}, str(path))):
        painted = painting.from_editor(value, upload, invert_mask=invert)
        prepared.append(request.prepare(painted.image, painted.mask, "a cat", num_samples=1, seed=0,
                                        invert_mask=invert, options=options, image_size=16, fit=fit))
    painted_request, uploaded_request = prepared
    np.testing.assert_array_equal(painted_request.mask, uploaded_request.mask)
    np.testing.assert_array_equal(painted_request.full_mask, uploaded_request.full_mask)
    mask = painted_request.mask
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    if fit == "window":
        assert painted_request.inputs.window == uploaded_request.inputs.window
        np.testing.assert_array_equal(painted_request.full_source, photo()[..., :3])
        full = expected(boxes) > 0
        np.testing.assert_array_equal(painted_request.full_mask > 0, ~full if invert else full)
    else:
        direct = np.asarray(Image.fromarray(expected(boxes)).resize((16, 16), Image.NEAREST)) > 0
        np.testing.assert_array_equal(mask > 0, ~direct if invert else direct)


def test_gradio_image_editor_values(tmp_path):
    """The value Gradio's ImageEditor hands the app (type numpy, RGBA, PNG files as the browser
    sends them) gives the painted mask, erased pixels excluded."""
    import gradio as gr  # the web app's extra, part of the test extra
    from gradio.data_classes import FileData
    from gradio.components.image_editor import EditorData

    files = {}
    for name, array in (("background", photo()), ("layer", layer([(3, 27, 6, 36)], erased=[(10, 12, 0, 40)])),
                        ("composite", photo())):
        files[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(array).save(files[name])
    component = gr.ImageEditor(type="numpy", image_mode="RGBA", format="png")
    value = component.preprocess(EditorData(background=FileData(path=files["background"]),
                                            layers=[FileData(path=files["layer"])],
                                            composite=FileData(path=files["composite"])))
    painted = painting.from_editor(value)
    np.testing.assert_array_equal(painted.mask, expected([(3, 27, 6, 36)], erased=[(10, 12, 0, 40)]))
    np.testing.assert_array_equal(np.asarray(painted.image)[..., :3], photo()[..., :3])


def test_a_framed_photo_gets_a_transparent_margin_and_a_stroke_begun_there_paints_its_part():
    """framed() puts the photo in a transparent margin; a stroke painted from the margin onto the
    photo (as a user starts one beside the photo) counts where it is on the photo, from its edge."""
    value, frame = painting.framed(Image.fromarray(photo()[..., :3]))
    m = painting.margin_for((W, H))
    assert m == painting.MIN_MARGIN and frame == {"margin": m, "width": W, "height": H}
    canvas = value["background"]
    assert canvas.shape == (H + 2 * m, W + 2 * m, 4) and [layer.shape for layer in value["layers"]] == [canvas.shape]
    assert not canvas[:m].any() and not canvas[:, :m].any() and (canvas[m:m + H, m:m + W, 3] == 255).all()
    np.testing.assert_array_equal(canvas[m:m + H, m:m + W, :3], photo()[..., :3])
    stroke = np.zeros_like(canvas)
    stroke[m + 10:m + 14, 2:m + 6] = (255, 0, 160, 153)  # begun in the margin, 6 pixels onto the photo
    painted = painting.from_editor({**value, "layers": [stroke]}, frame=frame)
    np.testing.assert_array_equal(painted.image, photo()[..., :3])  # the photo, its margin cut off
    np.testing.assert_array_equal(painted.mask, expected([(10, 14, 0, 6)]))
    # A large photo's margin is a fraction of its long side.
    assert painting.margin_for((1600, 900)) == round(painting.MARGIN_FRACTION * 1600)


def test_a_frame_that_is_not_the_editors_photo_is_ignored():
    """Another image put into the editor since (a size that differs, or a margin that is not
    transparent) is taken as it is."""
    value, frame = painting.framed(photo())
    other = {"background": photo(), "layers": [layer([(0, 5, 0, 5)])]}
    assert not painting.is_framed(photo(), frame)
    np.testing.assert_array_equal(painting.from_editor(other, frame=frame).mask, expected([(0, 5, 0, 5)]))
    filled = value["background"].copy()
    filled[0, 0, 3] = 255  # an opaque pixel in the margin: not the framed photo
    assert painting.is_framed(value["background"], frame) and not painting.is_framed(filled, frame)
    assert painting.from_editor({"background": filled, "layers": [np.full_like(filled, 255)]},
                                frame=frame).mask.shape == filled.shape[:2]


def test_grow_widens_the_mask_by_euclidean_distance():
    mask = np.zeros((21, 21), np.uint8)
    mask[10, 10] = 255
    grown = painting.grow(mask, 3) > 0
    ys, xs = np.nonzero(grown)
    assert ((ys - 10) ** 2 + (xs - 10) ** 2 <= 9).all() and grown.sum() == 29  # the lattice points of a disc
    np.testing.assert_array_equal(painting.grow(mask, 0), mask)
    for bad in (-1, painting.MAX_GROW + 1, 1.5, True):
        with pytest.raises(image_io.InputError, match="grow must be a whole number of pixels"):
            painting.grow(mask, bad)
