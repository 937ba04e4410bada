"""The web app without a browser (tests/test_app_browser.py drives it in one): its start-up
refusals, the one-line messages a page shows for bad inputs, captions, run folders and the
compile stage. The page's requests go through `Studio`, tested here on the smoke networks
(nothing compiles: preparing a request runs no network)."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import bdjax
from bdjax import outputs
from bdjax import request as request_lib
from bdjax import smoke
from bdjax.options import EditOptions
from launch import app
from launch import studio as studio_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COFFEE = os.path.join(ROOT, "examples", "coffee.png")


def start(*flags, env=None):
    return subprocess.run([sys.executable, "-m", "launch.app", "--config=smoke", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.mark.parametrize("flags, message", [
    (["--num_samples=0"], "error: --num_samples=0 must be in [1, --max_samples=64]"),
    (["--num_samples=65"], "error: --num_samples=65 must be in [1, --max_samples=64]"),
    (["--distributed"], "error: the web app runs in one process: drop --distributed"),
    (["--skip_timesteps=30"], "error: --skip_timesteps=30 must be in [0, 25) for timestep_respacing='25'"),
    (["--port=70000"], "error: --port=70000 must be in [1, 65535]"),
    (["--port=0"], "error: --port=0 must be in [1, 65535]"),
    (["--context=-1"], "error: --context=-1.0 must be a number in [0, 10]"),
    (["--feather=65"], "error: --feather=65 must be an integer in [0, 64]"),
    (["extra"], "error: unexpected arguments: ['extra']"),
])
def test_bad_flags_stop_before_anything_loads(flags, message):
    proc = start(*flags)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_port_in_use_is_named_before_the_networks_load(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start(f"--port={port}", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "pick another --port" in last
    assert "running" not in proc.stderr  # refused before the run was described, i.e. before loading


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    editor = smoke.editor(with_lpips=True)
    return studio_lib.Studio(editor, dict(editor.defaults), str(tmp_path_factory.mktemp("studio")),
                             label=smoke.LABEL, max_samples=8)


def painted(box=(100, 200, 150, 300)) -> dict:
    """An editor value: the coffee photo with `box` (top, bottom, left, right) painted."""
    with Image.open(COFFEE) as im:
        photo = np.asarray(im.convert("RGBA"))
    layer = np.zeros_like(photo)
    top, bottom, left, right = box
    layer[top:bottom, left:right] = (255, 0, 160, 153)
    return {"background": photo, "layers": [layer], "composite": None}


def prepare(studio, value=None, mask_file=None, invert=False, prompt="a cup of tea", num_samples=2, seed=404,
            **options):
    return studio.prepare(painted() if value is None else value, mask_file, invert, prompt, num_samples, seed,
                          {**studio.defaults, **options})


def photo_rgb() -> np.ndarray:
    with Image.open(COFFEE) as im:
        return np.asarray(im.convert("RGB"))


def box_mask(box, shape=(320, 480)) -> np.ndarray:
    top, bottom, left, right = box
    mask = np.zeros(shape, np.uint8)
    mask[top:bottom, left:right] = 255
    return mask


SMALL = (100, 140, 200, 260)  # 60 x 40 pixels: a window of 120, upscaled under 2x at the smoke size


def test_a_good_request_is_prepared_in_window_mode(studio):
    """The default framing: the photo and the painted mask at full size, a window around the
    mask at the model size; invert_mask edits exactly the unpainted pixels of the photo."""
    request, notes = prepare(studio, value=painted(SMALL), num_samples=2.0, seed=7.0)  # Gradio's numbers may be floats
    assert (request.num_samples, request.seed, request.prompt) == (2, 7, "a cup of tea")
    assert request.mask.shape == (smoke.IMAGE_SIZE, smoke.IMAGE_SIZE) and 0 < (request.mask > 0).mean() < 0.5
    np.testing.assert_array_equal(request.full_source, photo_rgb())  # the photo's RGB, opaque alpha dropped
    assert request.inputs.photo.alpha is None
    np.testing.assert_array_equal(request.full_mask, box_mask(SMALL))
    left, top, right, bottom = request.inputs.window.box
    assert left <= 200 and right >= 260 and top <= 100 and bottom >= 140 and right - left == 120
    assert request.inputs.framing()["fit"] == "window"
    assert notes == []
    inverted, _ = prepare(studio, value=painted(SMALL), invert=True)
    np.testing.assert_array_equal(inverted.full_mask, 255 - request.full_mask)


def test_the_framing_options_reach_the_request(studio):
    request, _ = prepare(studio, value=painted(SMALL), context=0.0, feather=2.0)
    assert (request.inputs.context, request.inputs.feather) == (0.0, 2)
    assert request.inputs.window.side == smoke.IMAGE_SIZE  # a 60-pixel mask with no context: the model size
    stretched, notes = prepare(studio, value=painted(SMALL), fit="stretch")
    assert stretched.inputs.photo is None and notes == []
    assert stretched.full_source.shape == (smoke.IMAGE_SIZE, smoke.IMAGE_SIZE, 3)  # results at the model size
    direct = np.asarray(Image.fromarray(box_mask(SMALL)).resize((smoke.IMAGE_SIZE,) * 2, Image.NEAREST))
    np.testing.assert_array_equal(stretched.mask, direct)


def test_the_batch_size_field_takes_auto_or_a_number_and_refuses_anything_else(studio):
    """The advanced section's batch_size (a dropdown whose value is text: "auto", "8", or what was
    typed) reaches the request parsed; a word or a number below 1 is one line naming the fix."""
    for typed, expected in (("auto", "auto"), ("8", 8), (3, 3), (2.0, 2)):
        request, _ = prepare(studio, batch_size=typed)
        assert request.options.batch_size == expected
    for typed in ("big", "0", 0, 2.5):
        with pytest.raises(ValueError, match=r"^batch_size=.* or 'auto' \(the largest batch that fits"):
            prepare(studio, batch_size=typed)


def test_the_page_offers_auto_for_the_batch_size(studio, program_flags):
    gr = pytest.importorskip("gradio")
    program_flags.unparse_flags()
    program_flags(["app", "--config=smoke"])  # the page's defaults of num_samples and seed
    with gr.Blocks():
        options = {**dataclasses.asdict(EditOptions()), **studio.defaults, "batch_size": "auto"}  # as the flags'
        page = app.layout(studio_lib.Studio(studio.editor, options, studio.output_dir, max_samples=8))
    field = page.advanced["batch_size"]
    assert field.value == "auto" and ("auto", "auto") in field.choices and ("8", "8") in field.choices


def test_a_window_upscaled_over_4x_is_a_note(studio):
    request, notes = prepare(studio)  # 150 x 100 pixels: a window of 300, at 64 pixels
    assert request.inputs.window.side == 300
    assert notes == ["the edit window spans 300 px: the edit is made at 64 px and upscaled 4.7x; mask a smaller "
                     "region, or use model_output_size=512"]


@pytest.mark.parametrize("change, message", [
    (dict(value={"background": None, "layers": []}), "no image: upload a photo to edit first"),
    (dict(value=painted((0, 0, 0, 0))), "the mask is empty: paint over the region to change with the brush, "
                                        "or upload a mask file"),
    (dict(prompt="cat " * 80), "prompt 'cat cat cat"),
    (dict(skip_timesteps=25), "skip_timesteps=25 must be in [0, 25) for timestep_respacing='25'"),
    (dict(aug_num=0), "aug_num=0 must be at least 1"),
    (dict(clip_guidance_lambda=None), "the clip_guidance_lambda field is empty: enter a value (its default is in the "
                                      "field's help)"),
    (dict(timestep_respacing="abc"), "timestep_respacing"),
    (dict(num_samples=9), "num_samples=9 is more than this app's limit of 8 (--max_samples)"),
    (dict(num_samples=0), "num_samples=0 must be at least 1"),
    (dict(num_samples=None), "the samples field is empty: enter a whole number"),
    (dict(seed=None), "the seed field is empty: enter a whole number"),
    (dict(seed=-1), "seed=-1 must be in [0, 2**31)"),
    (dict(seed=1.5), "seed=1.5 should be an integer"),
    (dict(fit="crop"), "fit='crop' must be one of window, stretch"),
    (dict(fit=None), "the fit field is empty: enter a value"),
    (dict(context=-0.5), "context=-0.5 must be a number in [0, 10]"),
    (dict(context=None), "the context field is empty: enter a value"),
    (dict(feather=2.5), "feather=2.5 must be an integer in [0, 64]"),
    (dict(feather=65.0), "feather=65 must be an integer in [0, 64]"),
])
def test_bad_inputs_are_one_line_messages(studio, change, message):
    with pytest.raises((ValueError, TypeError)) as e:
        prepare(studio, **change)
    text = " ".join(str(e.value).split())
    assert text.startswith(message), text
    assert len(text) < 400


def test_an_empty_prompt_runs_unguided_with_a_note(studio):
    for prompt in ("", "   ", None):
        request, notes = prepare(studio, value=painted(SMALL), prompt=prompt)
        assert request.prompt == "" and notes == [
            "the prompt is empty: the edit runs unguided (no CLIP guidance: the diffusion model fills the region on "
            "its own)"]


def test_whole_image_masks_are_a_note_not_an_error(studio):
    request, notes = prepare(studio, value=painted((0, 320, 0, 480)))
    # The window is then the whole photo (480 pixels, centred), upscaled from 64: a second note.
    assert request.inputs.window.box == (0, -80, 480, 400)
    assert notes == ["the mask selects the whole image: nothing of the background is preserved",
                     "the edit window spans 480 px: the edit is made at 64 px and upscaled 7.5x; mask a smaller "
                     "region, or use model_output_size=512"]


def test_a_runs_inputs_are_written_at_full_size_with_the_window_drawn(studio, tmp_path):
    from bdjax import outputs

    request, _ = prepare(studio, value=painted(SMALL))
    studio_lib.write_inputs(request.inputs, str(tmp_path), {"prompt": "a cup of tea"})
    np.testing.assert_array_equal(outputs.read_png(str(tmp_path / studio_lib.SOURCE)), photo_rgb())
    with Image.open(tmp_path / studio_lib.MASK) as im:
        np.testing.assert_array_equal(np.asarray(im), box_mask(SMALL))
    for name, shape in zip(studio_lib.MODEL_INPUTS, [(smoke.IMAGE_SIZE,) * 2 + (3,), (smoke.IMAGE_SIZE,) * 2]):
        with Image.open(tmp_path / name) as im:
            assert np.asarray(im).shape == shape
    assert outputs.read_provenance(str(tmp_path / studio_lib.WINDOW)) == {"kind": "window", "prompt": "a cup of tea",
                                                                   "bdjax_version": bdjax.__version__}

    # The window, drawn as a yellow frame on the photo: its corners are yellow or black, the
    # pixels well inside and outside it the photo's.
    preview = outputs.read_png(str(tmp_path / studio_lib.WINDOW))
    assert preview.shape == (320, 480, 3)  # not wider than PREVIEW_WIDTH: as it is
    left, top, right, bottom = request.inputs.window.inside
    frame = np.zeros((320, 480), bool)
    frame[top:bottom, left:right] = True
    line = studio_lib.frame_line((480, 320))
    assert line == 4
    frame[top + 2 * line:bottom - 2 * line, left + 2 * line:right - 2 * line] = False  # black, then yellow
    drawn = (preview != photo_rgb()).any(axis=-1)
    assert drawn[frame].mean() > 0.95 and not drawn[~frame].any()
    np.testing.assert_array_equal(preview[top + line - 1, left + 1:right - 1], [[0, 0, 0]] * (right - left - 2))
    assert (preview[top + line:bottom - line, left + line] == (255, 214, 0)).all()

    # A large photo's preview is downscaled; the window is drawn where it is in the photo.
    large = np.asarray(Image.fromarray(photo_rgb()).resize((3000, 2000)))
    mask = np.zeros((2000, 3000), bool)
    mask[1000:1200, 2000:2300] = True
    inputs = request_lib.prepare_inputs(large, mask, image_size=smoke.IMAGE_SIZE)
    preview = studio_lib.window_preview(inputs)
    assert preview.shape[1] == 1024 and abs(preview.shape[0] - 2000 * 1024 / 3000) <= 1
    yellow = np.argwhere((preview == (255, 214, 0)).all(axis=-1))
    (y0, x0), (y1, x1) = yellow.min(axis=0), yellow.max(axis=0)
    scale = 1024 / 3000
    box = np.array(inputs.window.inside) * scale
    line = studio_lib.frame_line(preview.shape[1::-1])
    assert abs(x0 - box[0]) <= line + 2 and abs(y0 - box[1]) <= line + 2  # the yellow line is inside the black
    assert abs(x1 - box[2]) <= line + 2 and abs(y1 - box[3]) <= line + 2


def test_a_sample_of_the_app_is_reproduced_by_launch_edit_from_its_seed_and_k(studio, program_flags):
    """The app's run folder holds the photo and mask it edited (source.png, mask.png); launch.edit
    given them, the prompt and the seed writes sample k with the same pixels and distance (the
    same networks: both run the smoke preset)."""
    from bdjax import outputs

    program_flags.unparse_flags()
    program_flags(["app", "--config=smoke"])  # the runtime flags a run's provenance reads
    request, _ = prepare(studio, value=painted(SMALL), prompt="a cup of tea", num_samples=3, seed=7)
    run = studio_lib.Run(studio.new_run_dir(), "a", studio.submitted("a"))
    *_, (stage, entry, writer) = studio.edit(request, run, "painted")
    studio.finished(run)
    assert stage == "done" and len(entry.gallery) == 3 and entry.state.startswith("3 results ranked")
    out = os.path.join(run.directory, "cli")
    proc = subprocess.run([sys.executable, "-m", "launch.edit", "--config=smoke", "--prompt=a cup of tea",
                           f"--init_image={os.path.join(run.directory, studio_lib.SOURCE)}",
                           f"--mask={os.path.join(run.directory, studio_lib.MASK)}", "--seed=7", "--num_samples=3",
                           f"--output_dir={out}", f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in range(3):
        name = outputs.sample_name(k)
        np.testing.assert_array_equal(outputs.read_png(os.path.join(out, outputs.SAMPLES_DIR, name)),
                                      outputs.read_png(os.path.join(run.directory, outputs.SAMPLES_DIR, name)))
        ours, theirs = (json.loads(open(os.path.join(d, outputs.SAMPLES_DIR, outputs.sample_name(k, "json"))).read())
                        for d in (run.directory, out))
        assert ours["seed"] == theirs["seed"] == 7
        assert abs(ours["distance"] - theirs["distance"]) <= 1e-6  # float32 reductions may differ in the last bits


def test_captions_and_messages():
    assert studio_lib.caption(0, 0.71234, 404, 5, "") == "#0 d=0.7123 seed 404 sample 5"
    assert studio_lib.caption(3, 1.0, 1, 2, smoke.LABEL) == "#3 d=1.0000 seed 1 sample 2 (smoke)"
    scores = {"clip_masked": 1.0, "clip_whole": 1.23456, "background_psnr": 100.0, "background_lpips": 0.0,
              "seam": 1.5}
    assert studio_lib.caption(0, 1.0, 1, 2, "", scores) == \
        "#0 d=1.0000 seed 1 sample 2 whole 1.235 psnr 100 bg 0.000 seam 1.50"
    assert app.plain("error: skip_timesteps=[0, 25) *x* <b>") == r"error: skip\_timesteps=\[0, 25) \*x\* \<b\>"


def test_runs_get_their_own_folder(tmp_path):
    studio = studio_lib.Studio(None, {}, str(tmp_path))
    (tmp_path / "run_0007").mkdir()
    (tmp_path / "notes").mkdir()
    assert [os.path.basename(studio.new_run_dir()) for _ in range(2)] == ["run_0008", "run_0009"]


def test_a_results_folder_removed_while_serving_is_made_again_or_named(tmp_path):
    """The next run recreates a results folder someone removed; one that cannot be made (a file in
    its way) is one line naming it, for the page."""
    studio = studio_lib.Studio(None, {}, str(tmp_path / "results"))
    assert os.path.basename(studio.new_run_dir()) == "run_0001"
    shutil.rmtree(tmp_path / "results")
    assert os.path.basename(studio.new_run_dir()) == "run_0001" and (tmp_path / "results" / "run_0001").is_dir()
    shutil.rmtree(tmp_path / "results")
    (tmp_path / "results").write_text("a file where the folder was")
    with pytest.raises(OSError, match=rf"^the results folder {re.escape(str(tmp_path / 'results'))} cannot be used "
                                      r"\(File exists\): ask whoever runs this app to check it$"):
        studio.new_run_dir()


def test_an_empty_temporary_results_folder_is_removed_at_exit_and_a_used_one_kept(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "used" / "run_0001").mkdir(parents=True)
    for name in ("empty", "used"):
        app._remove_if_empty(str(tmp_path / name))
    assert not (tmp_path / "empty").exists() and (tmp_path / "used" / "run_0001").is_dir()


def test_serving_beyond_this_machine_warns_that_there_is_no_authentication():
    assert app.exposure_warnings("127.0.0.1", False) == []
    host, share = app.exposure_warnings("0.0.0.0", True)
    assert host.startswith("--host=0.0.0.0 serves this app to every machine") and "no authentication" in host
    assert share.startswith("--share opens a public link to this app") and "no authentication" in share


def test_a_huge_prompt_is_refused_before_it_is_tokenized(studio, monkeypatch):
    from bdjax import tokenizer

    monkeypatch.setattr(tokenizer, "tokenize", lambda *a, **k: pytest.fail("tokenized a refused prompt"))
    with pytest.raises(ValueError, match="10,000,000 characters long, more than the 1,000 allowed"):
        prepare(studio, prompt="x" * 10_000_000)


def test_a_page_that_goes_away_mid_run_still_gets_its_run_ranked_and_zipped(studio, program_flags):
    """A reload drops the page's connection: Gradio closes the run's generator after a batch. The
    run then ends as a cancel does: what finished is ranked, with its grid, report and zip."""
    import zipfile

    from bdjax import outputs

    program_flags.unparse_flags()
    program_flags(["app", "--config=smoke"])  # the runtime flags a run's provenance reads
    page = named_page(studio)
    values = {"photo": painted(SMALL), "mask_file": None, "invert": False, "prompt": "a cup of tea",
              "num_samples": 4, "seed": 3, "submitted": studio.submitted("gone"), "visitor": "", "frame": None,
              "grow": 0, "video": False, **{name: value for name, value in studio.defaults.items()},
              "batch_size": 2}
    run = app.Handlers(studio, page).run(values, "gone", progress=None)
    said = next(run)  # "sampling ...", then previews, then the first batch's progress
    while "samples done" not in said.get("status", ""):
        said = next(run)
    assert said["status"].startswith("2 of 4 samples done"), said["status"]
    run.close()  # as Gradio does when the page is gone
    [folder] = [d for d in os.listdir(studio.output_dir) if os.path.isfile(os.path.join(studio.output_dir, d,
                                                                                           outputs.REPORT))
                and json.load(open(os.path.join(studio.output_dir, d, outputs.REPORT)))["inputs"]["seed"] == 3]
    directory = os.path.join(studio.output_dir, folder)
    report = json.load(open(os.path.join(directory, outputs.REPORT)))
    assert report["inputs"]["cancelled_after"] == 2 and len(report["samples"]) == 2
    assert os.path.isfile(os.path.join(directory, outputs.GRID))
    with zipfile.ZipFile(os.path.join(directory, studio_lib.RESULTS_ZIP)) as archive:
        names = set(archive.namelist())
    assert {"source.png", "mask.png", "grid.png", "report.json"} <= names and len(names) == 6
    assert studio.pending.get("gone", 0) == 0  # the request counts as finished


def named_page(studio) -> "app.Page":
    """The page's components as their field names (the advanced fields as their options'), so
    that the handlers' dicts read by name."""

    names = {f.name: f.name for f in dataclasses.fields(app.Page) if f.name != "advanced"}
    return app.Page(advanced={name: name for name in studio.defaults}, **names)


def test_cancel_applies_to_the_sessions_pending_requests_only():
    studio = studio_lib.Studio(None, {}, "")
    assert studio.cancel("a") is False  # nothing pending: nothing to cancel
    first = studio_lib.Run("", "a", studio.submitted("a"))
    other = studio_lib.Run("", "b", studio.submitted("b"))
    assert studio.cancel("a") and studio.is_cancelled(first) and not studio.is_cancelled(other)
    studio.finished(first)
    later = studio_lib.Run("", "a", studio.submitted("a"))  # a new request after the cancel runs
    assert not studio.is_cancelled(later)


def test_compiling_is_shown_as_a_stage_of_the_progress():
    calls = []
    studio = studio_lib.Studio(None, {}, "")
    studio.show_compiling()  # no request running: nothing to show it on
    studio.progress = lambda value, desc=None: calls.append((value, desc))
    studio.show_compiling()
    assert calls == [(0, studio_lib.PREPARING)]


def test_without_gradio_the_app_names_the_extra_to_install():
    code = ("import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['launch.app', '--config=smoke']; "
            "runpy.run_module('launch.app', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: the web app needs Gradio: pip install -e '.[app]'"


def page_values(studio, **values) -> dict:
    """A request's page values by field name (named_page), the coffee photo painted at SMALL."""
    return {"photo": painted(SMALL), "mask_file": None, "invert": False, "prompt": "a cup of tea", "num_samples": 2,
            "seed": 404, "grow": 0, "video": False, "submitted": 0.0, "visitor": "", "frame": None, **studio.defaults,
            **values}


def test_each_browsers_history_is_its_own_and_bounded(monkeypatch):
    monkeypatch.setattr(studio_lib, "MAX_HISTORY", 3)
    monkeypatch.setattr(studio_lib, "MAX_VISITORS", 2)
    studio = studio_lib.Studio(None, {}, "")
    for k in range(5):
        studio.record("a", studio_lib.Entry(f"run_{k:04d}", "", {"prompt": "x" * 50, "seed": k}))
    assert [e.name for e in studio.runs_of("a")] == ["run_0004", "run_0003", "run_0002"]  # newest first, 3 kept
    assert studio.runs_of("b") == [] and studio.runs_of("") == [] and studio.entry("b", "run_0004") is None
    assert studio.runs_of("a")[0].label == f"run_0004: {'x' * 39 + '...'!r}, seed 4, running"
    studio.record("b", studio_lib.Entry("run_0005", "", {}))
    studio.record("c", studio_lib.Entry("run_0006", "", {}))
    assert studio.runs_of("a") == [] and len(studio.history) == 2  # the least recently active left


def test_a_run_joins_its_browsers_history_and_is_reopened_compared_and_used_as_the_next_photo(studio,
                                                                                               program_flags):
    """A finished run is listed for its browser only; reopened, it shows its results and puts its
    photo (framed) and the mask used back; a clicked result is compared with the photo, becomes
    the next photo at its full size, or gives its seed back."""
    from bdjax import painting

    program_flags.unparse_flags()
    program_flags(["app", "--config=smoke"])
    page = named_page(studio)
    handlers = app.Handlers(studio, page)
    said = handlers.load("")
    visitor = said["visitor"]
    assert len(visitor) >= 16 and handlers.load(visitor)["visitor"] == visitor  # made once, then kept
    values = page_values(studio, visitor=visitor, seed=11, submitted=studio.submitted("s"))
    *_, last = handlers.run(values, "s", progress=None)
    assert last["status"].startswith("2 results ranked") and studio.pending.get("s", 0) == 0
    [entry] = studio.runs_of(visitor)
    assert entry.state.startswith("2 results ranked") and entry.values["seed"] == 11
    assert [c for _, c in handlers.history_update(visitor)["choices"]] == [entry.name]
    assert handlers.history_update("someone else")["choices"] == []
    assert handlers.reopen("someone else", entry.name) == {"history": handlers.history_update("someone else")}

    shown = handlers.reopen(visitor, entry.name)
    assert shown["status"].startswith(f"reopened {entry.name}: 2 results ranked")
    # The score table: a row per result, best first, as report.json has them; the captions carry them.
    report = json.loads(open(os.path.join(entry.directory, "report.json")).read())
    assert shown["scores"] == entry.table and len(entry.table) == 2
    for row, sample in zip(entry.table, report["samples"]):
        assert row == [sample["rank"], sample["sample_id"], 11, *(sample["scores"][name]
                                                                  for name in studio_lib.TABLE_HEADERS[3:])]
    assert all(" whole " in caption and " seam " in caption for _, caption in shown["gallery"])
    assert f"diversity {report['diversity']:.3f}" in entry.state
    assert [path for path, _ in shown["gallery"]] == shown["shown"]["paths"] and len(shown["gallery"]) == 2
    assert shown["mask_file"] == os.path.join(entry.directory, studio_lib.MASK) and shown["seed"] == 11
    assert (shown["prompt"], shown["num_samples"], shown["invert"]) == ("a cup of tea", 2, False)
    reopened = painting.from_editor({**shown["photo"], "layers": []}, shown["mask_file"], frame=shown["frame"])
    np.testing.assert_array_equal(reopened.image, photo_rgb())
    # Reopened, it runs again as it ran: the same photo and mask.
    request, _ = studio.prepare(shown["photo"], shown["mask_file"], False, "a cup of tea", 2, 11,
                                {**studio.defaults}, frame=shown["frame"])
    np.testing.assert_array_equal(request.full_mask, outputs_mask(entry.directory))

    best, second = shown["shown"]["paths"]
    assert handlers.select(shown["shown"], 1) == {"selected": 1, "compare": (shown["shown"]["source"], second)}
    assert handlers.select(shown["shown"], 5) == handlers.select(None, 0) == handlers.unchanged()
    used = handlers.use(shown["shown"], 1)
    assert used["mask_file"] is None and used["status"].startswith("result #1 is now the photo")
    np.testing.assert_array_equal(painting.from_editor({**used["photo"], "layers": [painted(SMALL)["layers"][0]]},
                                                       frame=used["frame"]).image, outputs.read_png(second))
    assert handlers.use(None, None) == {"status": "no results yet: run an edit first, then click a result"}
    assert handlers.reuse(shown["shown"])["seed"] == 11


def outputs_mask(directory: str) -> np.ndarray:
    with Image.open(os.path.join(directory, studio_lib.MASK)) as im:
        return np.asarray(im.convert("L"))


def test_undecodable_uploads_are_one_line_and_the_session_runs_its_next_request(studio, tmp_path):
    """A file the page's image components cannot decode (not an image, an SVG, a PNG declaring
    20000 x 20000 pixels) reaches the handlers as its reason; the run says it in one line, counts
    as finished (cancel then has nothing to stop), and the next request is prepared."""
    import struct
    import zlib

    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData, ImageData

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    Image.new("L", (1, 1)).save(tmp_path / "huge.png")
    png = bytearray((tmp_path / "huge.png").read_bytes())
    ihdr = struct.pack(">II", 20000, 20000) + png[24:29]
    png[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "huge.png").write_bytes(bytes(png))

    import gradio as gr

    editor = app.readable(gr.ImageEditor(type="numpy", image_mode="RGBA", render=False), "photo")
    mask = app.readable(gr.Image(type="filepath", image_mode=None, render=False), "mask")
    assert not os.path.exists(os.path.join(ROOT, "launch", "app.pyi"))  # no type stub written beside the code
    handlers = app.Handlers(studio, named_page(studio))
    for name in ("notes.png", "drawing.svg", "huge.png"):
        path = str(tmp_path / name)
        photo = editor.preprocess(EditorData(background=FileData(path=path, orig_name=name)))
        uploaded = mask.preprocess(ImageData(path=path, orig_name=name))
        assert isinstance(photo, studio_lib.Unreadable), name
        # Gradio hands an SVG mask over as its path, which bdjax's decoder refuses in one line.
        assert isinstance(uploaded, studio_lib.Unreadable) or name.endswith(".svg"), name
        said = handlers.upload(photo, None)
        assert said["photo"] is None and said["status"].startswith("error: the photo could not be read: "), said
        assert "\n" not in said["status"] and "upload the photo as a PNG, JPEG or WebP" in said["status"]
        if isinstance(uploaded, studio_lib.Unreadable):
            assert handlers.mask_upload(uploaded)["mask_file"] is None
        values = page_values(studio, photo=photo, submitted=studio.submitted("u"))
        [said] = list(handlers.run(values, "u", progress=None))
        assert said["status"].startswith("error: the photo could not be read: ") and "\n" not in said["status"]
        assert studio.pending.get("u", 0) == 0 and handlers.cancel("u") == "nothing to cancel"
        values = page_values(studio, mask_file=uploaded, photo={**painted(SMALL), "layers": []})
        with pytest.raises(ValueError, match="the uploaded mask could not be read: |is not a readable image") as e:
            handlers.prepare(values)
        assert "\n" not in str(e.value)
    assert "Image size (400000000 pixels) exceeds limit" in photo  # the huge PNG's reason, from Pillow
    handlers.prepare(page_values(studio))  # the next request is fine


def test_an_uploaded_photo_is_framed_once():
    """The editor reports "upload" for a photo the page put there too: a framed photo is left as it is."""
    from bdjax import painting

    handlers = app.Handlers(studio_lib.Studio(None, {}, ""), named_page(studio_lib.Studio(None, {}, "")))
    said = handlers.upload({"background": photo_rgb(), "layers": []}, None)
    assert said["status"].startswith("photo 480x320 loaded")
    assert painting.is_framed(said["photo"]["background"], said["frame"])
    assert handlers.upload(said["photo"], said["frame"]) == handlers.unchanged()


def test_strength_is_the_share_of_the_steps_run():
    assert app.strength_of(25, "100") == 0.75 and app.skip_of(0.75, "100") == 25
    assert app.skip_of(1.0, "100") == 0 and app.skip_of(0.01, "100") == 99 and app.skip_of(0, "100") == 99
    assert app.strength_of(15, "25") == 0.4 and app.skip_of(0.4, "25") == 15
    assert app.strength_of(25, "not a schedule") is None and app.skip_of(0.5, "abc") is None


def test_examples_load_their_photo_mask_and_prompt(studio):
    from bdjax import painting

    found = app.examples_at_hand()
    assert [(os.path.basename(p), os.path.basename(m), t, i) for p, m, t, i in found] == list(app.EXAMPLES)
    said = app.Handlers(studio, named_page(studio)).example(2)
    assert (said["prompt"], said["invert"]) == ("the surface of the moon", True)
    assert said["mask_file"].endswith("astronaut_subject_mask.png") and said["frame"]["width"] == 384
    assert painting.is_framed(said["photo"]["background"], said["frame"])


def test_the_mask_preview_tints_the_region_grown_and_frames_the_window(studio):
    handlers = app.Handlers(studio, named_page(studio))
    plain_preview = handlers.preview(page_values(studio))
    grown = handlers.preview(page_values(studio, grow=10))
    top, bottom, left, right = SMALL
    np.testing.assert_array_equal(plain_preview["mask_used"], box_mask(SMALL))
    assert (grown["mask_used"] > 0).sum() > (box_mask(SMALL) > 0).sum()
    assert (grown["mask_used"][top - 10:bottom + 10, left - 10:right + 10] > 0).sum() == (grown["mask_used"] > 0).sum()
    image = plain_preview["source_used"]
    assert image.shape == (320, 480, 3)
    inside = image[top + 5:bottom - 5, left + 5:right - 5].astype(int)
    expected = (photo_rgb()[top + 5:bottom - 5, left + 5:right - 5] * 0.5 + np.array(studio_lib.TINT) * 0.5)
    assert np.abs(inside - expected).max() <= 1
    np.testing.assert_array_equal(image[:40, -40:], photo_rgb()[:40, -40:])  # far from the window: the photo
    assert plain_preview["status"].startswith("mask preview")
    # With the mask inverted, grow widens what changes: what is kept shrinks.
    inverted = handlers.preview(page_values(studio, invert=True, grow=10))
    assert (inverted["mask_used"] == 0).sum() < (box_mask(SMALL) > 0).sum()


def test_the_page_sees_each_chunks_predictions_and_gets_videos_when_asked(studio, program_flags):
    """While a batch samples, the gallery shows its current predictions (captioned with their
    step) after the finished samples; with the video box ticked each result's video is among the
    downloads and in the zip, a frame per step."""
    import zipfile

    program_flags.unparse_flags()
    program_flags(["app", "--config=smoke"])
    handlers = app.Handlers(studio, named_page(studio))
    said = list(handlers.run(page_values(studio, video=True, submitted=studio.submitted("v")), "v", progress=None))
    previews = [s["gallery"] for s in said if "gallery" in s and "status" not in s]
    assert len(previews) >= 2, [list(s) for s in said]
    captions = [c for g in previews for _, c in g]
    assert any(re.fullmatch(r"sample [01]: step \d+ of \d+ \(preview\)", c) for c in captions), captions
    steps = {int(re.search(r"step (\d+)", c).group(1)) for c in captions if "(preview)" in c}
    assert len(steps) >= 2  # the predictions change as the steps run
    image = next(i for g in previews for i, c in g if "(preview)" in c)
    assert image.shape == (smoke.IMAGE_SIZE, smoke.IMAGE_SIZE, 3) and image.dtype == np.uint8
    last = said[-1]
    assert last["status"].startswith("2 results ranked"), last["status"]
    videos = [f for f in last["downloads"] if f"{os.sep}videos{os.sep}" in f]
    assert [os.path.basename(v) for v in videos] == [f"sample_{k}.{outputs.video_format()}" for k in (0, 1)]
    with Image.open(videos[0]) as video:
        assert video.n_frames == steps_run(studio)
    with zipfile.ZipFile(last["downloads"][0]) as archive:
        assert {f"videos/sample_{k}.{outputs.video_format()}" for k in (0, 1)} <= set(archive.namelist())


def steps_run(studio) -> int:
    from bdjax import diffusion

    options = studio.defaults
    return diffusion.respaced_length(options["timestep_respacing"]) - options["skip_timesteps"]


def test_a_run_whose_folder_was_removed_is_named_when_reopened(tmp_path):
    """Reopening a run of the history whose folder was removed since: one line on the page."""
    studio = studio_lib.Studio(None, {}, str(tmp_path))
    gone = tmp_path / "run_0001"
    studio.record("v", studio_lib.Entry("run_0001", str(gone), {"prompt": "a cup"}, state="2 results ranked",
                                        gallery=[(str(gone / "ranked" / "000_1.0000.png"), "#0")]))
    said = app.Handlers(studio, named_page(studio)).reopen("v", "run_0001")
    assert said["status"].startswith("error: run\\_0001 cannot be reopened: ") and "\n" not in said["status"]
