"""bdjax/editor.py: the editor API (BlendedDiffusion: edit, edit_batches, sample, the sampler
cache, from_pretrained, defaults), its one-line refusals, its streaming of results batch by batch
with non-finite samples reported, and its progress bar.

The first tests run tiny random networks of the real architectures; the streaming tests run a
stand-in sampler (tests/launch_helpers.py: no networks, nothing compiled). The sampler's maths
is tested in test_blended.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import parallel, smoke, window
from bdjax.editor import BlendedDiffusion, EditBatch
from bdjax.models import clip as clip_lib
from bdjax.models import unet as unet_lib
from bdjax.options import MAX_NUM_SAMPLES, EditOptions
from launch_helpers import SIZE, FakeRun, SlowCompile, fake_editor, photo, recording_tqdm

TINY = 32  # the tiny networks' image size (SIZE is the stand-in editor's, the smoke preset's)


# The editor API on tiny random networks of the real architectures.

@pytest.fixture(scope="module")
def editor():
    config = dict(unet_lib.preset("adm256_uncond"), image_size=TINY, model_channels=32, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16)
    unet = unet_lib.UNetModel(**config)
    unet_params = unet.init(jax.random.key(0), jnp.zeros((1, TINY, TINY, 3)), jnp.zeros((1,)))["params"]
    clip = clip_lib.CLIP(embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
                         vision_heads=2, context_length=77, vocab_size=49408, transformer_width=32,
                         transformer_heads=2, transformer_layers=1)
    clip_params = clip.init(jax.random.key(1), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32))["params"]
    return BlendedDiffusion((unet, unet_params), (clip, clip_params))


@pytest.fixture(scope="module")
def photo_and_mask():
    rng = np.random.RandomState(5)
    photo = rng.randint(0, 256, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:25] = 255
    return photo, mask


FAST = dict(skip_timesteps=96, aug_num=3)


def test_same_seed_same_results_and_batch_independence(editor, photo_and_mask):
    photo, mask = photo_and_mask
    batch8 = editor.edit(photo, mask, "a red ball", num_samples=8, batch_size=8, seed=11, progress=False, **FAST)
    again = editor.edit(photo, mask, "a red ball", num_samples=8, batch_size=8, seed=11, progress=False, **FAST)
    np.testing.assert_array_equal(batch8.images, again.images)
    compiled = editor.sampler(EditOptions(batch_size=8, **FAST), True)
    for program in (compiled.begin, compiled.advance, compiled.end):
        assert program._cache_size() == 1  # each compiled once, for both runs and all chunks

    # Ranked best first, and every sample id once.
    assert (np.diff(batch8.distances) >= 0).all()
    assert sorted(batch8.sample_ids) == list(range(8))
    # Sample k alone (batch_size 1, so a different compiled program) equals sample k in the batch of 8.
    alone = editor.edit(photo, mask, "a red ball", num_samples=3, batch_size=1, seed=11, progress=False, **FAST)
    for k in range(3):
        np.testing.assert_array_equal(alone.images[list(alone.sample_ids).index(k)],
                                      batch8.images[list(batch8.sample_ids).index(k)])
    other = editor.edit(photo, mask, "a red ball", num_samples=1, batch_size=8, seed=12, progress=False, **FAST)
    assert np.abs(other.images[0].astype(int) - batch8.images[list(batch8.sample_ids).index(0)]).max() > 0
    # Window mode: farther than the feather from the mask, every result is the photo, byte for byte.
    keep = window.feather_alpha(batch8.mask > 0, window.DEFAULT_FEATHER) == 0
    for image in batch8.images:
        assert np.array_equal(image[keep], batch8.source[keep])
    # fit="stretch" (the reference's): outside the mask every result is the resized source, within
    # one level (enforce_background pastes it before the [-1, 1] -> uint8 rounding).
    stretched = editor.edit(photo, mask, "a red ball", num_samples=2, batch_size=8, seed=11, progress=False,
                            fit="stretch", **FAST)
    keep = stretched.mask == 0
    for image in stretched.images:
        assert np.abs(image[keep].astype(int) - stretched.source[keep]).max() <= 1


def test_editor_rejects_bad_requests(editor, photo_and_mask):
    photo, mask = photo_and_mask
    with pytest.raises(ValueError, match="tokens long"):
        editor.edit(photo, mask, "word " * 80, progress=False)
    with pytest.raises(TypeError, match="unknown option"):
        editor.edit(photo, mask, "a cat", progress=False, skip_timestep=3)
    with pytest.raises(ValueError, match="skip_timesteps"):
        editor.edit(photo, mask, "a cat", progress=False, skip_timesteps=100)
    with pytest.raises(ValueError, match="LPIPS"):
        editor.edit(photo, mask, "a cat", progress=False, local_clip_guided_diffusion=True,
                    background_preservation_loss=True)
    with pytest.raises(ValueError, match="selects no pixel"):
        editor.edit(photo, np.zeros((40, 40), np.uint8), "a cat", progress=False)


def test_the_prompt_is_text_and_refused_by_length_before_tokenizing(editor, photo_and_mask, monkeypatch):
    """None, bytes or a number as the prompt is one clear ValueError naming the prompt; a prompt over
    MAX_PROMPT_CHARS is refused by its length before the tokenizer sees it."""
    from bdjax import request, tokenizer

    photo, mask = photo_and_mask
    for prompt, kind in ((None, "NoneType"), (b"a cat", "bytes"), (3, "int")):
        with pytest.raises(ValueError, match=rf"^prompt=.* should be text \(a str; '' runs unguided\), not {kind}$"):
            editor.prepare(photo, mask, prompt)
    monkeypatch.setattr(tokenizer, "tokenize", lambda *a, **k: pytest.fail("tokenized a refused prompt"))
    huge = "a cat " * 2_000_000  # 12 MB
    with pytest.raises(ValueError, match=f"12,000,000 characters long, more than the {request.MAX_PROMPT_CHARS:,}"):
        editor.edit(photo, mask, huge, progress=False)


def test_a_replaced_request_is_checked_again_before_it_runs(editor, photo_and_mask):
    """A Request changed with dataclasses.replace runs only if `prepare` could have made it."""
    import dataclasses

    photo, mask = photo_and_mask
    prepared = editor.prepare(photo, mask, "a cat", num_samples=2, seed=3, **FAST)
    for change, message in (({"seed": -1}, r"seed=-1 must be in \[0, 2\*\*31\)"),
                            ({"seed": 2 ** 40}, r"must be in \[0, 2\*\*31\)"),
                            ({"num_samples": 0}, "num_samples=0 must be at least 1"),
                            ({"num_samples": 2.0}, "num_samples=2.0 should be an integer"),
                            ({"prompt": None}, "should be text"),
                            ({"prompt": "a dog"}, "tokens are not those of its prompt"),
                            ({"options": {"skip_timesteps": 96}}, "options should be an EditOptions"),
                            ({"inputs": photo}, "not prepared Inputs")):
        with pytest.raises(ValueError, match=message):
            editor.edit(dataclasses.replace(prepared, **change), progress=False)
    assert len(editor.edit(prepared.with_prompt("a dog"), progress=False).images) == 2


def test_results_saved_from_the_api_carry_the_programs_provenance(tmp_path):
    """EditResult.save writes the ranked results as the launch programs name them, each PNG
    carrying the prompt, options, seed, sample id, distance, window and networks; it replaces
    nothing unless asked."""
    from bdjax import outputs

    smoke_editor = smoke.editor(with_lpips=False)
    result = smoke_editor.edit(photo(), None, "a cat", num_samples=2, seed=5, progress=False, skip_timesteps=22)
    paths = result.save(str(tmp_path / "mine"))
    assert [os.path.basename(p) for p in paths] == [outputs.ranked_name(r, d) for r, d in enumerate(result.distances)]
    for path, image, k, distance in zip(paths, result.images, result.sample_ids, result.distances):
        assert np.array_equal(outputs.read_png(path), image)
        about = outputs.read_provenance(path)
        assert about["kind"] == "sample" and about["prompt"] == "a cat" and about["seed"] == 5
        assert about["sample_id"] == k and about["distance"] == float(distance)
        assert about["options"]["skip_timesteps"] == 22 and about["window"] == result.framing["window"]
        assert about["run"] == {"image_size": smoke.IMAGE_SIZE, "param_dtype": "float32",
                                "weights": smoke_editor.weights_digest}
        assert about["label"] == smoke.LABEL
    before = [open(p, "rb").read() for p in paths]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(str(tmp_path / "mine"))
    assert [open(p, "rb").read() for p in paths] == before
    assert result.save(str(tmp_path / "mine"), overwrite=True) == paths


def test_an_empty_prompt_runs_unguided(editor, photo_and_mask):
    """prompt="" (the README's unguided mode) runs the sampler without CLIP guidance: no gradient,
    so a sample is the same whatever the guidance weight."""
    photo, mask = photo_and_mask
    one = editor.edit(photo, mask, "", num_samples=2, seed=4, progress=False, **FAST)
    other = editor.edit(photo, mask, "", num_samples=2, seed=4, progress=False, clip_guidance_lambda=5000.0, **FAST)
    assert one.prompt == "" and len(one.images) == 2
    np.testing.assert_array_equal(one.images[np.argsort(one.sample_ids)], other.images[np.argsort(other.sample_ids)])
    assert (EditOptions(**FAST), False) in editor._samplers  # the unguided sampler ran
    guided = editor.edit(photo, mask, "a red ball", num_samples=2, seed=4, progress=False, **FAST)
    assert np.abs(guided.images.astype(int) - one.images.astype(int)).max() > 0


def test_from_pretrained_reads_converted_directories(tmp_path):
    """Weights written in the converters' format load into an editor: UNet and CLIP from one
    directory (LPIPS only if present), a separate UNet directory for the 512 model, bf16 params."""
    from bdjax import checkpoint, smoke

    nets = smoke.networks()
    unet, unet_params = nets["unet"]
    checkpoint.save(str(tmp_path), "unet", checkpoint.flatten(unet_params), unet_lib.config_to_json(smoke.unet_config()),
                    model="unet")
    checkpoint.save(str(tmp_path), "clip", checkpoint.flatten(nets["clip"][1]), smoke.CLIP_CONFIG, model="clip")
    editor = BlendedDiffusion.from_pretrained(str(tmp_path))
    assert editor.models.lpips is None and editor.image_size == 64
    for got, want in zip(jax.tree_util.tree_leaves(editor.params["unet"]), jax.tree_util.tree_leaves(unet_params)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="LPIPS"):
        editor.options(local_clip_guided_diffusion=True, background_preservation_loss=True)

    from bdjax.models import lpips as lpips_lib
    checkpoint.save(str(tmp_path), "lpips", checkpoint.flatten(nets["lpips"][1]), lpips_lib.CONFIG, model="lpips")
    other = tmp_path / "adm512"
    checkpoint.save(str(other), "unet", checkpoint.flatten(unet_params), unet_lib.config_to_json(smoke.unet_config()),
                    model="unet")
    editor = BlendedDiffusion.from_pretrained(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                              unet_dir=str(other), remat="dots")
    assert editor.models.lpips is not None and editor.models.unet.remat == "dots"
    assert jax.tree_util.tree_leaves(editor.params["clip"])[0].dtype == jnp.bfloat16


def test_smoke_editor_defaults_to_the_smoke_schedule_and_options_override_it():
    """bdjax.smoke.editor() edits with --config=smoke's short schedule unless told otherwise; other
    editors keep the reference's defaults."""
    editor = smoke.editor(with_lpips=False)
    assert editor.options() == EditOptions(**smoke.OPTIONS)
    assert editor.options().timestep_respacing == "25" and editor.options().skip_timesteps == 15
    assert editor.options(skip_timesteps=5).skip_timesteps == 5
    assert editor.options(skip_timesteps=5).aug_num == smoke.OPTIONS["aug_num"]
    nets = smoke.networks(with_lpips=False)
    plain = BlendedDiffusion(nets["unet"], nets["clip"])
    assert plain.options() == EditOptions()
    with pytest.raises(TypeError, match="unknown option"):
        BlendedDiffusion(nets["unet"], nets["clip"], defaults={"steps": 3})


# ---------------------------------------------------------------------------------------------
# The streaming API and its finite flags, on the stand-in sampler.

def test_sample_reports_which_rows_are_finite():
    run = FakeRun(nan=[1], inf=[2])
    editor = fake_editor(run)
    n = 5
    init = np.zeros((n, SIZE, SIZE, 3), np.float32)
    out = editor.sample(editor.options(batch_size=2), True, init, init[..., :1], np.zeros((n, 8)), np.arange(n),
                        np.full(n, 3))
    assert out["rows"].tolist() == [0, 1, 2, 3, 4]
    assert out["finite"].tolist() == [True, False, False, True, True]
    assert out["finite"].dtype == bool and out["images"].shape == (5, SIZE, SIZE, 3)


def test_edit_batches_streams_one_batch_at_a_time_from_broadcast_inputs():
    run = FakeRun()
    editor = fake_editor(run)
    stream = editor.edit_batches(photo(), None, "a cat", num_samples=5, seed=9, batch_size=2, progress=False)
    assert run.batches == []  # nothing computed before the stream is iterated
    assert stream.source.shape == (SIZE, SIZE, 3) and stream.mask.shape == (SIZE, SIZE)
    first = next(iter(stream))
    assert isinstance(first, EditBatch) and first.sample_ids.tolist() == [0, 1] and len(run.batches) == 1
    rest = list(stream)
    assert [b.sample_ids.tolist() for b in rest] == [[2, 3], [4]]
    # Every batch holds batch_size rows (the last one padded), whatever num_samples is.
    assert {b["init"][0] for b in run.batches} == {2} and all(b["seeds"] == [9, 9] for b in run.batches)
    assert rest[0].images.dtype == np.uint8 and rest[0].images[1].mean() == round(0.03 * 255)


def test_a_batch_never_holds_more_rows_than_samples():
    """batch_size=10**8 for 3 samples runs one batch of 3 rows (padded to the devices), not a
    batch of 10**8 padding rows."""
    run = FakeRun()
    editor = fake_editor(run)
    result = editor.edit(photo(), None, "a cat", num_samples=3, seed=2, batch_size=10 ** 8, progress=False)
    assert sorted(result.sample_ids.tolist()) == [0, 1, 2]
    assert [b["init"][0] for b in run.batches] == [parallel.padded_batch(3, editor.mesh.devices.size)]


def test_edit_batches_inputs_are_views_whatever_num_samples():
    """A huge num_samples allocates nothing per sample before the first batch: the per-sample
    inputs are broadcast views of one image, mask and embedding, and the ids stay a range."""
    run = FakeRun()
    editor = fake_editor(run)
    seen = {}
    real = editor.sample_batches

    def spy(options, guided, init, mask, text_embed, sample_ids, seeds, progress=False, batch_rows=None, **previews):
        seen.update(init=init, mask=mask, text_embed=text_embed, sample_ids=sample_ids, seeds=seeds)
        return real(options, guided, init, mask, text_embed, sample_ids, seeds, progress, batch_rows, **previews)

    editor.sample_batches = spy
    n = MAX_NUM_SAMPLES  # as one full copy each: 4.9 GB of images alone
    stream = editor.edit_batches(photo(), None, "a cat", num_samples=n, seed=1, batch_size=2, progress=False)
    first = next(iter(stream))
    assert first.sample_ids.tolist() == [0, 1]
    assert isinstance(seen["sample_ids"], range) and len(seen["sample_ids"]) == n
    for name in ("init", "mask", "text_embed", "seeds"):
        a = seen[name]
        assert a.shape[0] == n and a.strides[0] == 0, name  # one copy shared by every row
        assert a.base is not None and a.base.nbytes * 1000 <= a.nbytes, name


def test_edit_leaves_out_and_lists_non_finite_samples():
    editor = fake_editor(FakeRun(nan=[0], inf=[3]))
    result = editor.edit(photo(), None, "a cat", num_samples=5, seed=2, batch_size=2, progress=False)
    assert result.failed.tolist() == [0, 3]
    assert result.sample_ids.tolist() == [4, 2, 1]  # best (lowest distance) first
    assert np.isfinite(result.distances).all() and len(result.images) == 3


def test_the_progress_bar_counts_sampling_only(monkeypatch):
    """The library's bar says "compiling" while the first batch compiles, and its clock (so its
    rate and ETA) leaves the compile out; `on_compile` is entered once per compile."""
    import contextlib
    import time

    from bdjax import editor as editor_lib

    bars = recording_tqdm(monkeypatch, editor_lib)
    run = SlowCompile(compile_s=0.6, bars=bars)
    editor = fake_editor(run)
    entered = []
    editor.on_compile = lambda: contextlib.nullcontext(entered.append(1))
    began = time.perf_counter()
    result = editor.edit(photo(), None, "a cat", num_samples=4, seed=1, batch_size=2)
    took = time.perf_counter() - began
    assert sorted(result.sample_ids.tolist()) == [0, 1, 2, 3]
    assert run.compiles == 1 and entered == [1]  # the second batch reuses the programs
    assert run.descriptions == ["blended diffusion (preparing)"]
    [bar] = bars
    assert bar.desc == "blended diffusion" and bar.final["n"] == bar.final["total"] == 2 * 4 * len(run.batches)
    # The bar's clock is sampling's time: it skipped the 0.6 s compile (whatever the load on the machine).
    assert took - bar.final["elapsed"] >= 0.55 and bar.final["elapsed"] >= 4 * 0.02


def test_the_compiled_samplers_kept_are_bounded_least_recently_used_first(monkeypatch):
    """A server asked for ever new options (a float nudged each time) keeps at most max_samplers
    compiled configurations: the least recently used is dropped, and with it its programs."""
    import gc
    import weakref

    from bdjax import editor as editor_lib

    class Compiled:  # stands in for CompiledSampler: what the editor keeps per configuration
        def __init__(self, sampler, mesh):
            self.sampler = sampler

    monkeypatch.setattr(editor_lib, "make_sampler", lambda models, options, guided: (options, guided))
    monkeypatch.setattr(editor_lib, "CompiledSampler", Compiled)
    editor = fake_editor(FakeRun())
    del editor.sampler  # the editor's own, not the stand-in's
    made = {}
    for i in range(12):
        options = EditOptions(clip_guidance_lambda=1000.5 + i)
        made[i] = weakref.ref(editor.sampler(options, True))
        if i == 5:
            first = editor.sampler(EditOptions(clip_guidance_lambda=1000.5), True)  # used again: kept
    gc.collect()
    assert len(editor._samplers) == editor.max_samplers == 8
    assert first is editor._samplers[(EditOptions(clip_guidance_lambda=1000.5), True)]
    alive = [i for i, ref in made.items() if ref() is not None]
    assert alive == [0, 5, 6, 7, 8, 9, 10, 11], alive  # 1-4, the least recently used, were released
    del first

