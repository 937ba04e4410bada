"""The quality scores (bdjax/scores.py) on cases whose answers are known, and ranking by them.

The networks are the smoke preset's (random CLIP and LPIPS of the real architectures): the CLIP
scores' values mean nothing there, but PSNR, LPIPS of identical images, the seam ratio and the
ranking are exact properties that hold for any weights.
"""

import dataclasses

import jax
import numpy as np
import pytest

from bdjax import outputs, scores, smoke
from bdjax.blended import Models
from bdjax.options import EditOptions, OptionError

SIZE = 64


@pytest.fixture(scope="module")
def nets():
    n = smoke.networks(with_lpips=True)
    models = Models(unet=n["unet"][0], clip=n["clip"][0], lpips=n["lpips"][0])
    params = {"clip": n["clip"][1], "lpips": n["lpips"][1]}
    score = jax.jit(lambda p, images, init, mask, text: scores.score_images(models, p, images, init, mask, text))
    return {"models": models, "params": params, "score": score}


def square_mask(size=SIZE, lo=16, hi=48):
    mask = np.zeros((size, size, 1), np.float32)
    mask[lo:hi, lo:hi] = 1
    return mask


def run_scores(nets, images, source, mask):
    """Scores of images [n, S, S, 3] in [0, 1] against `source` [S, S, 3] in [0, 1]."""
    n = len(images)
    text = np.ones((n, nets["models"].clip.embed_dim), np.float32)
    init = np.broadcast_to(source * 2 - 1, (n, *source.shape)).astype(np.float32)
    out = nets["score"](nets["params"], np.asarray(images, np.float32), init,
                        np.broadcast_to(mask, (n, *mask.shape)), text)
    return {k: np.asarray(v) for k, v in out.items()}


def textured(seed=0, size=SIZE):
    return (np.random.default_rng(seed).integers(0, 256, (size, size, 3)) / 255).astype(np.float32)


def test_a_result_equal_to_its_input_has_the_highest_psnr_and_no_lpips_outside_the_mask(nets):
    source = textured()
    edited = source.copy()
    edited[16:48, 16:48] = textured(1)[16:48, 16:48]  # only inside the mask changes
    got = run_scores(nets, np.stack([source, edited]), source, square_mask())
    np.testing.assert_array_equal(got["background_psnr"], [scores.PSNR_CAP, scores.PSNR_CAP])
    np.testing.assert_array_equal(got["background_lpips"], [0.0, 0.0])  # identical backgrounds, bit for bit
    assert set(got) == set(scores.NAMES) and all(np.isfinite(v).all() for v in got.values())


def test_background_psnr_is_the_psnr_of_the_pixels_outside_the_mask(nets):
    source = np.full((SIZE, SIZE, 3), 100 / 255, np.float32)
    moved = source + 10 / 255  # every background pixel off by 10 levels: MSE = (10/255)^2
    moved[16:48, 16:48] = 0  # inside the mask: not counted
    got = run_scores(nets, moved[None], source, square_mask())
    assert got["background_psnr"][0] == pytest.approx(20 * np.log10(255 / 10), abs=1e-3)
    assert got["background_lpips"][0] > 0  # a changed background is seen by LPIPS too (any weights)


def test_a_hard_step_at_the_mask_edge_is_a_worse_seam_than_the_same_square_feathered(nets):
    source = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    red = np.array([1.0, 0.0, 0.0], np.float32)
    hard = source.copy()
    hard[16:48, 16:48] = red
    # The same red square, reached through a ramp over the 8 pixels inside the mask's edge.
    y, x = np.mgrid[:SIZE, :SIZE]
    depth = np.minimum.reduce([y - 15, 48 - y, x - 15, 48 - x])  # 1 on the mask's edge pixels, inwards
    alpha = np.clip(depth / 8, 0, 1)[..., None] * square_mask()
    feathered = source * (1 - alpha) + red * alpha
    got = run_scores(nets, np.stack([hard, feathered, source]), source, square_mask())
    hard_seam, feathered_seam, untouched = got["seam"]
    assert hard_seam > 10 * feathered_seam, got["seam"]
    assert untouched == pytest.approx(1.0)  # flat everywhere: no step anywhere, the ratio of the epsilons


def test_an_untouched_textured_photo_has_a_seam_near_one(nets):
    """Across the boundary and beside it the photo's steps have the same statistics: ratio ~ 1."""
    source = textured(3)
    got = run_scores(nets, source[None], source, square_mask())
    assert 0.8 < got["seam"][0] < 1.25, got["seam"]


def test_scores_that_do_not_apply_are_nan(nets):
    everything = np.ones((SIZE, SIZE, 1), np.float32)
    got = run_scores(nets, textured(1)[None], textured(0), everything)
    assert np.isnan(got["background_psnr"][0])  # no pixel outside the mask
    assert np.isnan(got["seam"][0])  # no boundary
    assert scores.row(got, 0)["seam"] is None and scores.short(scores.row(got, 0)).startswith("whole ")


def test_diversity_is_zero_for_identical_results_and_positive_for_different_ones(nets):
    diversity = jax.jit(lambda p, images, mask: scores.diversity(nets["models"], p, images, mask))
    same = np.stack([textured(1)] * 3)
    assert float(diversity(nets["params"], same, square_mask())) == 0.0
    different = np.stack([textured(1), textured(2), textured(3)])
    assert float(diversity(nets["params"], different, square_mask())) > 0
    # Outside the mask differences do not count: results that differ only there are "identical".
    outside_only = same.copy()
    outside_only[1, :8] = 0
    assert float(diversity(nets["params"], outside_only, square_mask())) == 0.0


def test_rank_by_orders_by_its_definition_and_combined_is_the_stated_sum():
    table = {"clip_masked": np.array([1.0, 1.1, 1.2]), "clip_whole": np.array([1.5, 1.3, 1.4]),
             "seam": np.array([np.e, 1.0, np.nan]), "background_lpips": np.array([0.0, 0.5, np.nan]),
             "background_psnr": np.array([100.0, 30.0, np.nan])}
    by = lambda **o: np.argsort(scores.rank_values(table, EditOptions(**o)), kind="stable").tolist()  # noqa: E731
    assert by() == [0, 1, 2] == np.argsort(scores.rank_values(table)).tolist()  # the reference's, the default
    assert by(rank_by="clip_whole") == [1, 2, 0]
    weights = dict(rank_by="combined", rank_whole_weight=2.0, rank_seam_weight=0.5, rank_background_weight=0.1)
    want = np.array([1.0 + 2 * 1.5 + 0.5 * 1.0 + 0.0, 1.1 + 2 * 1.3 + 0 + 0.1 * 0.5, 1.2 + 2 * 1.4])  # NaN terms: 0
    np.testing.assert_allclose(scores.rank_values(table, EditOptions(**weights)), want)
    assert by(**weights) == [1, 2, 0]
    with pytest.raises(OptionError, match="rank_by='best' must be one of clip_masked, clip_whole, combined"):
        EditOptions(rank_by="best").validate()


def test_aggregates_follow_each_scores_direction():
    rows = [{"clip_masked": 1.0, "background_psnr": 30.0, "seam": None}, {"clip_masked": 2.0, "background_psnr": 40.0}]
    got = scores.aggregate(rows)
    assert got["clip_masked"] == {"mean": 1.5, "median": 1.5, "best": 1.0, "n": 2}
    assert got["background_psnr"]["best"] == 40.0 and got["seam"] is None


class Batch:
    """An EditBatch as EditWriter reads it."""

    def __init__(self, table, size=8):
        n = len(table["clip_masked"])
        self.sample_ids = np.arange(n)
        self.images = np.zeros((n, size, size, 3), np.uint8) + np.arange(n)[:, None, None, None].astype(np.uint8)
        self.distances = np.asarray(table["clip_masked"], np.float32)
        self.finite = np.ones(n, bool)
        self.scores = {k: np.asarray(v, np.float32) for k, v in table.items()}


def written(tmp_path, options):
    table = {"clip_masked": [1.3, 1.2, 1.1], "clip_whole": [1.0, 1.5, 1.6], "background_psnr": [100.0] * 3,
             "background_lpips": [0.0] * 3, "seam": [1.0, 1.0, 1.0]}
    writer = outputs.EditWriter(str(tmp_path), 7, {"prompt": "p"}, options=options)
    writer.add(Batch(table))
    ranked = writer.finish(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), "p", {})
    import json

    with open(tmp_path / outputs.REPORT) as f:
        return ranked, json.load(f)


def test_the_writer_ranks_as_asked_and_keeps_the_reference_naming_and_order_by_default(tmp_path):
    ranked, report = written(tmp_path / "default", None)
    assert [s["sample_id"] for s in report["samples"]] == [2, 1, 0]  # by clip_masked, as before
    assert [p.rsplit("/", 1)[1] for p in ranked] == ["000_1.1000.png", "001_1.2000.png", "002_1.3000.png"]
    assert report["rank_by"] == "clip_masked"
    ranked, report = written(tmp_path / "whole", EditOptions(rank_by="clip_whole"))
    assert [s["sample_id"] for s in report["samples"]] == [0, 1, 2]
    assert [p.rsplit("/", 1)[1] for p in ranked] == ["000_1.0000.png", "001_1.5000.png", "002_1.6000.png"]
    first = report["samples"][0]
    assert (first["distance"], first["rank_value"]) == (pytest.approx(1.3), pytest.approx(1.0))
    assert report["rank_by"] == "clip_whole" and report["aggregates"]["clip_whole"]["best"] == pytest.approx(1.0)
    about = outputs.read_provenance(ranked[0])
    assert about["scores"]["clip_whole"] == pytest.approx(1.0) and about["distance"] == pytest.approx(1.3)


@pytest.fixture(scope="module")
def editor():
    return smoke.editor(with_lpips=True)


def test_an_edit_returns_scores_and_rank_by_reorders_the_same_samples_without_recompiling(editor):
    image = (textured(5, 96) * 255).astype(np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[30:70, 20:60] = 255
    common = dict(num_samples=3, seed=3, progress=False, skip_timesteps=20)
    default = editor.edit(image, mask, "a red ball", **common)
    assert set(default.scores) == set(scores.NAMES)
    np.testing.assert_array_equal(default.scores["clip_masked"], default.distances)
    assert (np.diff(default.distances) >= 0).all()  # the reference's order, unchanged
    assert (default.scores["background_psnr"] == scores.PSNR_CAP).all()  # the background is pasted
    assert (default.scores["background_lpips"] == 0).all()
    assert default.diversity is not None and default.diversity > 0
    whole = editor.edit(image, mask, "a red ball", rank_by="clip_whole", **common)
    assert (np.diff(whole.scores["clip_whole"]) >= 0).all()
    def by_id(result):
        return {int(k): (float(d), result.images[i].tobytes())
                for i, (k, d) in enumerate(zip(result.sample_ids, result.distances))}
    assert by_id(whole) == by_id(default)  # the same samples, ranked otherwise
    assert len(editor._samplers) == 1  # the ranking options do not make another sampler
    loose = editor.edit(image, mask, "a red ball", enforce_background=False, **common)
    assert (loose.scores["background_psnr"] < scores.PSNR_CAP).all()  # the model's own background: measured


def test_scores_of_written_results_reproduce_the_sampler_s(editor):
    """`editor.score` on the 8-bit crops gives the sampler's scores; clip_masked (computed by
    the sampler before rounding) within 1e-3, the others to float tolerance."""
    image = (textured(6, 80) * 255).astype(np.uint8)
    mask = np.zeros((80, 80), np.uint8)
    mask[20:50, 30:60] = 255
    request = editor.prepare(image, mask, "a cat", num_samples=2, seed=1, skip_timesteps=20)
    result = editor.edit(request, progress=False)
    got = editor.score(result.crops, request.inputs.init, request.inputs.region,
                       np.asarray(editor.encode_prompt("a cat")), rows=3)
    np.testing.assert_allclose(got["clip_masked"], result.scores["clip_masked"], atol=1e-3)
    for name in ("clip_whole", "background_psnr", "background_lpips", "seam"):
        np.testing.assert_allclose(got[name], result.scores[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_combined_without_lpips_weights_is_refused_in_one_line():
    editor = smoke.editor(with_lpips=False)
    with pytest.raises(ValueError, match="rank_by=combined weighs background_lpips.*rank_background_weight=0"):
        editor.options(rank_by="combined")
    assert editor.options(rank_by="combined", rank_background_weight=0.0).rank_by == "combined"
    assert editor.diversity(np.zeros((2, SIZE, SIZE, 3), np.uint8), square_mask()) is None


def test_sampling_options_drop_only_the_ranking():
    options = EditOptions(rank_by="combined", rank_seam_weight=3.0, aug_num=2)
    assert options.sampling == EditOptions(aug_num=2)
    assert dataclasses.replace(options.sampling, rank_by="combined", rank_seam_weight=3.0) == options
