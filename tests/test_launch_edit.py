"""launch/edit.py end to end, as a user runs it: the smoke preset (tiny random networks, no
weights), the outputs it writes, and its one-line errors. Then its faults in-process, on a
stand-in sampler: results streamed to disk batch by batch, non-finite samples reported (never
written as images), strict JSON, safe --overwrite, and every check made before any work."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bdjax
from bdjax import outputs, smoke
from bdjax.options import EditOptions
from launch_helpers import FakeRun, photo, run_program, snapshot, strict_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.edit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "img.png")
    mask = np.zeros((90, 120), np.uint8)
    mask[20:70, 30:90] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((90, 120), np.uint8)).save(root / "empty.png")
    return root


@pytest.fixture(scope="module")
def smoke_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cache = tmp_path_factory.mktemp("xla")
    common = ["--config=smoke", "--prompt=a red ball", f"--init_image={inputs / 'img.png'}",
              f"--mask={inputs / 'mask.png'}", f"--output_dir={out}", f"--compilation_cache_dir={cache}"]
    proc = run(*common, "--num_samples=3", "--batch_size=2", "--seed=7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, common, proc


def test_smoke_run_writes_ranked_results_grid_and_report(smoke_run):
    out, _, proc = smoke_run
    assert "SMOKE TEST" in proc.stdout and "3 results" in proc.stdout
    names = sorted(os.listdir(out / "ranked"))
    assert [n[:4] for n in names] == ["000_", "001_", "002_"]
    distances = [float(n[4:-4]) for n in names]
    assert distances == sorted(distances)
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert report["label"].startswith("SMOKE TEST")
    assert report["failed"] == []
    assert report["batch_rows"] == 2 and report["batch_size_auto"] is None  # --batch_size=2, not auto
    # Each sample was written as its batch finished; the ranked files are the same images.
    assert sorted(os.listdir(out / "samples")) == [f"sample_{k}.{e}" for k in range(3) for e in ("json", "png")]
    for s in report["samples"]:
        entry = json.loads((out / "samples" / f"sample_{s['sample_id']}.json").read_text())
        assert entry["distance"] == s["distance"] and entry["seed"] == 7
        assert np.array_equal(np.asarray(Image.open(out / entry["file"])), np.asarray(Image.open(out / s["file"])))
    assert report["flags"]["prompt"] == "a red ball" and report["flags"]["seed"] == 7
    assert sorted(s["sample_id"] for s in report["samples"]) == [0, 1, 2]
    assert all(s["seed"] == 7 for s in report["samples"])
    assert [s["file"] for s in report["samples"]] == [f"ranked/{n}" for n in names]
    assert report["options"]["skip_timesteps"] == 15  # the smoke preset's shorter schedule
    # The options are reported once, as they ran: not beside the flag defaults the preset replaced.
    assert report["options"]["timestep_respacing"] == "25"
    assert not set(report["flags"]) & set(EditOptions.names()) and report["flags"]["config"] == "smoke"
    assert report["timings_s"]["edit"] > 0 and report["versions"]["jax"]
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 5 * 120  # source, mask and three results, at the photo's size (120x90)
    for n in names:
        image = np.asarray(Image.open(out / "ranked" / n))
        assert image.shape == (90, 120, 3)
    # The model-size edits CLIP ranked are kept beside the full-size results.
    assert sorted(os.listdir(out / "crops")) == [f"sample_{k}.png" for k in range(3)]
    assert np.asarray(Image.open(out / "crops" / "sample_0.png")).shape == (64, 64, 3)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_every_png_carries_its_provenance(smoke_run):
    out, _, _ = smoke_run
    report = json.loads((out / "report.json").read_text())
    common = {"prompt": "a red ball", "seed": 7, "options": report["options"], "label": smoke.LABEL,
              "bdjax_version": bdjax.__version__}
    for s in report["samples"]:  # a ranked file is its sample's file: both carry the sample's provenance
        for path in (out / s["file"], out / "samples" / f"sample_{s['sample_id']}.png"):
            about = outputs.read_provenance(str(path))
            assert {k: about[k] for k in common} == common
            assert (about["kind"], about["sample_id"], about["distance"]) == ("sample", s["sample_id"], s["distance"])
            assert about["scores"] == s["scores"]
            assert about["run"]["config"] == "smoke" and about["run"]["image_size"] == 64
    about = outputs.read_provenance(str(out / "grid.png"))
    assert {k: about[k] for k in common} == common and about["kind"] == "grid"
    assert about["tiles"] == [{k: s[k] for k in ("rank", "sample_id", "distance", "scores")} for s in report["samples"]]


def test_existing_results_are_kept_unless_overwrite(smoke_run):
    out, common, _ = smoke_run
    before = sorted(os.listdir(out / "ranked"))
    proc = run(*common, "--num_samples=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "--overwrite" in proc.stderr
    assert sorted(os.listdir(out / "ranked")) == before
    (out / "ranked" / "notes.png").write_bytes(b"a user's file")
    (out / "ranked" / ".tmp-killed.png").write_bytes(b"a killed write")
    proc = run(*common, "--num_samples=2", "--overwrite", env={"JAX_DEBUG_LOG_MODULES": "jax._src.compiler"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranked = sorted(os.listdir(out / "ranked"))
    assert ranked[-1] == "notes.png" and (out / "ranked" / "notes.png").read_bytes() == b"a user's file"
    assert len(ranked[:-1]) == 2  # the old run's files are gone, not mixed in (the user's stays)
    assert sorted(os.listdir(out / "samples")) == ["sample_0.json", "sample_0.png", "sample_1.json", "sample_1.png"]
    # Same configuration as the first run: the sampler's loop comes from the persistent cache,
    # with the progress bar on (no host callback in the compiled program).
    assert "cache hit for 'jit_advance'" in proc.stderr and "sample-step" in proc.stderr


def test_smoke_run_says_what_runs_where_before_compiling(smoke_run):
    """Once, before anything compiles: the samples, their steps, the devices and the precision;
    then where the compiled programs are kept; then the progress bar."""
    _, common, proc = smoke_run
    cache = common[-1].split("=", 1)[1]
    err = proc.stderr
    assert len(re.findall(r"^running 3 samples \(10 guided steps each\) on \d+ x cpu, fp32, batch 2 per run, "
                          r"smoke networks$", err,
                          flags=re.M)) == 1, err[-2000:]
    compiled = re.findall(rf"compiled in [\d.]+ s \(cached in {re.escape(cache)}\)$", err, flags=re.M)
    assert len(compiled) == 1 and "loaded the compiled sampler" not in err, err[-2000:]
    assert err.index("running 3 samples") < err.index(compiled[0]) < err.rindex("sample-step")


def test_the_compile_line_says_what_preparing_the_sampler_did(inputs, tmp_path):
    """The compilation cache lives in xla_cache/ of the weights cache ($BDJAX_CACHE) unless
    --compilation_cache_dir says otherwise. The line said when the sampler is ready tells what
    happened, as JAX's cache reported it: compiled (and kept there), loaded from the cache by the
    next run, or compiled and not kept, with the reason (--nocompilation_cache, which leaves no
    cache at all, or a directory that cannot be written)."""
    common = ["--config=smoke", "--prompt=a red ball", f"--init_image={inputs / 'img.png'}", "--num_samples=1",
              "--batch_size=1", "--skip_timesteps=22"]
    # Every program kept, even those compiled in under a second, so that the rerun compiles nothing.
    every = {"BDJAX_CACHE": str(tmp_path / "weights"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cache = re.escape(str(tmp_path / "weights" / "xla_cache"))
    first = run(*common, f"--output_dir={tmp_path / 'a'}", env=every)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [n for n in os.listdir(tmp_path / "weights" / "xla_cache") if n.startswith("jit_advance-")]
    assert re.search(rf"compiled in [\d.]+ s \(cached in {cache}\)$", first.stderr, flags=re.M), first.stderr[-2000:]
    again = run(*common, f"--output_dir={tmp_path / 'b'}", env=every)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"loaded the compiled sampler from the compilation cache in [\d.]+ s \({cache}\)$",
                     again.stderr, flags=re.M), again.stderr[-2000:]
    assert "compiled in" not in again.stderr and "compiling" not in again.stderr

    off = run(*common, f"--output_dir={tmp_path / 'c'}", "--nocompilation_cache",
              env={"BDJAX_CACHE": str(tmp_path / "none")})
    assert off.returncode == 0, off.stderr[-3000:]
    assert not os.path.exists(tmp_path / "none")
    assert "compiling (not cached: --nocompilation_cache)\n" in off.stderr
    assert re.search(r"compiled in [\d.]+ s \(not cached: --nocompilation_cache\)$", off.stderr, flags=re.M)

    (tmp_path / "blocked").write_text("a file where the cache directory would go")
    blocked = run(*common, f"--output_dir={tmp_path / 'd'}", f"--compilation_cache_dir={tmp_path / 'blocked'}")
    assert blocked.returncode == 0, blocked.stderr[-3000:]
    blocked_path = re.escape(str(tmp_path / "blocked"))
    why = rf"not cached: {blocked_path} is not usable: {blocked_path} is not a directory"
    assert re.search(rf"compiling \({why}\)$", blocked.stderr, flags=re.M), blocked.stderr[-2000:]
    assert re.search(rf"compiled in [\d.]+ s \({why}\)$", blocked.stderr, flags=re.M)
    assert (tmp_path / "blocked").read_text() == "a file where the cache directory would go"



def test_missing_weights_offline_names_the_command(inputs, tmp_path):
    proc = run("--prompt=a cat", f"--init_image={inputs / 'img.png'}", f"--output_dir={tmp_path / 'out'}",
               "--download=false", "--allow_cpu", env={"BDJAX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "python -m checkpoints_convert.fetch" in err and str(tmp_path / "cache") in err


def test_bad_inputs_are_one_line_errors_and_leave_nothing(inputs, tmp_path):
    """Each bad input: exit status 2, one line naming the problem, no output directory created."""
    (tmp_path / "notes.txt").write_text("not an image")
    png = (inputs / "img.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 3])
    (tmp_path / "a_file").write_text("")
    wrong = tmp_path / "wrong_weights"  # a CLIP checkpoint where the UNet should be
    from bdjax import checkpoint
    checkpoint.save(str(wrong), "unet", checkpoint.flatten(smoke.networks(with_lpips=False)["clip"][1]),
                    smoke.unet_config(), model="unet")
    checkpoint.save(str(wrong), "clip", checkpoint.flatten(smoke.networks(with_lpips=False)["clip"][1]),
                    smoke.CLIP_CONFIG, model="clip")
    image = f"--init_image={inputs / 'img.png'}"
    cases = [
        ([f"--mask={inputs / 'empty.png'}", "--prompt=a cat", image], "selects no pixel"),
        (["--prompt=" + "word " * 80, image], "tokens long"),
        ([f"--init_image={tmp_path / 'missing.png'}", "--prompt=a cat"], "no such file"),
        ([f"--init_image={tmp_path / 'notes.txt'}", "--prompt=a cat"], "not a readable image"),
        ([f"--init_image={tmp_path / 'truncated.png'}", "--prompt=a cat"], "not a readable image"),
        (["--prompt=a cat", image, "--num_samples=0"], "--num_samples=0 must be at least 1"),
        (["--prompt=a cat", image, "--skip_timesteps=25", "--timestep_respacing=25"], "skip_timesteps=25"),
        (["--prompt=a cat", image, "--timestep_respacing=fast"], "timestep_respacing"),
        (["--prompt=a cat", image, f"--output_dir={tmp_path / 'a_file' / 'out'}"], "is a file"),
        ([image], "--prompt and --init_image are required"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        proc = run("--config=smoke", f"--output_dir={out}", *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
        assert not out.exists()
    # A checkpoint of the wrong model: the mismatch names keys, on one line.
    proc = run("--prompt=a cat", image, f"--checkpoint_dir={wrong}", f"--output_dir={tmp_path / 'out'}", "--allow_cpu")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "does not match the module" in err and "missing" in err, err
    assert not (tmp_path / "out").exists()


def test_real_networks_on_a_cpu_stop_before_loading_weights(inputs, tmp_path):
    """Without --allow_cpu the real configuration on a CPU stops at once, naming the smoke preset,
    the accelerator installs and --allow_cpu; the inputs are still checked first."""
    out = tmp_path / "out"
    proc = run("--prompt=a cat", f"--init_image={inputs / 'img.png'}", f"--output_dir={out}",
               env={"BDJAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: JAX sees only a CPU"), proc.stderr
    assert "--config=smoke" in lines[0] and ".[cuda]" in lines[0] and "--allow_cpu" in lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing fetched, nothing written
    proc = run("--prompt=a cat", f"--init_image={inputs / 'missing.png'}", f"--output_dir={out}")
    assert proc.returncode == 2 and "no such file" in proc.stderr  # a bad input is still named first


# ---------------------------------------------------------------------------------------------
# In-process, on a stand-in sampler (tests/launch_helpers.py: no networks, nothing compiled): results
# streamed to disk batch by batch, non-finite samples reported (never written as images), strict
# JSON, safe --overwrite, and the checks made before any work.

def test_edit_writes_each_batch_as_it_finishes(program_flags, monkeypatch, image_file, tmp_path):
    """A run that dies after its first batch keeps that batch's samples, complete, on disk."""
    out = tmp_path / "out"

    class DiesInSecondBatch(FakeRun):
        def __call__(self, *args, **kwargs):
            if self.batches:
                raise RuntimeError("device lost")
            return super().__call__(*args, **kwargs)

    with pytest.raises(RuntimeError, match="device lost"):
        run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                         "--num_samples=4", "--batch_size=2", f"--output_dir={out}"],
                    DiesInSecondBatch())
    assert sorted(os.listdir(out)) == ["crops", "samples"]
    assert sorted(os.listdir(out / "samples")) == ["sample_0.json", "sample_0.png", "sample_1.json", "sample_1.png"]
    assert sorted(os.listdir(out / "crops")) == ["sample_0.png", "sample_1.png"]
    entry = strict_json(out / "samples" / "sample_1.json")
    assert entry["sample_id"] == 1 and entry["file"] == "samples/sample_1.png"
    assert entry["distance"] == pytest.approx(0.5)
    assert np.asarray(Image.open(out / "samples" / "sample_1.png")).mean() == round(0.01 * 255)


def test_edit_ranks_from_disk_and_reports_non_finite_samples(program_flags, monkeypatch, image_file, tmp_path,
                                                            capsys):
    out = tmp_path / "out"
    run = FakeRun(nan=[1], inf=[2])
    status = run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                              "--num_samples=5", "--batch_size=2",
                                                              f"--output_dir={out}"], run)
    assert status == 0
    err = capsys.readouterr().err
    assert "sample(s) 1 turned non-finite" in err and "sample(s) 2 turned non-finite" in err
    assert {b["init"][0] for b in run.batches} == {2}
    # Ranked best first (sample k's distance is 1 / (k + 1)); the failed ones are nowhere.
    assert sorted(os.listdir(out / "ranked")) == ["000_0.2000.png", "001_0.2500.png", "002_1.0000.png"]
    assert not (out / "samples" / "sample_1.png").exists() and not (out / "samples" / "sample_2.png").exists()
    assert os.path.samefile(out / "ranked" / "000_0.2000.png", out / "samples" / "sample_4.png")
    report = strict_json(out / "report.json")
    assert [s["sample_id"] for s in report["samples"]] == [4, 3, 0]
    assert [(f["sample_id"], "NaN" in f["reason"] or "inf" in f["reason"]) for f in report["failed"]] == [
        (1, True), (2, True)]
    failed = strict_json(out / "samples" / "sample_2.json")
    assert failed["distance"] is None and "inf" in failed["failed"]
    assert Image.open(out / "grid.png").size[0] == 5 * photo().shape[1]  # source, mask, three results (photo size)


def test_edit_with_every_sample_non_finite_fails_with_one_line(program_flags, monkeypatch, image_file, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    status = run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                              "--num_samples=2", "--batch_size=2",
                                                              f"--output_dir={out}"], FakeRun(nan=[0, 1]))
    assert status == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: all 2 samples turned non-finite")
    assert not (out / "ranked").exists() or not os.listdir(out / "ranked")
    assert [f["sample_id"] for f in strict_json(out / "report.json")["failed"]] == [0, 1]


def test_edit_overwrite_removes_only_its_own_files_after_the_checks(program_flags, monkeypatch, image_file,
                                                                     tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--prompt=a cat", "--batch_size=2", f"--output_dir={out}"]
    assert run_program(program_flags, monkeypatch, "edit", [*common, f"--init_image={image_file}",
                                                            "--num_samples=4"]) == 0
    (out / "ranked" / "notes.png").write_bytes(b"mine")
    (out / "ranked" / "000_my_favourite.png").write_bytes(b"mine too")
    (out / "todo.txt").write_text("mine")
    capsys.readouterr()
    before = snapshot(out)
    # A typo in the image: refused before anything is touched, --overwrite or not.
    for extra in ([], ["--overwrite"]):
        status = run_program(program_flags, monkeypatch, "edit", [*common, f"--init_image={tmp_path / 'im.png'}",
                                                                  "--num_samples=2", *extra])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and "no such file" in err, err
        assert snapshot(out) == before
    # Without --overwrite a good run is refused too, naming the flag.
    status = run_program(program_flags, monkeypatch, "edit", [*common, f"--init_image={image_file}", "--num_samples=2"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "--overwrite" in err and snapshot(out) == before
    # A killed write's temporaries go; the new run replaces bdjax's files and keeps the user's.
    (out / ".tmp-k1x2.json").write_text("{")
    (out / "ranked" / ".tmp-9zz.png").write_bytes(b"half")
    assert run_program(program_flags, monkeypatch, "edit", [*common, f"--init_image={image_file}", "--num_samples=2",
                                                            "--overwrite"]) == 0
    assert sorted(os.listdir(out / "ranked")) == ["000_0.5000.png", "000_my_favourite.png", "001_1.0000.png",
                                                  "notes.png"]
    assert sorted(os.listdir(out / "samples")) == ["sample_0.json", "sample_0.png", "sample_1.json", "sample_1.png"]
    assert sorted(os.listdir(out)) == ["crops", "grid.png", "ranked", "report.json", "samples", "todo.txt"]
    assert (out / "ranked" / "notes.png").read_bytes() == b"mine"


def test_edit_refuses_names_it_could_not_write_before_any_work(program_flags, monkeypatch, image_file, tmp_path,
                                                               capsys):
    """ranked/ as a file, report.json as a directory: found by the preflight, not after compute."""
    for blocker, make, message in (("ranked", lambda p: p.write_text("x"), "is a file"),
                                   ("report.json", lambda p: p.mkdir(), "a directory has that name")):
        out = tmp_path / blocker / "out"
        out.mkdir(parents=True)
        make(out / blocker)
        before = snapshot(out)
        run = FakeRun()
        status = run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                                  "--num_samples=2", f"--output_dir={out}"], run)
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and message in err, err
        assert run.batches == [] and snapshot(out) == before and sorted(os.listdir(out)) == [blocker]


def test_edit_bounds_num_samples_before_any_work(program_flags, monkeypatch, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    run = FakeRun()
    status = run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                              "--num_samples=1000000000", f"--output_dir={out}"], run)
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "--num_samples=1000000000 is more than" in err, err
    assert run.batches == [] and not out.exists()


def test_edit_refuses_an_empty_output_dir(program_flags, monkeypatch, image_file, capsys):
    run = FakeRun()
    status = run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                              "--output_dir="], run)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == "error: output directory '' is empty: name a directory", err
    assert run.batches == []


def test_ctrl_c_ranks_what_finished_and_says_so_in_one_line(inputs, tmp_path):
    """SIGINT mid-run: the finished samples are kept and ranked (grid, report marked interrupted),
    one line says what was kept and how to get the rest, no traceback, exit status 130."""
    import signal
    import time

    import jax

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "launch.edit", "--config=smoke", "--prompt=a red ball",
                             f"--init_image={inputs / 'img.png'}", f"--mask={inputs / 'mask.png'}", "--num_samples=6",
                             "--batch_size=1", f"--output_dir={out}",
                             f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "samples" / "sample_0.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    report = json.loads((out / "report.json").read_text())
    kept = len(report["samples"])
    assert 1 <= kept < 6 and report["interrupted"]["asked"] == 6, report.get("interrupted")
    assert last == (f"interrupted: {kept} of the 6 samples finished and are kept in {out} and ranked (grid.png, "
                    "report.json); rerun with --overwrite for all 6 (the kept ones come out the same)")
    assert len(os.listdir(out / "ranked")) == kept and (out / "grid.png").exists()


def test_an_empty_prompt_runs_unguided_through_the_program(inputs, tmp_path):
    """--prompt='' (the unguided mode) runs the unguided sampler and says so before it runs; the
    results, report and provenance carry the empty prompt."""
    import jax

    from bdjax import outputs

    out = tmp_path / "out"
    proc = run("--config=smoke", "--prompt=", f"--init_image={inputs / 'img.png'}", f"--mask={inputs / 'mask.png'}",
               "--num_samples=2", "--skip_timesteps=22", f"--output_dir={out}",
               f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^running 2 samples \(3 unguided steps each\) on ", proc.stderr, flags=re.M), proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["flags"]["prompt"] == "" and len(report["samples"]) == 2
    for sample in report["samples"]:
        assert outputs.read_provenance(str(out / sample["file"]))["prompt"] == ""


def test_a_second_run_into_the_same_directory_refuses_naming_the_first(inputs, tmp_path):
    """Two edits into one --output_dir at once never mix: the second refuses at once (exit 2, one
    line naming the first run's pid), even with --overwrite, and the first finishes untouched."""
    import time

    import jax

    out = tmp_path / "out"
    common = ["--config=smoke", f"--init_image={inputs / 'img.png'}", f"--mask={inputs / 'mask.png'}",
              f"--output_dir={out}", "--batch_size=1", f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}"]
    first = subprocess.Popen([sys.executable, "-m", "launch.edit", "--prompt=a red ball", "--num_samples=3", *common],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / ".bdjax-run.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run("--prompt=a blue ball", "--num_samples=1", "--overwrite", *common)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: output directory {out} is in use by another run (pid {first.pid} on host "), line
    report = json.loads((out / "report.json").read_text())
    assert report["flags"]["prompt"] == "a red ball" and len(report["samples"]) == 3
    assert len(os.listdir(out / "ranked")) == 3 and not (out / ".bdjax-run.lock").exists()


def test_ctrl_c_while_compiling_is_the_same_one_line_and_no_crash(inputs, tmp_path):
    """SIGINT early in a run whose sampler compiles afresh (about 20 s here): whatever phase it lands
    in, one "interrupted:" line, exit 130, and no traceback or crash of an interrupted compile."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "launch.edit", "--config=smoke", "--prompt=a red ball",
                             f"--init_image={inputs / 'img.png'}", "--num_samples=2", f"--output_dir={tmp_path / 'o'}",
                             f"--compilation_cache_dir={tmp_path / 'fresh_cache'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: "), err[-3000:]

