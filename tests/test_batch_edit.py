"""launch/batch_edit.py as a user runs it (smoke preset): a manifest with good and bad lines, the
(job, sample) outputs, reruns that skip or recompute exactly the missing items, --strict.

Every run uses one sampler configuration (smoke options, skip_timesteps 20, batch_size 2), the
same as tests/test_extrapolate.py, so the persistent compilation cache serves both."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bdjax
from bdjax import batch, outputs, smoke
from bdjax.options import EditOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".jax_cache")
FAST = {"skip_timesteps": 20}  # 5 of the smoke preset's 25 steps


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.batch_edit", "--config=smoke", "--batch_size=2",
                           f"--compilation_cache_dir={CACHE}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def manifest_lines():
    return [
        {"name": "ball", "image": "img.png", "mask": "mask.png", "prompt": "a red ball", "num_samples": 2,
         "seed": 1, **FAST},
        {"image": "sub/wide.png", "prompt": "a forest", "num_samples": 1, "seed": 2, **FAST},  # name line_0002
        '{"image": "img.png", "prompt": oops}',
        {"name": "sky", "image": "img.png", "mask": "mask.png", "invert_mask": True, "prompt": "a beach",
         "num_samples": 1, "seed": 3, **FAST},
        {"name": "../escape", "image": "img.png", "prompt": "a cat", "num_samples": 1, "seed": 4, **FAST},
        {"name": "cat", "image": "gray.png", "mask": "mask.png", "prompt": "a cat", "num_samples": 1, "seed": 1,
         **FAST},
    ]


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
    assert items(out) == sorted(f"{job}/sample_{k}.{ext}" for job, n in
                                [("ball", 2), ("line_0002", 1), ("sky", 1), ("cat", 1)]
                                for k in range(n) for ext in ("png", "json"))
    for job in ("ball", "line_0002", "sky", "cat"):
        ranked = json.loads((out / job / "ranked.json").read_text())
        distances = [s["distance"] for s in ranked["samples"]]
        assert distances == sorted(distances) and len(distances) == ranked["num_samples"]
        assert ranked["label"].startswith("SMOKE TEST")
        assert Image.open(out / job / "grid.png").size[0] == (2 + len(distances)) * 64
        assert np.asarray(Image.open(out / job / "sample_0.png")).shape == (64, 64, 3)
    entry = json.loads((out / "sky" / "sample_0.json").read_text())
    assert entry["job"]["invert_mask"] and entry["seed"] == 3 and entry["sample_id"] == 0
    assert entry["job"]["options"]["skip_timesteps"] == 20 and entry["image"] == str(workdir / "img.png")
    assert entry["job"]["image_sha256"] == hashlib.sha256((workdir / "img.png").read_bytes()).hexdigest()
    assert json.loads((out / "line_0002" / "sample_0.json").read_text())["image"] == str(
        workdir / "sub" / "wide.png")  # relative to the manifest, not to the working directory

    # The invert_mask job kept the masked square and edited the rest; "ball" the opposite.
    source = np.asarray(Image.open(workdir / "img.png").resize((64, 64), Image.LANCZOS))
    sky = np.asarray(Image.open(out / "sky" / "sample_0.png"))
    ball = np.asarray(Image.open(out / "ball" / "sample_0.png"))
    inside = (slice(16, 48), slice(18, 46))  # well inside the 64x64 mask
    assert np.array_equal(sky[inside], source[inside]) and not np.array_equal(ball[inside], source[inside])
    assert np.array_equal(ball[:8], source[:8]) and not np.array_equal(sky[:8], source[:8])

    assert "manifest line 3: not valid JSON" in proc.stderr
    assert "manifest line 5: name '../escape'" in proc.stderr and "inside --output_dir" in proc.stderr
    assert not os.path.exists(workdir / "escape") and not os.path.exists(out / ".." / "escape")
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == {"total": 5, "skipped": 0, "computed": 5, "failed": 0, "summaries_written": 4}
    assert [e["line"] for e in report["jobs"]["skipped_lines"]] == [3, 5]
    assert [r["name"] for r in report["results"]] == ["ball", "line_0002", "sky", "cat"]
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
        for s in result["samples"]:
            about = outputs.read_provenance(str(out / result["name"] / s["file"]))
            assert {k: about[k] for k in common} == common and about["kind"] == "sample"
            assert (about["sample_id"], about["distance"]) == (s["sample_id"], s["distance"])
        about = outputs.read_provenance(str(out / result["name"] / "grid.png"))
        assert {k: about[k] for k in common} == common and about["kind"] == "grid"
        ranked = json.loads((out / result["name"] / "ranked.json").read_text())["samples"]
        assert about["tiles"] == [{k: s[k] for k in ("rank", "sample_id", "distance")} for s in ranked]
        assert [t["sample_id"] for t in about["tiles"]] == [s["sample_id"] for s in result["samples"]]


def test_first_run_says_what_runs_where_before_compiling(first_run):
    """Once, before anything compiles: the samples to compute, their steps, the devices and the
    precision; then where the compiled programs are kept (one configuration: one compile)."""
    _, proc = first_run
    err = proc.stderr
    assert len(re.findall(r"^running 5 samples \(5 guided steps each\) on \d+ x cpu, fp32, smoke networks$", err,
                          flags=re.M)) == 1, err[-2000:]
    assert err.count(f"compiling (first run only, cached in {CACHE})\n") == 1
    assert err.index("running 5 samples") < err.index("compiling (")


def test_rerun_writes_nothing_and_reports_everything_skipped(first_run, workdir):
    out, _ = first_run
    before = files(out)
    proc = run(f"--manifest={workdir / 'jobs.jsonl'}", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = files(out)
    assert after.keys() == before.keys()
    assert [f for f in after if after[f] != before[f]] == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["items"]["computed"] == 0 and report["items"]["skipped"] == 5


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
        "total": 5, "skipped": 4, "computed": 1, "failed": 0, "summaries_written": 0}
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
