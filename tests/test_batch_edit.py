"""launch/batch_edit.py as a user runs it (smoke preset): a manifest with good and bad lines, the
(job, sample) outputs, reruns that skip or recompute exactly the missing items, --strict.

Jobs run in window mode (the default: results at the photo's own size, the model-size edits in
crops/) but "sky" and "photo_stretch", which run with "fit": "stretch" (the reference's model-size
results), in the same batches as the others.

Every run uses one sampler configuration (smoke options, skip_timesteps 20, batch_size 2), the
same as tests/test_extrapolate.py, so the persistent compilation cache serves both."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import bdjax
from bdjax import batch, outputs, smoke
from bdjax.options import EditOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.abspath(os.environ.get("BDJAX_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
FAST = {"skip_timesteps": 20}  # 5 of the smoke preset's 25 steps


def command(*args):
    return [sys.executable, "-m", "launch.batch_edit", "--config=smoke", "--batch_size=2",
            f"--compilation_cache_dir={CACHE}", *args]


def run(*args, timeout=600):
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def manifest_lines():
    return [
        {"name": "ball", "image": "img.png", "mask": "mask.png", "prompt": "a red ball", "num_samples": 2,
         "seed": 1, **FAST},
        {"image": "sub/wide.png", "prompt": "a forest", "num_samples": 1, "seed": 2, **FAST},  # name line_0002
        '{"image": "img.png", "prompt": oops}',
        {"name": "sky", "image": "img.png", "mask": "mask.png", "invert_mask": True, "prompt": "a beach",
         "num_samples": 1, "seed": 3, "fit": "stretch", **FAST},
        {"name": "../escape", "image": "img.png", "prompt": "a cat", "num_samples": 1, "seed": 4, **FAST},
        {"name": "cat", "image": "gray.png", "mask": "mask.png", "prompt": "a cat", "num_samples": 1, "seed": 1,
         **FAST},
        {"name": "photo", "image": "photo.png", "mask": "photo_mask.png", "prompt": "a boat", "num_samples": 1,
         "seed": 5, **FAST},  # a non-square RGBA photo in window mode
        {"name": "photo_stretch", "image": "photo.png", "mask": "photo_mask.png", "prompt": "a boat",
         "num_samples": 1, "seed": 5, "fit": "stretch", **FAST},  # the same job, stretched
    ]


# Where each valid job's results are: its photo's (height, width) in window mode, 64 x 64 stretched.
SHAPES = {"ball": (90, 120, 3), "line_0002": (64, 160, 3), "sky": (64, 64, 3), "cat": (80, 80, 3),
          "photo": (72, 120, 4), "photo_stretch": (64, 64, 3)}
SAMPLES = {"ball": 2, "line_0002": 1, "sky": 1, "cat": 1, "photo": 1, "photo_stretch": 1}
STRETCHED = ("sky", "photo_stretch")
PHOTO_MASK = (slice(20, 50), slice(40, 80))  # photo_mask.png's rectangle in photo.png


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "img.png")
    Image.fromarray(rng.randint(0, 256, (80, 80), dtype=np.uint8)).save(root / "gray.png")
    (root / "sub").mkdir()
    Image.fromarray(rng.randint(0, 256, (64, 160, 3), dtype=np.uint8)).save(root / "sub" / "wide.png")
    mask = np.zeros((90, 120), np.uint8)
    mask[20:70, 30:90] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(rng.randint(0, 256, (72, 120, 4), dtype=np.uint8)).save(root / "photo.png")  # RGBA
    photo_mask = np.zeros((72, 120), np.uint8)
    photo_mask[PHOTO_MASK] = 255
    Image.fromarray(photo_mask).save(root / "photo_mask.png")
    (root / "jobs.jsonl").write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in manifest_lines()))
    return root


@pytest.fixture(scope="module")
def first_run(workdir):
    out = workdir / "out"
    proc = run(f"--manifest={workdir / 'jobs.jsonl'}", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def files(out):
    return {os.path.relpath(os.path.join(d, f), out): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(out) for f in names}


def items(out):
    return sorted(f for f in files(out) if "/sample_" in f)


def test_first_run_writes_every_item_and_summary(first_run, workdir):
    out, proc = first_run
    assert items(out) == sorted([f"{job}/sample_{k}.{ext}" for job, n in SAMPLES.items()
                                 for k in range(n) for ext in ("png", "json")]
                                + [f"{job}/crops/sample_{k}.png" for job, n in SAMPLES.items() if job not in STRETCHED
                                   for k in range(n)])
    for job, shape in SHAPES.items():
        ranked = json.loads((out / job / "ranked.json").read_text())
        distances = [s["distance"] for s in ranked["samples"]]
        assert distances == sorted(distances) and len(distances) == ranked["num_samples"]
        assert ranked["label"].startswith("SMOKE TEST")
        # Source, mask and results at the photo's size (none is wider than outputs.GRID_TILE here).
        assert Image.open(out / job / "grid.png").size[0] == (2 + len(distances)) * shape[1]
        assert np.asarray(Image.open(out / job / "sample_0.png")).shape == shape
        if job not in STRETCHED:
            assert np.asarray(Image.open(out / job / "crops" / "sample_0.png")).shape == (64, 64, 3)
        else:
            assert not (out / job / "crops").exists()
    entry = json.loads((out / "sky" / "sample_0.json").read_text())
    assert entry["job"]["invert_mask"] and entry["seed"] == 3 and entry["sample_id"] == 0
    assert entry["job"]["options"]["skip_timesteps"] == 20 and entry["image"] == str(workdir / "img.png")
    assert entry["job"]["image_sha256"] == hashlib.sha256((workdir / "img.png").read_bytes()).hexdigest()
    assert json.loads((out / "line_0002" / "sample_0.json").read_text())["image"] == str(
        workdir / "sub" / "wide.png")  # relative to the manifest, not to the working directory

    # The invert_mask job (stretched) kept the masked square and edited the rest; "ball" (window
    # mode: the photo's size, its pixels farther than the feather (4) from the mask the photo's) the
    # opposite.
    source = np.asarray(Image.open(workdir / "img.png").resize((64, 64), Image.LANCZOS))
    sky = np.asarray(Image.open(out / "sky" / "sample_0.png"))
    inside = (slice(16, 48), slice(18, 46))  # well inside the 64x64 mask
    assert np.array_equal(sky[inside], source[inside]) and not np.array_equal(sky[:8], source[:8])
    photo = np.asarray(Image.open(workdir / "img.png"))
    ball = np.asarray(Image.open(out / "ball" / "sample_0.png"))
    inside = (slice(25, 65), slice(35, 85))  # the mask [20:70, 30:90] less 5 pixels on each side
    assert not np.array_equal(ball[inside], photo[inside]) and np.array_equal(ball[:15], photo[:15])

    assert "manifest line 3: not valid JSON" in proc.stderr
    assert "manifest line 5: name '../escape'" in proc.stderr and "inside --output_dir" in proc.stderr
    assert not os.path.exists(workdir / "escape") and not os.path.exists(out / ".." / "escape")
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == {"total": 7, "skipped": 0, "computed": 7, "failed": 0, "summaries_written": 6}
    assert [e["line"] for e in report["jobs"]["skipped_lines"]] == [3, 5]
    assert [r["name"] for r in report["results"]] == list(SHAPES)
    assert (report["flags"]["fit"], report["flags"]["context"], report["flags"]["feather"]) == ("window", 0.5, 4)
    assert all(r["complete"] for r in report["results"])
    assert report["device"]["processes"] == 1 and report["timings_s"]["sample"] > 0
    assert not [f for f in files(out) if os.path.basename(f).startswith(".tmp")]
    # The options as they ran: the smoke preset's for the run, each job's own in its result.
    assert report["options"]["timestep_respacing"] == "25" and report["options"]["skip_timesteps"] == 15
    assert not set(report["flags"]) & set(EditOptions.names())
    assert all(r["options"]["skip_timesteps"] == 20 and r["options"]["timestep_respacing"] == "25"
               for r in report["results"])


def test_every_png_carries_its_provenance(first_run):
    out, _ = first_run
    report = json.loads((out / "report.json").read_text())
    for result in report["results"]:
        spec = json.loads((out / result["name"] / "sample_0.json").read_text())["job"]
        common = {"job": result["name"], "line": result["line"], "prompt": result["prompt"], **spec,
                  "label": smoke.LABEL, "bdjax_version": bdjax.__version__}
        framing = result.get("framing", {})  # window mode: the window, scale, context and feather
        assert ("fit" in spec) == bool(framing) == (result["name"] not in STRETCHED)
        for s in result["samples"]:
            about = outputs.read_provenance(str(out / result["name"] / s["file"]))
            assert {k: about[k] for k in common} == common and about["kind"] == "sample"
            assert (about["sample_id"], about["distance"]) == (s["sample_id"], s["distance"])
            assert {k: about[k] for k in framing} == framing and ("window" in about) == bool(framing)
            if framing:
                crop = outputs.read_provenance(str(out / result["name"] / "crops" / s["file"]))
                assert crop == {**about, "kind": "crop"}
        about = outputs.read_provenance(str(out / result["name"] / "grid.png"))
        assert {k: about[k] for k in common} == common and about["kind"] == "grid"
        assert {k: about[k] for k in framing} == framing and ("window" in about) == bool(framing)
        ranked = json.loads((out / result["name"] / "ranked.json").read_text())["samples"]
        assert about["tiles"] == [{k: s[k] for k in ("rank", "sample_id", "distance", "scores")} for s in ranked]
        for s in ranked:  # each sample's PNG carries the scores its summary lists
            assert outputs.read_provenance(str(out / result["name"] / s["file"]))["scores"] == s["scores"]
        assert [t["sample_id"] for t in about["tiles"]] == [s["sample_id"] for s in result["samples"]]


@pytest.mark.filterwarnings("ignore:manifest line 6. mask size")  # the cat job's mask, read again here
def test_window_and_stretch_jobs_of_one_photo(first_run, workdir):
    """The same job of a 120x72 RGBA photo in window mode and stretched: the window sample is the
    photo at its own size, byte for byte the photo's (alpha included) farther than the feather
    from the mask, and is the crop pasted in; the stretched sample is the model-size edit, alone."""
    out, _ = first_run
    photo = np.asarray(Image.open(workdir / "photo.png"))
    window = np.asarray(Image.open(out / "photo" / "sample_0.png"))
    crop = np.asarray(Image.open(out / "photo" / "crops" / "sample_0.png"))
    assert photo.shape == window.shape == (72, 120, 4) and crop.shape == (64, 64, 3)
    rows, cols = np.mgrid[:72, :120]
    (top, bottom), (left, right) = [(s.start, s.stop - 1) for s in PHOTO_MASK]
    dy, dx = np.maximum(np.maximum(top - rows, rows - bottom), 0), np.maximum(np.maximum(left - cols, cols - right), 0)
    far = dy ** 2 + dx ** 2 > 4 ** 2  # farther than the feather (4 pixels) from the mask
    assert np.array_equal(window[far], photo[far]) and np.array_equal(window[..., 3], photo[..., 3])
    assert not np.array_equal(window[PHOTO_MASK], photo[PHOTO_MASK])  # edited
    [job] = [j for j in batch.read_manifest(str(workdir / "jobs.jsonl"), 64, EditOptions())[0] if j.name == "photo"]
    assert np.array_equal(job.inputs(64).compose(crop[None])[0], window)  # the crop pasted into the photo

    stretched = np.asarray(Image.open(out / "photo_stretch" / "sample_0.png"))
    assert stretched.shape == (64, 64, 3) and not (out / "photo_stretch" / "crops").exists()
    entry = json.loads((out / "photo_stretch" / "sample_0.json").read_text())
    assert "crop" not in entry and "framing" not in entry and "fit" not in entry["job"]
    assert "framing" not in json.loads((out / "photo_stretch" / "ranked.json").read_text())

    entry = json.loads((out / "photo" / "sample_0.json").read_text())
    assert entry["crop"] == "crops/sample_0.png" and entry["framing"]["window"]["photo_size"] == [120, 72]
    assert {k: entry["job"][k] for k in ("fit", "context", "feather")} == {"fit": "window", "context": 0.5,
                                                                           "feather": 4}
    assert json.loads((out / "photo" / "ranked.json").read_text())["framing"] == entry["framing"]
    results = {r["name"]: r for r in json.loads((out / "report.json").read_text())["results"]}
    assert results["photo"]["framing"] == entry["framing"] and "framing" not in results["photo_stretch"]


def test_first_run_says_what_runs_where_before_compiling(first_run):
    """Once, before anything compiles: the samples to compute, their steps, the devices and the
    precision; then where the compiled programs are kept (one configuration: one compile)."""
    _, proc = first_run
    err = proc.stderr
    assert len(re.findall(r"^running 7 samples \(5 guided steps each\) on \d+ x cpu, fp32, batch \d+ per run, smoke "
                          r"networks$", err,
                          flags=re.M)) == 1, err[-2000:]
    # Compiled, or loaded from the suite's shared cache: once, after the line before the run.
    ready = re.findall(rf"(?:compiled in [\d.]+ s \(cached in {re.escape(CACHE)}[^)]*\)|loaded the compiled sampler "
                       rf"from the compilation cache in [\d.]+ s \({re.escape(CACHE)}\))$", err, flags=re.M)
    assert len(ready) == 1, err[-2000:]
    assert err.index("running 7 samples") < err.index(ready[0])


def test_rerun_writes_nothing_and_reports_everything_skipped(first_run, workdir):
    out, _ = first_run
    before = files(out)
    proc = run(f"--manifest={workdir / 'jobs.jsonl'}", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = files(out)
    assert after.keys() == before.keys()
    assert [f for f in after if after[f] != before[f]] == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["items"]["computed"] == 0 and report["items"]["skipped"] == 7


def test_deleted_item_is_recomputed_alone_and_identical(first_run, workdir):
    out, _ = first_run
    # sky/sample_0 shared its batch with line_0002's sample; alone now, it must come out the same.
    original = (out / "sky" / "sample_0.png").read_bytes()
    os.remove(out / "sky" / "sample_0.png")
    before = files(out)
    proc = run(f"--manifest={workdir / 'jobs.jsonl'}", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = files(out)
    assert sorted(f for f in after if before.get(f) != after[f]) == [
        "report.json", "sky/sample_0.json", "sky/sample_0.png"]  # the summary lists the same samples
    assert (out / "sky" / "sample_0.png").read_bytes() == original
    assert json.loads((out / "report.json").read_text())["items"] == {
        "total": 7, "skipped": 6, "computed": 1, "failed": 0, "summaries_written": 0}
    assert not [f for f in after if os.path.basename(f).startswith(".tmp")]


def test_strict_stops_at_the_bad_line(workdir):
    out = workdir / "strict_out"
    proc = run(f"--manifest={workdir / 'jobs.jsonl'}", f"--output_dir={out}", "--strict")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: manifest line 3: not valid JSON"), proc.stderr[-2000:]
    assert not os.path.exists(out)


def read(tmp_path, lines, **kw):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return batch.read_manifest(str(tmp_path / "m.jsonl"), 64, EditOptions(**kw))


def test_manifest_errors_name_their_line(workdir, tmp_path):
    image = str(workdir / "img.png")
    white = tmp_path / "white.png"
    Image.fromarray(np.full((90, 120), 255, np.uint8)).save(white)
    good = {"image": image, "prompt": "a cat", "num_samples": 1, "seed": 0}
    jobs, errors = read(tmp_path, [
        good,
        {"image": image, "prompt": "a cat", "seed": 0},
        {**good, "skip_timesteps": 100},
        {**good, "skip_timesteps": "10"},
        {**good, "colour": "red"},
        {**good, "image": str(tmp_path / "missing.png")},
        {**good, "prompt": "word " * 80},
        {**good, "mask": str(white), "invert_mask": True, "name": "inverted"},
        {**good, "name": "/abs"},
        {**good, "name": ".hidden"},
        {**good, "num_samples": 0},
        {**good, "name": "ok", "clip_guidance_lambda": 500},
    ])
    assert [(j.line, j.name) for j in jobs] == [(1, "line_0001"), (12, "ok")]
    assert jobs[1].options.clip_guidance_lambda == 500.0 and jobs[1].options.skip_timesteps == 25
    reasons = {e.line: e.reason for e in errors}
    assert "missing field(s) num_samples" in reasons[2]
    assert "skip_timesteps=100" in reasons[3] and "should be of type int" in reasons[4]
    assert "unknown field(s) colour" in reasons[5] and "no such file" in reasons[6]
    assert "tokens long" in reasons[7] and "selects no pixel" in reasons[8]
    assert "is a path" in reasons[9] and "hidden" in reasons[10] and "at least 1" in reasons[11]
    assert all(str(e).startswith(f"manifest line {e.line}: ") for e in errors)

    with pytest.raises(ValueError, match="lines 1 and 3 both name the job 'x'"):
        read(tmp_path, [{**good, "name": "x"}, {**good, "name": "y"}, {**good, "name": "x"}])


def test_a_changed_job_is_not_mixed_with_the_old_samples(first_run, workdir, tmp_path):
    out, _ = first_run
    (job,), _ = read(tmp_path, [{**manifest_lines()[0], "image": str(workdir / "img.png"),
                                 "mask": str(workdir / "mask.png"), "prompt": "a blue ball"}])
    with pytest.raises(ValueError, match="holds sample 0 of a different job"):
        batch.finished_samples(str(out), job)


def test_ctrl_c_keeps_the_finished_samples_says_how_many_and_a_rerun_resumes(tmp_path):
    """Ctrl-C once the first job is complete (its second batch still to run): exit status 130 and a
    last line saying how many samples are kept, as many as are on disk; the first job's files are
    intact and the same command run again computes the rest, leaving them as they were."""
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "jobs.jsonl").write_text("".join(
        json.dumps({"name": name, "image": "img.png", "prompt": "a ball", "num_samples": 2, "seed": seed, **FAST})
        + "\n" for seed, name in enumerate(("first", "second"))))
    out = tmp_path / "out"
    args = (f"--manifest={tmp_path / 'jobs.jsonl'}", f"--output_dir={out}")
    proc = subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "first" / "ranked.json").exists():  # written once the job's last sample is
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    said = re.fullmatch(rf"interrupted: (\d) of 4 samples \((\d) of 2 jobs complete\) are kept in "
                        rf"{re.escape(str(out))}; rerun the same command to resume", err.strip().splitlines()[-1])
    assert said, err[-3000:]
    on_disk = {job: len(list((out / job).glob("sample_*.json"))) for job in ("first", "second")}
    assert (int(said[1]), int(said[2])) == (sum(on_disk.values()), sum(n == 2 for n in on_disk.values()))
    first = {f: (out / f).read_bytes() for f in files(out) if f.startswith("first/")}
    assert sorted(first) == sorted(["first/grid.png", "first/ranked.json"] + [
        f"first/{d}sample_{k}.{ext}" for k in range(2) for d, ext in (("", "png"), ("", "json"), ("crops/", "png"))])
    assert [s["sample_id"] for s in json.loads(first["first/ranked.json"])["samples"]] in ([0, 1], [1, 0])
    for name in first:
        if name.endswith(".png"):
            Image.open(out / name).load()
    assert not (out / batch.LOCK).exists()

    rerun = run(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    kept = sum(on_disk.values())
    report = json.loads((out / "report.json").read_text())
    assert {k: report["items"][k] for k in ("total", "skipped", "computed", "failed")} == {
        "total": 4, "skipped": kept, "computed": 4 - kept, "failed": 0}
    assert all(r["complete"] for r in report["results"]) and (out / "second" / "ranked.json").exists()
    assert {f: (out / f).read_bytes() for f in first} == first
