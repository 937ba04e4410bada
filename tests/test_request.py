"""The prepared request (bdjax/request.py): inputs decoded, prompts tokenized and options checked
once, from the launch preflight through the editor, in batch jobs and in extrapolation rounds."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from bdjax import batch, extrapolate, image_io, outputs, request, smoke, tokenizer, window
from bdjax.editor import EditBatch
from bdjax.options import EditOptions

FAST = {"skip_timesteps": 20}  # the sampler configuration of tests/test_batch_edit.py: one compilation


@pytest.fixture(scope="module")
def editor():
    return smoke.editor(with_lpips=False)


@pytest.fixture
def files(tmp_path):
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(rng.randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "other.png")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    frames = [Image.fromarray(np.full((30, 40, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    return tmp_path


def counting(monkeypatch, module, name: str) -> list:
    """Record every call of module.name (arguments), still calling it."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_inputs_are_what_the_image_loader_returns_bit_for_bit(files):
    """fit="stretch", the reference's framing: the image loader's stretched image and mask."""
    for invert in (False, True):
        inputs = request.prepare_inputs(str(files / "img.png"), str(files / "mask.png"), invert_mask=invert,
                                        image_size=16, fit="stretch")
        init = image_io.load_image(str(files / "img.png"), 16)
        region = image_io.load_mask(str(files / "mask.png"), 16, invert_mask=invert)
        assert inputs.source.dtype == np.uint8 and inputs.mask.dtype == np.uint8 and inputs.invert_mask == invert
        assert inputs.init.dtype == np.float32 and np.array_equal(inputs.init, init)
        assert inputs.region.dtype == np.float32 and np.array_equal(inputs.region, region)
        assert set(np.unique(inputs.mask)) == {0, 255} and inputs.size == 16
    every_level = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, axis=2)
    inputs = request.prepare_inputs(every_level, image_size=16, fit="stretch")
    assert np.array_equal(inputs.source, every_level)
    assert np.array_equal(inputs.init, image_io.load_image(every_level, 16)) and inputs.mask.min() == 255


def test_warnings_are_held_and_shown_once_after_every_check(files):
    options = EditOptions(**smoke.OPTIONS)
    args = dict(num_samples=2, options=options, image_size=16)
    wide = np.full((8, 8), 255, np.uint8)  # another size than the image: the loader warns
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        prepared = request.prepare(str(files / "animated.gif"), wide, "a cat", seed=1, **args)
    messages = [str(w.message) for w in prepared.inputs.warnings]
    assert [str(w.message) for w in shown] == messages and len(messages) == 3
    assert "2 frames" in messages[0] and "differs from image size" in messages[1] and "whole image" in messages[2]
    assert shown[0].filename == image_io.__file__  # shown as raised, where it was raised
    for prompt, bad, message in (("a cat", {"seed": -1}, r"^seed=-1 must be in"),
                                 ("word " * 80, {"seed": 1}, "tokens long"),
                                 ("a cat", {"seed": 1, "options": EditOptions(aug_num=0)}, "^aug_num=0 must be at")):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match=message):
                request.prepare(str(files / "animated.gif"), wide, prompt, **{**args, **bad})
        assert shown == []  # a refused request says only why
    other = prepared.with_prompt("a dog")
    assert other.inputs is prepared.inputs and other.prompt == "a dog"
    assert np.array_equal(other.tokens, tokenizer.tokenize("a dog"))


def test_launch_preflight_and_editor_decode_tokenize_and_validate_once(editor, files, monkeypatch):
    from absl import flags

    from launch import cli, runtime
    from launch import extrapolate as extrapolate_program

    if "strip" not in flags.FLAGS:  # as tests/conftest.py's program_flags: the flags of every edit program, once
        extrapolate_program.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["edit", "--config=smoke", f"--init_image={files / 'img.png'}", f"--mask={files / 'mask.png'}",
                 "--prompt=a cat", "--num_samples=3", "--seed=5", "--skip_timesteps=20",
                 f"--output_dir={files / 'out'}"])
    try:
        loads = [counting(monkeypatch, image_io, "_open"), counting(monkeypatch, window, "decode")]
        tokenized = counting(monkeypatch, tokenizer, "tokenize")
        validated = counting(monkeypatch, EditOptions, "validate")
        [prepared] = cli.preflight(runtime.options_from_flags(), [flags.FLAGS.prompt], str(files / "out"),
                                    outputs.EDIT_OUTPUTS)
        stream = editor.edit_batches(prepared, progress=False)
        assert len(validated) == 1 and stream.request is prepared
        batches = list(stream)
    finally:
        flags.FLAGS.unparse_flags()
    assert [len(calls) for calls in loads] == [2, 1] and len(tokenized) == 1  # each file opened once
    assert sorted(np.concatenate([b.sample_ids for b in batches]).tolist()) == [0, 1, 2]
    assert prepared.seed == 5 and prepared.options.skip_timesteps == 20 and prepared.size == editor.image_size


def test_a_prepared_request_gives_the_pixels_of_the_plain_call(editor, files):
    args = (str(files / "img.png"), str(files / "mask.png"), "a cat")
    plain = editor.edit(*args, num_samples=2, seed=3, progress=False, **FAST)
    prepared = editor.prepare(*args, num_samples=2, seed=3, **FAST)
    for _ in range(2):  # reused as it is
        again = editor.edit(prepared, progress=False)
        assert np.array_equal(again.images, plain.images) and np.array_equal(again.distances, plain.distances)
        assert np.array_equal(again.source, plain.source) and np.array_equal(again.mask, plain.mask)
        assert again.options == plain.options and again.seed == 3 and again.prompt == "a cat"
    with pytest.raises(TypeError, match="carries its own"):
        editor.edit(prepared, num_samples=4)
    small = request.prepare(*args, num_samples=2, seed=3, options=prepared.options, image_size=32)
    with pytest.raises(ValueError, match="prepared at 32x32 pixels; this editor's UNet works at 64x64"):
        editor.edit_batches(small)


class FakeEditor:
    """The editor interface batch.run uses, without networks (as tests/test_batch_robust.py)."""

    image_size = 8

    def encode_tokens(self, tokens):
        return np.zeros(4, np.float32)

    def sample(self, options, guided, init, mask, text_embed, sample_ids, seeds, progress=False, batch_rows=None):
        n = len(sample_ids)
        images = np.full((n, 8, 8, 3), 0.5, np.float32)
        distances = np.asarray(sample_ids, np.float32)
        return {"rows": np.arange(n), "images": images, "distances": distances, "finite": np.ones(n, bool)}

    def diversity(self, images, region):
        return None  # no LPIPS network


def test_a_batch_run_decodes_each_input_and_tokenizes_each_job_once(files, monkeypatch):
    lines = [{"name": "a", "image": "img.png", "mask": "mask.png", "prompt": "x", "num_samples": 2, "seed": 1},
             {"name": "b", "image": "img.png", "mask": "mask.png", "prompt": "y", "num_samples": 2, "seed": 2},
             {"name": "c", "image": "other.png", "prompt": "x", "num_samples": 1, "seed": 3}]
    (files / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    loaded = counting(monkeypatch, window, "decode")  # window mode: each photo decoded at full size, once
    tokenized = counting(monkeypatch, tokenizer, "tokenize")
    jobs, errors = batch.read_manifest(str(files / "jobs.jsonl"), 8, EditOptions(batch_size=2))
    assert errors == [] and len(loaded) == 2 and len(tokenized) == 3
    jobs = batch.with_run(jobs, batch.run_identity("fp32", "smoke", 8, "fake"))
    jobs, items, _, finished = batch.pending_items(str(files / "out"), jobs)
    stats = batch.run(FakeEditor(), jobs, str(files / "out"), items, finished=finished)
    assert stats.computed == 5 and stats.summaries == 3
    assert len(loaded) == 2 and len(tokenized) == 3  # the run and the summaries reuse what was prepared


def test_the_input_cache_is_bounded(files, monkeypatch):
    paths = [str(files / name) for name in ("img.png", "other.png", "animated.gif")]
    # bytes of one image and mask at 8 pixels and of the full-size photo and mask (30x40) window mode keeps
    one = request.prepare_inputs(paths[0], image_size=8).nbytes
    assert one == 8 * 8 * 4 + 30 * 40 * 4
    prepared = counting(monkeypatch, request, "prepare_inputs")
    cache = batch.InputCache(max_bytes=2 * one)
    for path in paths + paths[-2:]:
        cache.get(path, None, False, 8)
    assert len(prepared) == 3  # the last two were kept
    cache.get(paths[0], None, False, 8)  # the least recently used was dropped: prepared again
    assert len(prepared) == 4 and len(cache._kept) == 2


class StubStream:
    """An edit_batches stream whose one batch is the window with its strip painted `fill`."""

    def __init__(self, request_, fill):
        self.request, self.source, self.fill = request_, request_.source, fill

    def __iter__(self):
        image = self.request.source.copy()
        image[self.request.mask > 0] = self.fill or 0
        finite = np.array([self.fill is not None])
        yield EditBatch(sample_ids=np.array([0]), images=image[None], distances=np.array([0.5]), finite=finite)


def test_extrapolation_rounds_prepare_each_window_from_the_sides_requests():
    canvas = np.random.RandomState(2).randint(0, 256, (16, 16, 3), dtype=np.uint8)
    options = EditOptions(**smoke.OPTIONS)
    left = request.prepare(canvas, None, "hell", num_samples=2, seed=7, options=options, image_size=16)
    sides = {"left": left, "right": left.with_prompt("heaven")}
    seen = []

    class Editor:
        def edit_batches(self, request_, progress=True):
            seen.append(request_)
            return StubStream(request_, 100 + len(seen))

    rounds = list(extrapolate.grow(Editor(), sides, strip=4, repeats=2))
    assert [(r.round, r.side, r.prompt, r.canvas.shape[1]) for r in rounds] == [
        (1, "left", "hell", 20), (1, "right", "heaven", 24), (2, "left", "hell", 28), (2, "right", "heaven", 32)]
    assert [r.seed for r in rounds] == [extrapolate.round_seed(7, r, s) for r in (1, 2) for s in ("left", "right")]
    assert [r.seed for r in seen] == [r.seed for r in rounds] and all(r.num_samples == 2 for r in seen)
    assert all(r.tokens is sides[s].tokens for r, s in zip(seen, ["left", "right"] * 2))
    final = rounds[-1].canvas
    assert np.array_equal(final[:, 8:24], canvas) and (final[:, :4] == 103).all() and (final[:, -4:] == 104).all()

    class Failing:
        def edit_batches(self, request_, progress=True):
            return StubStream(request_, None)

    [only] = list(extrapolate.grow(Failing(), sides, strip=4, repeats=2))
    assert only.distance == np.inf and np.array_equal(only.canvas, canvas)  # stops, the canvas unchanged
