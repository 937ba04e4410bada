"""The web app without a browser (tests/test_app_browser.py drives it in one): its start-up
refusals, the one-line messages a page shows for bad inputs, captions, run folders and the
compile stage. The page's requests go through `Studio`, tested here on the smoke networks
(nothing compiles: preparing a request runs no network)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bdjax import smoke
from launch import app

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
    return app.Studio(editor, dict(editor.defaults), str(tmp_path_factory.mktemp("studio")), label=smoke.LABEL,
                      max_samples=8)


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


def test_a_good_request_is_prepared_at_the_model_size(studio):
    request, notes = prepare(studio, num_samples=2.0, seed=7.0)  # Gradio's numbers may come as floats
    assert (request.num_samples, request.seed, request.prompt) == (2, 7, "a cup of tea")
    assert request.mask.shape == (smoke.IMAGE_SIZE, smoke.IMAGE_SIZE) and 0 < (request.mask > 0).mean() < 0.5
    assert notes == []
    inverted, _ = prepare(studio, invert=True)
    np.testing.assert_array_equal(inverted.mask, 255 - request.mask)


@pytest.mark.parametrize("change, message", [
    (dict(value={"background": None, "layers": []}), "no image: upload a photo to edit first"),
    (dict(value=painted((0, 0, 0, 0))), "the mask is empty: paint over the region to change with the brush, "
                                        "or upload a mask file"),
    (dict(prompt="cat " * 80), "prompt 'cat cat cat"),
    (dict(skip_timesteps=25), "skip_timesteps=25 must be in [0, 25) for timestep_respacing='25'"),
    (dict(aug_num=0), "aug_num=0 must be at least 1"),
    (dict(clip_guidance_lambda=None), "clip_guidance_lambda=None should be of type float"),
    (dict(timestep_respacing="abc"), "timestep_respacing"),
    (dict(num_samples=9), "num_samples=9 is more than this app's limit of 8 (--max_samples)"),
    (dict(num_samples=0), "num_samples=0 must be at least 1"),
    (dict(num_samples=None), "num_samples=None should be an integer"),
    (dict(seed=-1), "seed=-1 must be in [0, 2**31)"),
    (dict(seed=1.5), "seed=1.5 should be an integer"),
])
def test_bad_inputs_are_one_line_messages(studio, change, message):
    with pytest.raises((ValueError, TypeError)) as e:
        prepare(studio, **change)
    text = " ".join(str(e.value).split())
    assert text.startswith(message), text
    assert len(text) < 400


def test_whole_image_masks_are_a_note_not_an_error(studio):
    _, notes = prepare(studio, value=painted((0, 320, 0, 480)))
    assert notes == ["the mask selects the whole image: nothing of the background is preserved"]


def test_captions_and_messages():
    assert app.caption(0, 0.71234, 404, 5, "") == "#0 d=0.7123 seed 404 sample 5"
    assert app.caption(3, 1.0, 1, 2, smoke.LABEL) == "#3 d=1.0000 seed 1 sample 2 (smoke)"
    assert app.plain("error: skip_timesteps=[0, 25) *x* <b>") == r"error: skip\_timesteps=\[0, 25) \*x\* \<b\>"


def test_runs_get_their_own_folder(tmp_path):
    studio = app.Studio(None, {}, str(tmp_path))
    (tmp_path / "run_0007").mkdir()
    (tmp_path / "notes").mkdir()
    assert [os.path.basename(studio.new_run_dir()) for _ in range(2)] == ["run_0008", "run_0009"]


def test_cancel_applies_to_the_sessions_pending_requests_only():
    studio = app.Studio(None, {}, "")
    assert studio.cancel("a") is False  # nothing pending: nothing to cancel
    first = app.Run("", "a", studio.submitted("a"))
    other = app.Run("", "b", studio.submitted("b"))
    assert studio.cancel("a") and studio.is_cancelled(first) and not studio.is_cancelled(other)
    studio.finished(first)
    later = app.Run("", "a", studio.submitted("a"))  # a new request after the cancel runs
    assert not studio.is_cancelled(later)


def test_compiling_is_shown_as_a_stage_of_the_progress():
    calls = []
    studio = app.Studio(None, {}, "")
    studio.show_compiling()  # no request running: nothing to show it on
    studio.progress = lambda value, desc=None: calls.append((value, desc))
    studio.show_compiling()
    assert calls == [(0, "compiling, first run only")]


def test_without_gradio_the_app_names_the_extra_to_install():
    code = ("import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['launch.app', '--config=smoke']; "
            "runpy.run_module('launch.app', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: the web app needs Gradio: pip install -e '.[app]'"
