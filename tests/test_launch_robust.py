"""Faults and hostile inputs around the launch programs: results streamed to disk batch by batch,
non-finite samples reported (never written as images), strict JSON, one-line flag errors, the
extrapolation preflight, safe --overwrite, stale temporaries and file permissions.

Most tests run in-process on a stand-in sampler (no networks, nothing compiled); subprocess
runs are kept to failures that happen before any network is built.
"""

import json
import os
import re
import stat
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bdjax import files, outputs, parallel
from bdjax.blended import Models
from bdjax.options import MAX_NUM_SAMPLES
from bdjax.editor import BlendedDiffusion, EditBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # the smoke preset's model size, which the launch programs check against


class FakeRun:
    """Stands in for a CompiledSampler: sample k's image is a flat grey of k / 100, its distance
    1 / (k + 1) (so later samples rank first); samples in `nan` come out NaN, those in `inf`
    get an infinite distance. Records the shape of every batch it is given."""
    num_steps = 1

    def __init__(self, nan=(), inf=()):
        self.nan, self.inf, self.batches = set(nan), set(inf), []

    def compiled(self, *inputs) -> bool:
        return True  # nothing to compile

    def __call__(self, params, init, mask, text_embed, sample_ids, seeds, on_steps=None):
        ids = np.asarray(sample_ids)
        self.batches.append({"init": init.shape, "ids": ids.tolist(), "seeds": np.asarray(seeds).tolist()})
        images = np.broadcast_to((ids / 100.0)[:, None, None, None], (len(ids), SIZE, SIZE, 3)).copy()
        distances = 1.0 / (ids + 1.0)
        for k in self.nan:
            images[ids == k] = np.nan
        for k in self.inf:
            distances[ids == k] = np.inf
        return {"images": jnp.asarray(images, jnp.float32), "distances": jnp.asarray(distances, jnp.float32)}


def fake_editor(run: FakeRun) -> BlendedDiffusion:
    """An editor whose sampler is `run` and whose prompt encoder is a constant: no networks."""
    editor = BlendedDiffusion.__new__(BlendedDiffusion)
    editor.models = Models(unet=None, clip=types.SimpleNamespace(context_length=77))
    editor.mesh = parallel.make_mesh()
    editor.params = {}
    editor.image_size = SIZE
    editor._samplers = {}
    editor.defaults = {}
    editor.weights_digest = "fake"
    editor.sampler = lambda options, guided: run
    editor.encode_tokens = lambda tokens: jnp.zeros(8)
    return editor


def photo():
    return np.random.RandomState(0).randint(0, 256, (20, 24, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# The editor's streaming API and its finite flags.

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


@pytest.mark.parametrize("error, shown", [
    (MemoryError("Unable to allocate 4.47 TiB for an array"), "Unable to allocate 4.47 TiB"),  # numpy, host
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2458624055416648 bytes.\nmore"),
     "RESOURCE_EXHAUSTED: Out of memory allocating"),  # XLA, device
])
def test_out_of_memory_is_one_line_naming_the_fix(capsys, error, shown):
    from launch import runtime

    def main(argv):
        raise error

    with pytest.raises(SystemExit) as stop:
        runtime.program(main)(["prog"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: out of memory ({shown}") and "--batch_size" in err[0]


def test_other_runtime_errors_keep_their_traceback():
    from launch import runtime

    def main(argv):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        runtime.program(main)(["prog"])


def test_edit_batches_inputs_are_views_whatever_num_samples():
    """A huge num_samples allocates nothing per sample before the first batch: the per-sample
    inputs are broadcast views of one image, mask and embedding, and the ids stay a range."""
    run = FakeRun()
    editor = fake_editor(run)
    seen = {}
    real = editor.sample_batches

    def spy(options, guided, init, mask, text_embed, sample_ids, seeds, progress=False, batch_rows=None):
        seen.update(init=init, mask=mask, text_embed=text_embed, sample_ids=sample_ids, seeds=seeds)
        return real(options, guided, init, mask, text_embed, sample_ids, seeds, progress, batch_rows)

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


# ---------------------------------------------------------------------------------------------
# Output files: strict JSON, temporaries, permissions.

def test_save_json_refuses_non_finite_numbers(tmp_path):
    for bad in (float("nan"), float("inf"), np.float32("nan"), np.array([1.0, -np.inf])):
        with pytest.raises(outputs.NonFiniteJSONError, match="non-finite"):
            outputs.save_json(str(tmp_path / "r.json"), {"x": [1, {"y": bad}]})
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary
    outputs.save_json(str(tmp_path / "r.json"), outputs.finite_or_none({"x": [np.nan, np.float32(0.5)]}))
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [None, 0.5]}


def test_remove_stale_temporaries_removes_only_temporaries(tmp_path):
    (tmp_path / ".tmp-abc.png").write_bytes(b"half")
    (tmp_path / ".tmp-def.json").write_text("{")
    (tmp_path / "keep.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".tmp-x.png").write_bytes(b"x")  # not recursive
    removed = files.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-abc.png", ".tmp-def.json"]
    assert sorted(os.listdir(tmp_path)) == ["keep.png", "sub"] and os.listdir(tmp_path / "sub") == [".tmp-x.png"]
    assert files.remove_stale_temporaries(str(tmp_path / "missing")) == []


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


# ---------------------------------------------------------------------------------------------
# The launch programs in-process, on the stand-in sampler (the smoke config's flags, no networks).

@pytest.fixture(scope="module")
def program_flags():
    """The flags of launch/extrapolate.py (which include launch/edit.py's), defined once."""
    from absl import flags

    from launch import extrapolate

    if "strip" not in flags.FLAGS:
        extrapolate.define_flags()
    yield flags.FLAGS
    flags.FLAGS.unparse_flags()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(photo()).save(path)
    return path


def run_program(flags_, monkeypatch, program: str, args: list[str], run: FakeRun | None = None) -> int:
    """Run launch.<program>'s main as its command line would, with `run` as the sampler; returns
    the exit status (0 when main returns)."""
    import importlib

    from launch import runtime

    module = importlib.import_module(f"launch.{program}")
    flags_.unparse_flags()
    flags_([program, "--config=smoke", "--nocompilation_cache", *args])
    editor = fake_editor(run or FakeRun())
    monkeypatch.setattr(runtime, "build_editor", lambda need_lpips: editor)
    try:
        runtime.program(module.main)([program])
    except SystemExit as e:
        return e.code
    return 0


def snapshot(directory) -> dict:
    """Every file under `directory` (relative path -> bytes), to compare before and after."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


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
    assert sorted(os.listdir(out)) == ["samples"]
    assert sorted(os.listdir(out / "samples")) == ["sample_0.json", "sample_0.png", "sample_1.json", "sample_1.png"]
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
    assert Image.open(out / "grid.png").size[0] == 5 * SIZE  # source, mask and the three results


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
    assert sorted(os.listdir(out)) == ["grid.png", "ranked", "report.json", "samples", "todo.txt"]
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


def test_extrapolate_checks_everything_before_touching_the_output(program_flags, monkeypatch, image_file, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    common = ["--prompt=sky", "--side=right", "--strip=16", "--repeats=1", "--num_samples=2", "--batch_size=2",
              f"--output_dir={out}"]
    assert run_program(program_flags, monkeypatch, "extrapolate", [*common, f"--init_image={image_file}"]) == 0
    assert sorted(os.listdir(out)) == ["canvas_0.png", "canvas_1.png", "extrapolated.png", "grid.png", "report.json"]
    assert strict_json(out / "report.json")["rounds"][0]["distance"] == pytest.approx(0.5)
    (out / "canvas_notes.png").write_bytes(b"mine")
    (out / "sketch.png").write_bytes(b"mine")
    capsys.readouterr()
    before = snapshot(out)
    bad = [([f"--init_image={tmp_path / 'typo.png'}", "--overwrite"], "no such file"),
           ([f"--init_image={image_file}", "--overwrite", "--seed=-1"], "--seed=-1"),
           ([f"--init_image={image_file}", "--overwrite", "--prompt=" + "word " * 80], "tokens"),
           ([f"--init_image={image_file}"], "--overwrite")]
    for args, message in bad:
        status = run_program(program_flags, monkeypatch, "extrapolate", [*common, *args])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and message in err, (args, err)
        assert snapshot(out) == before, args
    (out / ".tmp-dead.png").write_bytes(b"half")
    assert run_program(program_flags, monkeypatch, "extrapolate",
                       [*common, f"--init_image={image_file}", "--overwrite", "--repeats=2"]) == 0
    assert sorted(os.listdir(out)) == ["canvas_0.png", "canvas_1.png", "canvas_2.png", "canvas_notes.png",
                                       "extrapolated.png", "grid.png", "report.json", "sketch.png"]


def test_extrapolate_round_of_non_finite_samples_stops_with_one_line(program_flags, monkeypatch, image_file,
                                                                     tmp_path, capsys):
    out = tmp_path / "out"
    status = run_program(program_flags, monkeypatch, "extrapolate",
                         ["--prompt=sky", "--side=left", "--strip=16", "--repeats=2", "--num_samples=2",
                          "--batch_size=2", f"--output_dir={out}", f"--init_image={image_file}"],
                         FakeRun(nan=[0], inf=[1]))
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: round 1 (left): all 2 samples")
    assert sorted(os.listdir(out)) == ["canvas_0.png"]


def test_extrapolate_best_never_picks_a_non_finite_sample(program_flags, monkeypatch, image_file, tmp_path):
    out = tmp_path / "out"
    # Sample 1 would win (lower distance) but its image is NaN: sample 0 (grey 0) is kept.
    assert run_program(program_flags, monkeypatch, "extrapolate",
                       ["--prompt=sky", "--side=right", "--strip=16", "--repeats=1", "--num_samples=2",
                        "--batch_size=2", f"--output_dir={out}", f"--init_image={image_file}"], FakeRun(nan=[1])) == 0
    final = np.asarray(Image.open(out / "extrapolated.png"))
    assert (final[:, -16:] == 0).all()
    assert strict_json(out / "report.json")["rounds"][0]["distance"] == pytest.approx(1.0)


def test_extrapolate_default_strip_is_a_quarter_of_the_model_size(program_flags, monkeypatch, image_file, tmp_path):
    """Without --strip the smoke model (64 pixels) grows by 16 per round, not the 64 meant for 256."""
    out = tmp_path / "out"
    assert run_program(program_flags, monkeypatch, "extrapolate",
                       ["--prompt=sky", "--side=right", "--repeats=1", "--num_samples=2", "--batch_size=2",
                        f"--output_dir={out}", f"--init_image={image_file}"], FakeRun()) == 0
    report = strict_json(out / "report.json")
    assert report["strip"] == 16 and report["size"] == {"height": SIZE, "width": SIZE + 16}


# ---------------------------------------------------------------------------------------------
# Subprocesses: the exit status and stderr of bad flags and of checks made before any network.

def run_module(module: str, *args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


BAD_FLAGS = {
    "launch.edit": ["--precision=fp16", "--seed=abc", "--clip_guidance_lambda=x", "--prompt"],
    "launch.batch_edit": ["--precision=fp16", "--batch_size=abc"],
    "launch.extrapolate": ["--side=up", "--strip=wide"],
    "launch.benchmark": ["--config=huge", "--batch_size=abc"],
    "launch.compile_report": ["--precision=fp16", "--per_device_batch=abc"],
    "launch.gpu_proof": ["--deterministic=maybe", "--num_samples=abc"],
    "checkpoints_convert.unet": ["--overwrite=maybe"],
    "checkpoints_convert.clip": ["--overwrite=maybe"],
    "checkpoints_convert.lpips": ["--overwrite=maybe"],
    "checkpoints_convert.fetch": ["--force=maybe", "--models"],
}


@pytest.mark.parametrize("module,flag", [(m, f) for m, fs in BAD_FLAGS.items() for f in ["--bogus_flag=1", *fs]])
def test_bad_flags_are_one_line_and_status_2(module, flag, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, flag], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    name = flag.split("=")[0].lstrip("-")
    assert name in err, err
    assert os.listdir(tmp_path) == []  # nothing written where it ran


def test_extrapolate_preflight_runs_before_any_network(image_file, tmp_path):
    """Each of these fails in the preflight (no network built): status 2, one line naming the
    flag, nothing left behind."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    common = ["--config=smoke", "--prompt=sky", f"--init_image={image_file}", f"--output_dir={out}"]
    png = image_file.read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 3])
    cases = [
        (["--strip=64"], "--strip=64 must be in (0, 64)"),
        (["--strip=8", "--seed=-1"], "--seed=-1"),
        (["--strip=8", f"--output_dir={tmp_path / 'a_file' / 'out'}"], "is a file"),
        (["--strip=8", f"--init_image={tmp_path / 'truncated.png'}"], "not a readable image"),
        (["--strip=8", "--repeats=0"], "--repeats=0"),
        (["--strip=8", "--repeats=100000000"], "--repeats=100000000 rounds of --strip=8"),
    ]
    for args, message in cases:
        proc = run_module("launch.extrapolate", *common, *args)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and message in err, (args, err)
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a_file", "img.png", "truncated.png"]


def test_user_errors_are_one_line_and_crashes_keep_their_traceback(capsys):
    import errno
    import json as json_lib

    import jax

    from launch import runtime

    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  the exception under test
            return e
        raise AssertionError("did not raise")

    user = [raised(lambda: json_lib.loads("{oops")), raised(lambda: b"\xff".decode("utf-8")),
            NotADirectoryError("x is a file"), OSError(errno.ENOSPC, "No space left on device"),
            ValueError("--seed=-1 must be in [0, 2**31)")]
    crashes = [outputs.NonFiniteJSONError("r.json: nan"), OSError(errno.EIO, "I/O error"), RuntimeError("bug"),
               raised(lambda: jax.numpy.reshape(jax.numpy.zeros(3), (2, 2))), KeyError("x")]
    assert [runtime.is_user_error(e) for e in user] == [True] * len(user)
    assert [runtime.is_user_error(e) for e in crashes] == [False] * len(crashes)
    with pytest.raises(SystemExit) as exit_:
        with runtime.user_errors():
            raise user[0]
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Expecting property name") and len(err.strip().splitlines()) == 1
    with pytest.raises(RuntimeError):
        with runtime.user_errors():
            raise crashes[2]


@pytest.mark.parametrize("module", ["launch.edit", "launch.batch_edit", "launch.extrapolate"])
def test_help_lists_the_model_and_runtime_flags(module):
    """--help shows what a user needs to choose networks and how they run, not only the edit flags."""
    proc = run_module(module, "--help")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # absl's --help exits 1
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", proc.stdout, flags=re.M))
    needed = {"config", "precision", "model_output_size", "checkpoint_dir", "download", "remat", "compilation_cache"}
    assert needed <= listed, needed - listed
    assert {"output_dir", "batch_size"} <= listed


# ---------------------------------------------------------------------------------------------
# Progress: what runs where and the compile said before it, an ETA that leaves compiling out.

class SlowCompile(FakeRun):
    """A FakeRun whose programs take `compile_s` to compile (once) and whose run reports its
    `num_steps` in two chunks, `chunk_s` apart; `descriptions` are the bars' while compiling."""
    num_steps = 4

    def __init__(self, compile_s: float, chunk_s: float = 0.02, bars=()):
        super().__init__()
        self.compile_s, self.chunk_s, self.bars = compile_s, chunk_s, bars
        self.compiles, self.descriptions = 0, []

    def compiled(self, *inputs) -> bool:
        return self.compiles > 0

    def compile(self, params, *inputs):
        import time

        self.descriptions += [bar.desc for bar in self.bars]
        time.sleep(self.compile_s)
        self.compiles += 1

    def __call__(self, *args, on_steps=None):
        import time

        out = super().__call__(*args)
        for _ in range(2):
            time.sleep(self.chunk_s)
            if on_steps is not None:
                on_steps(self.num_steps // 2)
        return out


def recording_tqdm(monkeypatch, module):
    """Replace `module`'s tqdm by one that keeps its bars and, as each closes, its elapsed time."""
    from tqdm.auto import tqdm

    bars = []

    class Recording(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def close(self):
            self.final = dict(self.format_dict)
            super().close()

    monkeypatch.setattr(module, "tqdm", Recording)
    return bars


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
    assert run.descriptions == ["blended diffusion (compiling)"]
    [bar] = bars
    assert bar.desc == "blended diffusion" and bar.final["n"] == bar.final["total"] == 2 * 4 * len(run.batches)
    assert took >= 0.6 > bar.final["elapsed"] >= 4 * 0.02  # sampling's time, without the compile


def test_launch_programs_say_what_runs_where_and_where_compiles_are_kept(program_flags, monkeypatch, capsys,
                                                                         image_file, tmp_path):
    """One line before anything compiles (samples, steps, devices, precision), one "compiling"
    line naming the cache (or that there is none), and a program's own bar (batch_edit's) whose
    clock leaves the compile out."""
    import time

    import tqdm.auto as tqdm_auto

    from launch import runtime

    run = SlowCompile(compile_s=0.01)
    assert run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                            "--num_samples=3", f"--output_dir={tmp_path / 'o'}"],
                       run) == 0
    err = capsys.readouterr().err
    where = f"{jax.device_count()} x cpu, fp32, smoke networks"
    assert err.count(f"running 3 samples (4 guided steps each) on {where}\n") == 1
    assert err.count("compiling (not cached: --nocompilation_cache)\n") == 1
    assert err.index("running 3 samples") < err.index("compiling (")

    program_flags.unparse_flags()
    program_flags(["batch_edit", "--config=smoke", f"--compilation_cache_dir={tmp_path / 'xla'}"])
    editor = fake_editor(SlowCompile(compile_s=0.6))
    bars = recording_tqdm(monkeypatch, tqdm_auto)
    bar = tqdm_auto.tqdm(total=4, unit="sample")  # as launch.batch_edit makes its bar
    runtime.announce_compiles(editor, bar)
    began = time.perf_counter()
    init = np.zeros((4, SIZE, SIZE, 3), np.float32)
    for start in (0, 2):  # as bdjax.batch.run: one call per batch, the bar moved after each
        editor.sample(editor.options(batch_size=2), True, init[start:start + 2], init[start:start + 2, ..., :1],
                      np.zeros((2, 8)), np.arange(start, start + 2), np.zeros(2))
        bar.update(2)
    took = time.perf_counter() - began
    bar.close()
    assert capsys.readouterr().err.count(f"compiling (first run only, cached in {tmp_path / 'xla'})\n") == 1
    assert took >= 0.6 > bars[0].final["elapsed"]


def test_the_real_networks_line_gives_the_analytic_count_and_on_a_cpu_its_time(program_flags):
    """For the real 256x256 networks the line before compiling adds the analytic FLOP count
    (bdjax/cost.py) and, on a CPU, the time it takes at the throughput measured there."""
    from bdjax import cost
    from bdjax.options import EditOptions
    from launch import runtime

    program_flags.unparse_flags()
    program_flags(["edit", "--config=real"])
    editor = types.SimpleNamespace(sampler=lambda options, guided: types.SimpleNamespace(num_steps=75))
    line = runtime.describe_run(editor, [(EditOptions(), True, 32)])
    per_sample = 75 * cost.guided_step_flops(8)
    assert round(per_sample / 1e12) == 565
    hours = 32 * per_sample / (runtime.CPU_TFLOPS_MEASURED * 1e12) / 3600
    assert line == (f"running 32 samples (75 guided steps each) on {jax.device_count()} x cpu, fp32: about "
                    f"{32 * per_sample / 1e15:.1f} PFLOP by the analytic count (565 TFLOP per sample), roughly "
                    f"{hours:.0f} h at the 0.05 TFLOP/s measured on a 2-core CPU")
