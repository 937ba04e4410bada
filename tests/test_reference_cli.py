"""The reference's command line in launch.edit (its flag spellings, its result names, --vid and
--export_assets), and the step callback behind them (`edit_batches(on_step=...)`), on the smoke
networks.

The authors' README command is run as they print it (flags, quoting, order), with their
input_example/ paths (here copies of examples/coffee.png and its cup mask), plus --config=smoke
and this suite's compilation cache."""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from bdjax import outputs, smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The authors' README command, as printed there.
AUTHORS = 'python main.py -p "rock" -i "input_example/img.png" --mask "input_example/mask.png" --output_path "output"'


def authors_argv() -> list[str]:
    import shlex

    argv = shlex.split(AUTHORS)
    assert argv[:2] == ["python", "main.py"]
    return argv[2:]


def run_edit(args, cwd, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "launch.edit", *args, "--config=smoke",
                           f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("authors")
    (work / "input_example").mkdir()
    shutil.copyfile(os.path.join(ROOT, "examples", "coffee.png"), work / "input_example" / "img.png")
    shutil.copyfile(os.path.join(ROOT, "examples", "coffee_cup_mask.png"), work / "input_example" / "mask.png")
    return work


def test_the_authors_command_runs_unchanged_with_their_names_videos_and_assets(workdir):
    """Their command, with --iterations_num 2 --batch_size 2 (4 samples), --vid and
    --export_assets: the reference's ranked names, one video per sample whose frames are the
    steps run and whose last frame is the result at the model size, and the assets."""
    proc = run_edit(authors_argv() + ["--iterations_num", "2", "--batch_size", "2", "--vid", "--export_assets"],
                    workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "output"
    ranked = sorted(os.listdir(out / "ranked"))
    assert len(ranked) == 4 and all(re.fullmatch(r"\d{5}_output_i_[01]_b_[01]\.png", n) for n in ranked), ranked
    names = {n[6:] for n in ranked}
    assert names == {f"output_i_{i}_b_{b}.png" for i in (0, 1) for b in (0, 1)}
    # The distance in the name is the report's, to 4 decimals without its point.
    import json

    report = json.loads((out / "report.json").read_text())
    by_file = {os.path.basename(s["file"]): s for s in report["samples"]}
    for name, sample in by_file.items():
        assert name.startswith(f"{sample['distance']:.4f}".replace(".", "") + "_")
        i, b = map(int, re.search(r"_i_(\d+)_b_(\d+)", name).groups())
        assert sample["sample_id"] == 2 * i + b
    steps = 10  # the smoke preset: 25 steps, 15 skipped
    fmt = outputs.video_format()
    for k in range(4):
        stem = f"output_i_{k // 2}_b_{k % 2}"
        with Image.open(out / f"{stem}.{fmt}") as video:
            assert video.n_frames == steps
            video.seek(steps - 1)
            last = np.asarray(video.convert("RGB"))
        crop = outputs.read_png(str(out / outputs.CROPS_DIR / outputs.sample_name(k)))
        np.testing.assert_array_equal(last, crop)  # the last frame is the result at the model size
        asset = outputs.read_png(str(out / "assets" / f"{stem}.png"))
        assert asset.shape == (smoke.IMAGE_SIZE, smoke.IMAGE_SIZE, 3)
        assert outputs.read_provenance(str(out / "assets" / f"{stem}.png"))["sample_id"] == k
    with Image.open(out / "assets" / outputs.ASSET_MASK) as im:
        assert im.mode == "L"
        mask = np.asarray(im)
    assert mask.shape == (smoke.IMAGE_SIZE, smoke.IMAGE_SIZE) and set(np.unique(mask)) <= {0, 255}


def test_bdjax_names_for_videos_and_assets_and_the_best_result_under_its_given_name(workdir, tmp_path):
    proc = run_edit(["--prompt=rock", "--init_image=input_example/img.png", "--mask=input_example/mask.png",
                     f"--output_dir={tmp_path / 'ours'}", "--num_samples=2", "--vid", "--export_assets"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = tmp_path / "ours"
    fmt = outputs.video_format()
    assert sorted(os.listdir(ours / outputs.VIDEOS_DIR)) == [f"sample_0.{fmt}", f"sample_1.{fmt}"]
    assert sorted(os.listdir(ours / outputs.ASSETS_DIR)) == ["mask.png", "sample_0.png", "sample_1.png"]
    assert all(re.fullmatch(r"\d{3}_\d+\.\d{4}\.png", n) for n in os.listdir(ours / "ranked"))

    proc = run_edit(["-p", "rock", "-i", "input_example/img.png", "--mask", "input_example/mask.png",
                     "--output_path", str(tmp_path / "theirs"), "-o", "best.png", "--num_samples=2"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = tmp_path / "theirs"
    [best] = [n for n in sorted(os.listdir(theirs / "ranked"))[:1]]
    assert re.fullmatch(r"\d{5}_best_i_0_b_[01]\.png", best)
    np.testing.assert_array_equal(outputs.read_png(str(theirs / "best.png")),
                                  outputs.read_png(str(theirs / "ranked" / best)))


@pytest.mark.parametrize("args, message", [
    (["--iterations_num", "2", "--num_samples=4"],
     "error: --num_samples and --iterations_num (the reference's spelling) say the same thing: give one"),
    (["--output_dir=elsewhere"],
     "error: --output_dir and --output_path (the reference's spelling) say the same thing: give one"),
    (["-o", "out/best.png"], "error: --output_file='out/best.png' must be a file name ending in .png"),
    (["-o", "best.jpg"], "error: --output_file='best.jpg' must be a file name ending in .png"),
    (["--iterations_num", "0"], "error: --iterations_num=0 must be at least 1"),
    (["--gpu_id", "3", "--vid"], "error: --gpu_id=3: this machine has 1 local cpu device (ids 0 to 0)"),
    (["--gpu_id", "3", "--export_assets"], "error: --gpu_id=3: this machine has 1 local cpu device (ids 0 to 0)"),
    (["--no_enforce_background", "--enforce_background"],
     "error: --enforce_background and --no_enforce_background (the reference's spelling) say the same thing"),
])
def test_the_reference_flags_misused_are_one_line(workdir, args, message, program_flags, monkeypatch, capsys):
    """In-process, as the command line runs launch.edit (tests/launch_helpers.py run_program)."""
    from launch_helpers import run_program

    monkeypatch.chdir(workdir)
    assert run_program(program_flags, monkeypatch, "edit", authors_argv() + args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert "Traceback" not in err


def test_on_step_sees_every_chunk_and_changes_nothing(tmp_path):
    """on_step is called after each chunk of each batch with the batch's ids and predictions at
    the model size; the samples are byte for byte those of a run without it, and a second run
    with it compiles nothing."""
    editor = smoke.editor()
    with Image.open(os.path.join(ROOT, "examples", "coffee.png")) as im:
        photo = np.asarray(im.convert("RGB"))
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[100:140, 200:260] = 255
    kwargs = dict(num_samples=3, seed=5, progress=False, batch_size=2)
    plain = list(editor.edit_batches(photo, mask, "a cup", **kwargs))
    seen = []
    watched = list(editor.edit_batches(photo, mask, "a cup", on_step=seen.append, **kwargs))
    for a, b in zip(plain, watched):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.distances, b.distances)
    steps = seen[0].num_steps
    chunk = steps // 10 if steps >= 10 else 1
    assert [p.step for p in seen] == [chunk * (i + 1) for i in range(steps // chunk)] * 2
    assert [list(p.sample_ids) for p in seen] == [[0, 1]] * (steps // chunk) + [[2]] * (steps // chunk)
    for p in seen:
        assert p.images.dtype == np.uint8 and p.images.shape == (len(p.sample_ids), 64, 64, 3)
        assert p.raw.dtype == np.float32 and p.raw.shape == p.images.shape
    finals = [p for p in seen if p.step == p.num_steps]
    np.testing.assert_array_equal(np.concatenate([p.images for p in finals]),
                                  np.concatenate([b.crops for b in watched]))

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    list(editor.edit_batches(photo, mask, "a cup", on_step=seen.append, **kwargs))
    assert compiles == []  # the programs of the first run, reused: no host callback inside them
