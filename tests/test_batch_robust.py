"""Batch jobs against hostile inputs and faults: job identity by content, framing and run,
unwritable job directories and output directories, the run lock, stale temporaries, odd manifests
and framing fields, samples that turn non-finite, write failures mid-run, missing crops, reserved
job names.

Most checks run in-process on a fake editor (no networks); the subprocess runs are the ones whose
exit status and stderr matter: failures before any network is built (a few seconds each) and one
shared smoke run plus its rerun on the moved tree."""

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bdjax import batch, outputs, request, tokenizer
from bdjax.options import EditOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.abspath(os.environ.get("BDJAX_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
FAST = {"skip_timesteps": 20}  # as tests/test_batch_edit.py: the compilation cache serves both
IDENTITY = batch.run_identity("fp32", "smoke", 8, "fake-weights")
# The fake editor's 8-pixel model upscales every window a lot, which window mode warns about.
pytestmark = pytest.mark.filterwarnings(r"ignore:manifest line \d+. the edit window spans:UserWarning")


def launch(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.batch_edit", "--config=smoke", "--batch_size=2",
                           f"--compilation_cache_dir={CACHE}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def tree(path) -> dict:
    """{relative path: bytes} of every file under `path` (directories as None)."""
    found = {}
    for d, dirs, names in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(d, name), path)] = None
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                found[os.path.relpath(os.path.join(d, name), path)] = f.read()
    return found


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def images(root, names=("img.png", "other.png")):
    rng = np.random.RandomState(0)
    for name in names:
        Image.fromarray(rng.randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / name)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 10:30] = 255
    Image.fromarray(mask).save(root / "mask.png")


def write_manifest(path, lines, bom=False):
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


class FakeEditor:
    """The editor interface batch.run uses, without networks: sample k of seed s is a flat image
    whose distance is k + s / 10; `poison` lists (seed, k) whose row comes back NaN."""

    image_size = 8
    weights_digest = "fake-weights"

    def __init__(self, poison=()):
        self.poison = set(poison)
        self.computed = []
        self.batch_rows = []

    def encode_tokens(self, tokens):
        return np.zeros(4, np.float32)

    def diversity(self, images, region):
        return None  # no LPIPS network

    def sample(self, options, guided, init, mask, text_embed, sample_ids, seeds, progress=False, batch_rows=None):
        n = len(sample_ids)
        self.batch_rows.append(batch_rows)
        self.computed += [(int(s), int(k)) for s, k in zip(seeds, sample_ids)]
        images = np.broadcast_to((np.asarray(sample_ids, np.float32) / 10)[:, None, None, None], (n, 8, 8, 3)).copy()
        distances = np.asarray(sample_ids, np.float32) + np.asarray(seeds, np.float32) / 10
        for row, key in enumerate(zip(seeds, sample_ids)):
            if tuple(map(int, key)) in self.poison:
                images[row], distances[row] = np.nan, np.nan
        finite = np.isfinite(distances) & np.isfinite(images).reshape(n, -1).all(axis=1)
        ids = np.asarray(sample_ids, np.float32)
        scores = {"clip_masked": distances, "clip_whole": 10 - ids, "background_psnr": np.full(n, 100.0),
                  "background_lpips": np.zeros(n), "seam": 1 + ids / 10}  # clip_whole ranks later samples first
        return {"rows": np.arange(n), "images": images, "distances": distances, "finite": finite, "scores": scores}


def jobs_of(manifest, identity=IDENTITY, batch_size=1, framing=None, **options):
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions(batch_size=batch_size, **options),
                                       framing=framing)
    assert not errors, errors
    return batch.with_run(jobs, identity)


def run_fake(out, jobs, editor=None):
    editor = editor or FakeEditor()
    jobs, items, conflicts, finished = batch.pending_items(str(out), jobs)
    stats = batch.run(editor, jobs, str(out), items, finished=finished)
    return jobs, stats, conflicts, editor


@pytest.fixture
def fake_tree(tmp_path):
    images(tmp_path)
    manifest = write_manifest(tmp_path / "jobs.jsonl", [
        {"name": "a", "image": "img.png", "mask": "mask.png", "prompt": "x", "num_samples": 3, "seed": 1},
        {"name": "b", "image": "other.png", "prompt": "y", "num_samples": 2, "seed": 2},
    ])
    return tmp_path, manifest


# -- identity --------------------------------------------------------------------------------

def test_summaries_carry_every_score_and_a_new_ranking_reranks_without_computing(fake_tree):
    """ranked.json lists each sample's scores, their aggregates and the ranking used; run again
    with rank_by=clip_whole, the job is the same job (nothing computed) and its summary is
    ranked again from the stored scores."""
    root, manifest = fake_tree
    out = root / "out"
    run_fake(out, jobs_of(manifest))
    ranked = json.loads((out / "a" / "ranked.json").read_text())
    assert ranked["rank_by"] == "clip_masked" and [s["sample_id"] for s in ranked["samples"]] == [0, 1, 2]
    assert ranked["samples"][2]["scores"] == {"clip_masked": pytest.approx(2.1), "clip_whole": 8.0,
                                              "background_psnr": 100.0, "background_lpips": 0.0,
                                              "seam": pytest.approx(1.2)}
    assert ranked["aggregates"]["seam"]["best"] == pytest.approx(1.0) and ranked["diversity"] is None
    grid = outputs.read_provenance(str(out / "a" / "grid.png"))
    assert [t["scores"] for t in grid["tiles"]] == [s["scores"] for s in ranked["samples"]]

    jobs = jobs_of(manifest, rank_by="clip_whole")
    kept, items, conflicts, finished = batch.pending_items(str(out), jobs)
    assert items == [] and conflicts == [] and len(kept) == 2
    assert batch.write_summaries(str(out), kept, 8, finished=finished) == 2
    ranked = json.loads((out / "a" / "ranked.json").read_text())
    assert ranked["rank_by"] == "clip_whole" and [s["sample_id"] for s in ranked["samples"]] == [2, 1, 0]
    assert [s["rank_value"] for s in ranked["samples"]] == [8.0, 9.0, 10.0]
    assert [r["rank_by"] for r in batch.job_results(kept, batch.RunStats(total=5, finished=finished))] == \
        ["clip_whole"] * 2


def test_job_identity_is_content_and_run_not_paths(fake_tree):
    root, manifest = fake_tree
    out = root / "out"
    jobs, stats, _, _ = run_fake(out, jobs_of(manifest))
    assert stats.computed == 5 and [len(s) for s in stats.finished] == [3, 2]
    entry = json.loads((out / "a" / "sample_0.json").read_text())
    assert "image" not in entry["job"] and entry["job"]["run"] == IDENTITY and entry["image"] == str(root / "img.png")

    # The same run again: everything is found, nothing computed.
    _, items, conflicts, _ = batch.pending_items(str(out), jobs_of(manifest))
    assert items == [] and conflicts == []

    # Another precision, config or weights: other samples, never mixed with these.
    for change in ({"precision": "bf16"}, {"config": "real"}, {"weights": "other"}, {"image_size": 16}):
        kept, items, conflicts, _ = batch.pending_items(str(out), jobs_of(manifest, {**IDENTITY, **change}))
        assert kept == [] and [c.line for c in conflicts] == [1, 2], change
        assert "different job" in conflicts[0].reason
        assert "rename the job or remove that directory" in conflicts[0].reason

    # The whole tree moved elsewhere: the samples still count (identity is content, not path).
    moved = root.parent / (root.name + "_moved")
    shutil.move(str(root), str(moved))
    _, items, conflicts, finished = batch.pending_items(str(moved / "out"), jobs_of(moved / "jobs.jsonl"))
    assert items == [] and conflicts == [] and [len(s) for s in finished] == [3, 2]

    # Other pixels under the same path: job "a" clashes, job "b" is untouched.
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(moved / "img.png")
    kept, items, conflicts, _ = batch.pending_items(str(moved / "out"), jobs_of(moved / "jobs.jsonl"))
    assert [j.name for j in kept] == ["b"] and items == [] and [c.line for c in conflicts] == [1]


def test_samples_written_before_content_identity_count_as_another_job(fake_tree):
    root, manifest = fake_tree
    out = root / "out"
    run_fake(out, jobs_of(manifest))
    path = out / "a" / "sample_1.json"
    entry = json.loads(path.read_text())
    old = {k: v for k, v in entry["job"].items() if k not in ("image_sha256", "mask_sha256", "run")}
    old.update(image=str(root / "img.png"), mask=str(root / "mask.png"))
    path.write_text(json.dumps({**entry, "job": old}))
    with pytest.raises(ValueError, match="holds sample 1 of a different job"):
        batch.finished_samples(str(out), jobs_of(manifest)[0])


def test_each_input_file_is_hashed_once_per_manifest(fake_tree, monkeypatch):
    root, _ = fake_tree
    lines = [{"name": f"j{i}", "image": "img.png", "mask": "mask.png", "prompt": "x", "num_samples": 1, "seed": i}
             for i in range(5)]
    manifest = write_manifest(root / "many.jsonl", lines)
    opened, decoded = [], []
    real_sha, real_prepare = batch.file_sha256, request.prepare_inputs

    def sha(path, cache=None):
        if path not in (cache or {}):
            opened.append(path)
        return real_sha(path, cache)

    monkeypatch.setattr(batch.manifest, "file_sha256", sha)  # where parse_job looks it up
    monkeypatch.setattr(request, "prepare_inputs", lambda *a, **k: decoded.append(a) or real_prepare(*a, **k))
    jobs = jobs_of(manifest)
    assert len(jobs) == 5 and len({j.image_sha256 for j in jobs}) == 1
    assert sorted(opened) == sorted([str(root / "img.png"), str(root / "mask.png")]) and len(decoded) == 1
    _, stats, _, _ = run_fake(root / "out", jobs)  # the run and the jobs' summaries decode nothing again
    assert stats.computed == 5 and stats.summaries == 5 and len(decoded) == 1


STRETCH_SPEC = {"image_sha256", "mask_sha256", "prompt", "seed", "invert_mask", "options", "run"}
# The entry as before window mode, plus each sample's quality scores and the value it is ranked by.
STRETCH_ENTRY = {"name", "line", "sample_id", "seed", "distance", "file", "image", "mask", "job", "process_index",
                 "scores", "rank_value"}
FRAMING_KEYS = {"fit", "window", "scale", "context", "feather", "note"}


def test_stretch_jobs_write_what_they_always_did_and_window_mode_refuses_them(fake_tree):
    """fit="stretch": the model-size edit, no crops, and an identity, report entry and provenance
    without framing (as before window mode). Rerun in window mode (the default), or with another
    context or feather, a job's directory is refused, never mixed; a stretched job ignores both."""
    root, manifest = fake_tree
    out = root / "out"
    jobs, stats, _, _ = run_fake(out, jobs_of(manifest, framing={"fit": "stretch"}))
    assert stats.computed == 5 and [j.fit for j in jobs] == ["stretch", "stretch"]
    for name in ("a", "b"):
        assert not (out / name / "crops").exists()
        entry = json.loads((out / name / "sample_1.json").read_text())
        assert set(entry) == STRETCH_ENTRY and set(entry["job"]) == STRETCH_SPEC
        sample = np.asarray(Image.open(out / name / "sample_1.png"))
        assert sample.shape == (8, 8, 3) and (sample == round(0.1 * 255)).all()  # FakeEditor's sample 1, as is
        assert not set(outputs.read_provenance(str(out / name / "sample_1.png"))) & FRAMING_KEYS
        assert not set(outputs.read_provenance(str(out / name / "grid.png"))) & FRAMING_KEYS
        assert set(json.loads((out / name / "ranked.json").read_text())) == {
            "name", "line", "num_samples", "job", "label", "samples", "rank_by", "diversity", "aggregates"}
        assert np.asarray(Image.open(out / name / "grid.png")).shape[1] == 4 * 8 + (name == "a") * 8
    assert not [r for r in batch.job_results(jobs, stats) if "framing" in r]
    _, items, conflicts, _ = batch.pending_items(str(out), jobs_of(manifest, framing={
        "fit": "stretch", "context": 2.0, "feather": 0}))
    assert items == [] and conflicts == []  # context and feather do not touch a stretched image

    kept, items, conflicts, _ = batch.pending_items(str(out), jobs_of(manifest))  # window mode
    assert kept == [] and [c.line for c in conflicts] == [1, 2]
    assert "holds sample 0 of a different job" in conflicts[0].reason and "framing" in conflicts[0].reason

    window = root / "window"
    run_fake(window, jobs_of(manifest))
    for change in ({"context": 1.0}, {"feather": 0}, {"fit": "stretch"}):
        kept, items, conflicts, _ = batch.pending_items(str(window), jobs_of(manifest, framing=change))
        assert kept == [] and [c.line for c in conflicts] == [1, 2], change
    _, items, conflicts, _ = batch.pending_items(str(window), jobs_of(manifest, framing={"context": 0.5}))
    assert items == [] and conflicts == []


def test_window_results_are_the_photo_at_its_own_size_composed_one_row_at_a_time(tmp_path, monkeypatch):
    """An RGBA photo in window mode: every sample is the photo (alpha kept) with the model-size
    edit pasted in, that edit is the crop; the batch pastes one row at a time; the grid, ranked.json,
    entries, provenance and results all say where the window lies."""
    rng = np.random.RandomState(1)
    photo = rng.randint(0, 256, (30, 40, 4), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 15:25] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    manifest = write_manifest(tmp_path / "jobs.jsonl", [
        {"name": "w", "image": "photo.png", "mask": "mask.png", "prompt": "x", "num_samples": 3, "seed": 1,
         "feather": 2, "context": 1}])
    composed, compose = [], request.Inputs.compose
    monkeypatch.setattr(request.Inputs, "compose",
                        lambda self, edits: composed.append(len(edits)) or compose(self, edits))
    out = tmp_path / "out"
    jobs, stats, _, _ = run_fake(out, jobs_of(manifest, batch_size=3))
    assert stats.computed == 3 and composed == [1, 1, 1]  # never a whole batch of full-size results
    far = np.ones((30, 40), bool)
    far[10 - 2:20 + 2, 15 - 2:25 + 2] = False  # within the feather (2) of the mask, or in it
    inputs = jobs[0].inputs(8)
    framing = inputs.framing()
    assert (framing["context"], framing["feather"]) == (1.0, 2)
    for k in range(3):
        sample = np.asarray(Image.open(out / "w" / f"sample_{k}.png"))
        crop = np.asarray(Image.open(out / "w" / "crops" / f"sample_{k}.png"))
        assert sample.shape == (30, 40, 4) and crop.shape == (8, 8, 3)
        assert (crop == round(k / 10 * 255)).all()  # FakeEditor's sample k at the model size
        assert np.array_equal(sample[far], photo[far]) and np.array_equal(sample[..., 3], photo[..., 3])
        assert np.array_equal(sample, inputs.compose(crop[None])[0])
        entry = json.loads((out / "w" / f"sample_{k}.json").read_text())
        assert entry["crop"] == f"crops/sample_{k}.png" and entry["framing"] == framing
        about = outputs.read_provenance(str(out / "w" / f"sample_{k}.png"))
        assert {key: about[key] for key in framing} == framing
        assert outputs.read_provenance(str(out / "w" / "crops" / f"sample_{k}.png")) == {**about, "kind": "crop"}
    assert json.loads((out / "w" / "ranked.json").read_text())["framing"] == framing
    assert batch.job_results(jobs, stats)[0]["framing"] == framing
    # The grid: source, mask and the 3 results at the photo's size (narrower than outputs.GRID_TILE).
    assert np.asarray(Image.open(out / "w" / "grid.png")).shape[1] == 5 * 40


# -- the output directory ---------------------------------------------------------------------

def test_unwritable_job_directory_is_skipped_before_compute(fake_tree):
    root, manifest = fake_tree
    out = root / "out"
    out.mkdir()
    (out / "a").write_text("a user's file")
    with batch.claim_output_dir(str(out), jobs_of(manifest)) as (jobs, skipped, removed):
        assert [j.name for j in jobs] == ["b"] and removed == []
        assert [e.line for e in skipped] == [1]
        assert "exists and is not a directory; rename the job or move that file" in skipped[0].reason
        assert sorted(os.listdir(out)) == [batch.LOCK, "a"]  # probing left nothing behind
        run_fake(out, jobs)
    assert (out / "a").read_text() == "a user's file" and sorted(os.listdir(out / "b")) == [
        "crops", "grid.png", "ranked.json", "sample_0.json", "sample_0.png", "sample_1.json", "sample_1.png"]
    assert sorted(os.listdir(out / "b" / "crops")) == ["sample_0.png", "sample_1.png"]
    assert not (out / batch.LOCK).exists()


def test_a_file_in_the_way_of_crops_skips_the_job_and_crops_temporaries_are_removed(fake_tree):
    root, manifest = fake_tree
    out = root / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "crops").write_text("a user's file")
    (out / "b" / "crops").mkdir(parents=True)
    (out / "b" / "crops" / ".tmp-killed.png").write_bytes(b"partial")
    with batch.claim_output_dir(str(out), jobs_of(manifest)) as (jobs, skipped, removed):
        assert [j.name for j in jobs] == ["b"] and [e.line for e in skipped] == [1]
        assert f"{out / 'a' / 'crops'} exists and is not a directory" in skipped[0].reason
        assert removed == [str(out / "b" / "crops" / ".tmp-killed.png")]
    assert sorted(tree(out)) == ["a", "a/crops", "b", "b/crops"]  # probing left nothing behind
    with batch.claim_output_dir(str(root / "new"), jobs_of(manifest)) as (jobs, skipped, _):
        assert len(jobs) == 2 and not skipped
        assert os.listdir(root / "new") == [batch.LOCK]  # the directories made to probe are removed


def test_lock_refuses_a_second_run_and_is_released(fake_tree):
    root, manifest = fake_tree
    out = root / "new" / "out"
    with batch.claim_output_dir(str(out), []):
        holder = json.loads((out / batch.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(batch.OutputInUse, match=f"in use by another run \\(pid {os.getpid()} on host "):
            with batch.claim_output_dir(str(out), []):
                pass
        assert json.loads((out / batch.LOCK).read_text()) == holder  # the refused run left it alone
    assert not (root / "new").exists()  # made only for the lock: removed with it
    with batch.claim_output_dir(str(out), []):  # free again
        pass


def test_lock_of_a_killed_run_does_not_stick(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / batch.LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(batch.OutputInUse, match="a run that has not recorded itself yet"):
            with batch.claim_output_dir(str(out), []):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with batch.claim_output_dir(str(out), []):  # the OS dropped the dead process's lock
        pass
    assert os.listdir(out) == []


def test_processes_after_the_first_neither_lock_nor_probe(fake_tree, monkeypatch):
    root, manifest = fake_tree
    out = root / "out"
    out.mkdir()
    (out / "a").write_text("a user's file")
    with batch.claim_output_dir(str(out), []):  # process 0 of the run holds the lock
        (out / ".tmp-abc.png").write_bytes(b"x")  # a temporary of process 0, being written
        monkeypatch.setattr(batch.store.jax, "process_index", lambda: 1)
        with batch.claim_output_dir(str(out), jobs_of(manifest)) as (jobs, skipped, removed):
            assert [j.name for j in jobs] == ["a", "b"] and skipped == [] and removed == []
    assert sorted(os.listdir(out)) == [".tmp-abc.png", "a"]


def test_stale_temporaries_are_removed_under_the_lock(fake_tree):
    root, manifest = fake_tree
    out = root / "out"
    (out / "b" / "keep").mkdir(parents=True)
    for path in (out / ".tmp-1.json", out / "b" / ".tmp-2.png", out / "b" / "keep" / ".tmp-3.png"):
        path.write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")
    with batch.claim_output_dir(str(out), jobs_of(manifest)) as (_, _, removed):
        assert sorted(removed) == sorted([str(out / ".tmp-1.json"), str(out / "b" / ".tmp-2.png")])
    assert sorted(tree(out)) == ["b", "b/keep", "b/keep/.tmp-3.png", "notes.txt"]


def test_locked_output_dir_refuses_at_once_naming_the_holder(fake_tree):
    root, manifest = fake_tree
    out = root / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    fd = os.open(out / batch.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": 4242, "host": "node7", "started": "2026-01-02T03:04:05+00:00"}).encode())
        before = tree(out)
        began = time.monotonic()
        proc = launch(f"--manifest={manifest}", f"--output_dir={out}")
        assert proc.returncode == 2 and time.monotonic() - began < 60
        line = one_line(proc)
        assert "is in use by another run (pid 4242 on host node7, started 2026-01-02T03:04:05+00:00)" in line
        assert "jobs," not in proc.stdout and tree(out) == before  # refused before networks, nothing written
    finally:
        os.close(fd)


def test_unwritable_output_dir_is_one_line_before_networks(fake_tree):
    root, manifest = fake_tree
    (root / "afile").write_text("x")
    before = tree(root)
    proc = launch(f"--manifest={manifest}", f"--output_dir={root / 'afile' / 'out'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is a file, not a directory" in one_line(proc) and "jobs," not in proc.stdout
    assert tree(root) == before


def test_a_run_where_no_job_can_be_written_keeps_the_previous_report_and_exits_2(fake_tree):
    """Every job's directory is a file: nothing can run, so the run stops with one line naming the
    first, before any network, and the output directory stays as it was."""
    root, manifest = fake_tree
    out = root / "out"
    out.mkdir()
    for name in ("a", "b"):
        (out / name).write_text("a user's file")
    (out / "report.json").write_text('{"an": "earlier run"}')
    before = tree(out)
    proc = launch(f"--manifest={manifest}", f"--output_dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no job can be written in --output_dir={out}: manifest line 1: ") and \
        line.endswith("(and 1 more)"), line
    assert "running" not in proc.stderr and tree(out) == before


def test_a_rerun_where_every_job_conflicts_keeps_the_previous_report_and_exits_2(fake_tree):
    """Every job's directory holds another job's samples: nothing can run, so the run stops with
    one line naming the first conflict and what to do, and the output directory stays as it was."""
    root, manifest = fake_tree
    out = root / "out"
    for name in ("a", "b"):
        (out / name).mkdir(parents=True)
        (out / name / "sample_0.png").write_bytes(b"an earlier run's sample")
        (out / name / "sample_0.json").write_text(json.dumps({"job": {"prompt": "another job"}, "distance": 1.0}))
    (out / "report.json").write_text('{"an": "earlier run"}')
    before = tree(out)
    proc = launch(f"--manifest={manifest}", f"--output_dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: every job conflicts with the results in --output_dir={out}, so nothing can run: manifest line 1: "
        f"{out / 'a'} holds sample 0 of a different job (image or mask content, prompt, seed, options, framing (fit, "
        "context, feather), or the run's precision, config, model size or weights differ); rename the job or remove "
        "that directory (and 1 more); or choose another --output_dir")
    assert tree(out) == before


# -- manifests --------------------------------------------------------------------------------

def test_bom_manifest_loses_no_job(fake_tree):
    root, _ = fake_tree
    manifest = write_manifest(root / "bom.jsonl", [
        {"name": "first", "image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0},
        {"name": "second", "image": "img.png", "prompt": "y\u2028z", "num_samples": 1, "seed": 0}], bom=True)
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [j.name for j in jobs] == ["first", "second"] and errors == [] and jobs[1].prompt == "y\u2028z"


@pytest.mark.parametrize("kind, message", [
    ("binary", "is not UTF-8 text"), ("nul", "is a binary file"), ("directory", "is a directory"),
    ("empty", "holds no job"), ("comments", "holds no job"), ("missing", "no such file")])
def test_unusable_manifest_is_one_error_naming_the_file(tmp_path, kind, message):
    path = tmp_path / "jobs.jsonl"
    if kind == "binary":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path, format="PNG")
    elif kind == "nul":
        path.write_bytes(b'{"image": "a.png"}\x00\n')
    elif kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "comments":
        path.write_text("# nothing yet\n\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as caught:
        batch.read_manifest(str(path), 8, EditOptions())
    assert f"manifest {path}" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as caught:  # as a program names it
        batch.read_manifest(str(path), 8, EditOptions(), label=f"--manifest={path}")
    assert str(caught.value).startswith(f"--manifest={path}")


def test_binary_manifest_exits_2_with_one_line(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(manifest, format="PNG")
    before = tree(tmp_path)
    proc = launch(f"--manifest={manifest}", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert one_line(proc).startswith(f"error: --manifest={manifest} is not UTF-8 text")
    assert tree(tmp_path) == before


def test_a_job_takes_batch_size_auto_and_a_bad_batch_size_is_its_line_refused(tmp_path):
    """"batch_size": "auto" (the largest batch that fits the device's memory; on a CPU 4) or a
    whole number; anything else refuses the job's line, naming the fix."""
    images(tmp_path)
    good = {"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 1}
    manifest = write_manifest(tmp_path / "jobs.jsonl", [{**good, "name": "a", "batch_size": "auto"},
                                                        {**good, "name": "b", "batch_size": "big"},
                                                        {**good, "name": "c", "batch_size": 0},
                                                        {**good, "name": "d", "batch_size": 3}])
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [(job.name, job.options.batch_size) for job in jobs] == [("a", "auto"), ("d", 3)]
    assert [e.line for e in errors] == [2, 3]
    assert "batch_size='big' should be of type int (a whole number of at least 1) or 'auto'" in str(errors[0])
    assert "batch_size=0 must be at least 1, or 'auto'" in str(errors[1]) and "\n" not in str(errors[1])
    jobs, _ = batch.read_manifest(str(manifest), 8, EditOptions(batch_size="auto"))  # the flag's default
    assert jobs[0].options.batch_size == "auto"


def test_a_manifest_without_a_valid_job_or_a_bad_batch_size_flag_stops_before_networks(tmp_path):
    images(tmp_path)
    out = tmp_path / "out"
    good = {"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 1}
    manifest = write_manifest(tmp_path / "jobs.jsonl", [{**good, "aug_num": 0}, {**good, "clip_guidance_lambda": 1e999}])
    cases = [([f"--manifest={manifest}"], f"error: {manifest} has no valid job: manifest line 1: aug_num=0 must be at "
                                          "least 1 (and 1 more bad line(s))"),
             ([f"--manifest={manifest}", "--batch_size=0"], "error: flag --batch_size=0: '0' is not a whole number "
                                                           "of at least 1, nor auto (the largest batch that fits the "
                                                           "device's memory) (see --help)"),
             ([f"--manifest={manifest}", "--feather=-1"], "error: --feather=-1 must be an integer in [0, 64] (photo "
                                                         "pixels of soft edge; 0 pastes hard)")]
    before = tree(tmp_path)
    for args, message in cases:
        proc = launch(*args, f"--output_dir={out}")
        assert proc.returncode == 2 and one_line(proc) == message, proc.stderr
        assert tree(tmp_path) == before


def test_a_field_given_twice_is_refused(tmp_path):
    images(tmp_path)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 1, "image": "other.png"}\n'
                        '{"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 1}\n')
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [j.line for j in jobs] == [2]
    assert [(e.line, e.reason) for e in errors] == [(1, "field 'image' is given twice; keep one")]


def test_bad_framing_fields_are_one_line_each_naming_the_field(tmp_path):
    images(tmp_path)
    good = {"image": "img.png", "mask": "mask.png", "prompt": "x", "num_samples": 1, "seed": 1}
    bad = [("fit", "crop"), ("fit", None), ("fit", ["window"]), ("context", -1), ("context", "0.5"),
           ("context", float("inf")), ("context", 11), ("feather", 2.5), ("feather", True), ("feather", 65),
           ("feather", -1)]
    manifest = write_manifest(tmp_path / "jobs.jsonl", [{**good, field: value} for field, value in bad] + [
        {**good, "name": "ok", "fit": "stretch", "context": 3, "feather": 0}, {**good, "name": "default"}])
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [(j.name, j.framing()) for j in jobs] == [
        ("ok", {"fit": "stretch", "context": 3.0, "feather": 0}),
        ("default", {"fit": "window", "context": 0.5, "feather": 4})]
    assert [e.line for e in errors] == list(range(1, len(bad) + 1))
    for e, (field, value) in zip(errors, bad):
        assert str(e).startswith(f"manifest line {e.line}: {field}=") and "\n" not in str(e), str(e)
    assert "must be one of window, stretch" in errors[0].reason
    assert "must be a number in [0, 10]" in errors[3].reason and "must be an integer in [0, 64]" in errors[7].reason


def test_the_runs_framing_is_every_jobs_unless_its_fields_say_otherwise(tmp_path):
    images(tmp_path)
    good = {"image": "img.png", "mask": "mask.png", "prompt": "x", "num_samples": 1, "seed": 1}
    manifest = write_manifest(tmp_path / "jobs.jsonl", [
        {**good, "name": "run"}, {**good, "name": "own", "fit": "window", "feather": 1}])
    jobs, _ = batch.read_manifest(str(manifest), 8, EditOptions(), framing={"fit": "stretch", "context": 2.0})
    assert [j.framing() for j in jobs] == [{"fit": "stretch", "context": 2.0, "feather": 4},
                                           {"fit": "window", "context": 2.0, "feather": 1}]
    assert jobs[1].inputs(8).window.side == 40 and jobs[0].inputs(8).photo is None
    with pytest.raises(ValueError, match=r"^feather=-1 must be an integer") as caught:
        batch.read_manifest(str(manifest), 8, EditOptions(), framing={"feather": -1})
    assert caught.value.name == "feather"


def test_input_cache_counts_the_full_size_photo_and_keys_on_the_framing(fake_tree):
    root, _ = fake_tree
    cache = batch.InputCache()
    window = cache.get(str(root / "img.png"), str(root / "mask.png"), False, 8)
    assert cache.nbytes == window.nbytes == 8 * 8 * 4 + 30 * 40 * 4  # the crop and the photo with its mask
    assert cache.get(str(root / "img.png"), str(root / "mask.png"), False, 8) is window
    assert cache.get(str(root / "img.png"), str(root / "mask.png"), False, 8, feather=0) is not window
    stretch = cache.get(str(root / "img.png"), str(root / "mask.png"), False, 8, fit="stretch")
    assert stretch.photo is None and cache.get(str(root / "img.png"), str(root / "mask.png"), False, 8, fit="stretch",
                                               context=3.0, feather=0) is stretch
    small = batch.InputCache(max_bytes=window.nbytes)  # room for one photo: the older one is dropped
    first = small.get(str(root / "img.png"), str(root / "mask.png"), False, 8)
    small.get(str(root / "other.png"), str(root / "mask.png"), False, 8)
    assert small.nbytes == first.nbytes and small.get(str(root / "img.png"), str(root / "mask.png"), False, 8) \
        is not first
    assert small.framing(str(root / "other.png"), str(root / "mask.png"), False, 8) == window.framing()


def test_job_names_say_what_is_wrong():
    for name in (".", "..", "..."):
        with pytest.raises(ValueError, match="made only of dots") as caught:
            batch.check_name(name)
        assert "contains '..'" not in str(caught.value)
    assert batch.check_name("a..b") == "a..b"  # one directory name: cannot leave the output directory
    with pytest.raises(ValueError, match="control characters"):
        batch.check_name("a\tb")
    with pytest.raises(ValueError, match="is 201 bytes long; the limit is 200"):
        batch.check_name("x" * 201)
    with pytest.raises(ValueError, match="reserved for bdjax's temporary and lock files"):
        batch.check_name(batch.LOCK)
    with pytest.raises(ValueError, match="is a path"):
        batch.check_name("a/b")


def test_job_names_of_blanks_or_line_breaks_are_one_line_errors(fake_tree):
    """A name only of blanks, or holding a line break of any kind (C0 and C1 controls such as
    U+0085, U+2028, U+2029), is a bad line whose message stays one line."""
    root, _ = fake_tree
    bad = [" ", "   ", "\u3000", "\t", "a\nb", "a\rb", "a\r\nb", "a\x0bb", "a\x1cb", "a\x7fb", "a\x85b", "a\x9bb",
           "a\u2028b", "a\u2029b"]
    good = ["a b", "tiger\u200dcat", "caf\u00e9"]
    job = {"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0}
    manifest = write_manifest(root / "names.jsonl", [{**job, "name": name} for name in bad + good])
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [j.name for j in jobs] == good and [e.line for e in errors] == list(range(1, len(bad) + 1))
    for e in errors:
        assert str(e).splitlines() == [str(e)] and str(e).startswith(f"manifest line {e.line}: name "), str(e)
    assert all("only blanks" in e.reason for e in errors[:4])
    assert all("control characters or line separators" in e.reason for e in errors[4:])
    assert "(U+2028)" in errors[-2].reason and "(U+0085)" in errors[-4].reason


def test_deeply_nested_lines_are_bad_lines_not_a_crash(fake_tree):
    """JSON nested past Python's recursion limit, in the decoder or when a message shows the
    value (depths around the limit, wherever the stack stands), is that line's error."""
    root, _ = fake_tree
    job = {"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0}
    deep = lambda n: "[" * n + "]" * n  # noqa: E731
    limit = sys.getrecursionlimit()
    lines = ["[" * 100_000, '{"image": "img.png", "prompt": ' + "[" * 100_000, {**job, "name": "ok"},
             '{"image": "img.png", "num_samples": 1, "seed": 0, "prompt": ' + deep(100_000) + "}"]
    lines += ['{"image": "img.png", "num_samples": 1, "seed": 0, "prompt": ' + deep(n) + "}"
              for n in range(limit - 300, limit + 10, 3)]
    jobs, errors = batch.read_manifest(str(write_manifest(root / "deep.jsonl", lines)), 8, EditOptions())
    assert [j.line for j in jobs] == [3] and [e.line for e in errors] == [1, 2] + list(range(4, len(lines) + 1))
    assert [e.reason for e in errors[:3]] == ["nested too deeply: a job is one JSON object of plain values "
                                              "(strings, numbers, booleans)"] * 3
    assert all(str(e).splitlines() == [str(e)] for e in errors)
    assert all("nested too deeply" in e.reason or "should be of type str" in e.reason for e in errors)


def test_a_deeply_nested_line_is_reported_by_the_program_as_a_bad_line(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("[" * 100_000 + "\n")
    proc = launch(f"--manifest={manifest}", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert one_line(proc) == (f"error: {manifest} has no valid job: manifest line 1: nested too deeply: a job is one "
                              "JSON object of plain values (strings, numbers, booleans)")
    assert not (tmp_path / "out").exists()


def test_a_manifest_over_its_size_or_line_limits_is_refused_naming_them(fake_tree, monkeypatch):
    root, _ = fake_tree
    path = root / "big.jsonl"
    job = json.dumps({"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0})
    monkeypatch.setattr(batch.manifest, "MAX_MANIFEST_BYTES", 1 << 20)
    path.write_text(job + "\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(ValueError) as caught:
        batch.read_manifest(str(path), 8, EditOptions(), label=f"--manifest={path}")
    assert str(caught.value) == (f"--manifest={path} is bigger than 1 MiB, the most one manifest may hold: split its "
                                 "jobs into several manifests")

    monkeypatch.setattr(batch.manifest, "MAX_MANIFEST_LINES", 3)
    for text, lines in ((f"{job}\n\n{job}\n", 3), (f"{job}\r\n{job}\r{job}", 3), ("\n" * 4, 4),
                        ("\r" * 3 + job, 4), (f"{job}\n" * 4, 4)):
        path.write_text(text, newline="")
        if lines <= 3:
            assert len(batch.read_manifest(str(path), 8, EditOptions(), label="m")[0]) == text.count(job)
            continue
        with pytest.raises(ValueError) as caught:
            batch.read_manifest(str(path), 8, EditOptions(), label="m")
        assert str(caught.value) == f"m has {lines} lines, more than the limit of 3: split its jobs into several manifests"


def test_a_line_over_the_limit_is_a_bad_line(fake_tree):
    root, _ = fake_tree
    job = {"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0}
    long = json.dumps({**job, "prompt": "\u00e9" * (batch.MAX_LINE_BYTES // 2)})  # 2 bytes a character in UTF-8
    manifest = write_manifest(root / "long.jsonl", [long, job])
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [j.line for j in jobs] == [2]
    assert [(e.line, e.reason) for e in errors] == [(1, f"the line is {len(long.encode()):,} bytes long, more than "
                                                        "the limit of 1 MiB: a job is one short JSON object")]


def test_endless_manifests_are_refused_with_bounded_reading(tmp_path, monkeypatch):
    """A pipe that never ends and /dev/zero: read a chunk at a time, refused at the limit (the
    pipe) or at the first NUL byte (/dev/zero), never read until memory runs out."""
    monkeypatch.setattr(batch.manifest, "MAX_MANIFEST_BYTES", 1 << 20)
    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    written = []

    def endless():  # far more than the limit, until the reader hangs up
        with open(fifo, "wb") as f:
            try:
                for _ in range(256):
                    f.write(b"[" * (1 << 16))
                    written.append(1 << 16)
            except BrokenPipeError:
                pass

    writer = threading.Thread(target=endless, daemon=True)
    writer.start()
    with pytest.raises(ValueError, match="is bigger than 1 MiB, the most one manifest may hold: split its jobs"):
        batch.read_manifest(str(fifo), 8, EditOptions())
    writer.join(timeout=60)
    assert not writer.is_alive() and sum(written) < 4 << 20
    with pytest.raises(ValueError, match="^manifest /dev/zero is a binary file"):
        batch.read_manifest("/dev/zero", 8, EditOptions())


def test_a_prompt_over_the_length_limit_is_refused_before_tokenizing(fake_tree, monkeypatch):
    root, _ = fake_tree
    limit = request.MAX_PROMPT_CHARS
    tokenized = []
    real = tokenizer.tokenize
    monkeypatch.setattr(tokenizer, "tokenize",
                        lambda text, *a, **k: tokenized.append(len(text)) or real(text, *a, **k))
    job = {"image": "img.png", "prompt": "x", "num_samples": 1, "seed": 0}
    manifest = write_manifest(root / "long.jsonl", [{**job, "prompt": "a " * limit}, job])
    jobs, errors = batch.read_manifest(str(manifest), 8, EditOptions())
    assert [j.line for j in jobs] == [2] and tokenized == [1]
    assert [e.line for e in errors] == [1] and str(errors[0]).splitlines() == [str(errors[0])]
    assert f"prompt is {2 * limit:,} characters long" in errors[0].reason and f"{limit:,}" in errors[0].reason


# -- faults during the run --------------------------------------------------------------------

def test_non_finite_sample_is_reported_failed_not_written(fake_tree, capsys):
    root, manifest = fake_tree
    out = root / "out"
    jobs, stats, _, _ = run_fake(out, jobs_of(manifest), FakeEditor(poison={(1, 1)}))
    assert stats.computed == 4 and stats.failed == 1 and stats.failures == {0: {1: batch.NOT_FINITE}}
    assert not (out / "a" / "sample_1.png").exists() and not (out / "a" / "sample_1.json").exists()
    assert not (out / "a" / "ranked.json").exists() and (out / "b" / "ranked.json").exists()
    assert sorted(stats.finished[0]) == [0, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"failed: job 'a' (manifest line 1) sample 1: {batch.NOT_FINITE}"]
    results = batch.job_results(jobs, stats)  # as report.json lists them
    assert results[0]["failed"] == [{"sample_id": 1, "reason": batch.NOT_FINITE}] and not results[0]["complete"]
    assert [s["sample_id"] for s in results[0]["samples"]] == [0, 2] and "failed" not in results[1]
    json.dumps(results, allow_nan=False)  # strict JSON

    _, stats, _, editor = run_fake(out, jobs_of(manifest))  # a rerun retries exactly that sample
    assert editor.computed == [(1, 1)] and stats.failed == 0
    ranked = json.loads((out / "a" / "ranked.json").read_text())
    assert [s["sample_id"] for s in ranked["samples"]] == [0, 1, 2]
    assert all(np.isfinite(s["distance"]) for s in ranked["samples"])


def test_write_failure_skips_that_job_and_the_others_complete(fake_tree, monkeypatch, capsys):
    root, manifest = fake_tree
    out = root / "out"
    save_png = outputs.save_png

    def full_disk(path, *args):
        if os.path.basename(os.path.dirname(path)) == "a":
            raise OSError(errno.ENOSPC, "No space left on device", path)
        save_png(path, *args)

    monkeypatch.setattr(batch.store.outputs, "save_png", full_disk)
    jobs, stats, _, editor = run_fake(out, jobs_of(manifest, batch_size=1))
    assert list(stats.job_errors) == [0] and "No space left on device" in stats.job_errors[0]
    assert "a rerun retries them" in stats.job_errors[0]
    assert editor.computed == [(1, 0), (2, 0), (2, 1)]  # a's later samples were not computed
    assert stats.computed == 2 and stats.failed == 1 and (out / "b" / "ranked.json").exists()
    assert not [p for p in tree(out) if os.path.basename(p).startswith(".tmp")]
    err = capsys.readouterr().err
    assert err.count("failed: job 'a' (manifest line 1): cannot write") == 1

    monkeypatch.setattr(batch.store.outputs, "save_png", save_png)
    _, stats, _, editor = run_fake(out, jobs_of(manifest, batch_size=1))  # the rerun is not blocked
    assert editor.computed == [(1, 0), (1, 1), (1, 2)] and stats.job_errors == {}


def test_a_missing_crop_is_computed_again_with_its_sample(fake_tree):
    """Killed between a crop and its sample's JSON (the JSON is written last), or a crop removed
    afterwards: the sample counts as missing and comes back, crop and all, byte for byte."""
    root, manifest = fake_tree
    out = root / "out"
    run_fake(out, jobs_of(manifest))
    before = tree(out)
    os.remove(out / "a" / "crops" / "sample_1.png")
    os.remove(out / "a" / "sample_1.json")
    _, stats, _, editor = run_fake(out, jobs_of(manifest))
    assert editor.computed == [(1, 1)] and stats.computed == 1 and tree(out) == before

    os.remove(out / "a" / "crops" / "sample_2.png")  # the crop alone
    _, items, conflicts, finished = batch.pending_items(str(out), jobs_of(manifest))
    assert items == [(0, 2)] and conflicts == [] and sorted(finished[0]) == [0, 1]
    _, stats, _, editor = run_fake(out, jobs_of(manifest))
    assert editor.computed == [(1, 2)] and tree(out) == before


def test_run_reads_no_sample_files_per_batch(fake_tree, monkeypatch):
    root, manifest = fake_tree
    out = root / "out"
    jobs, items, _, finished = batch.pending_items(str(out), jobs_of(manifest, batch_size=1))
    reads = []
    monkeypatch.setattr(batch.store, "_read_json", lambda path: reads.append(path) or None)
    monkeypatch.setattr(batch.run_module, "read_finished", lambda *a: pytest.fail("a batch re-read the disk"))
    stats = batch.run(FakeEditor(), jobs, str(out), items, finished=finished)
    # Per batch nothing is read; a completed job's summary reads its samples' entries (their scores)
    # and compares with the summary on disk, once.
    entries = [str(out / job.name / f"sample_{k}.json") for job in jobs for k in range(job.num_samples)]
    assert stats.computed == 5
    assert sorted(reads) == sorted(entries + [str(out / "a" / "ranked.json"), str(out / "b" / "ranked.json")])


# -- one smoke run of the program --------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust") / "project"
    root.mkdir()
    images(root)
    manifest = write_manifest(root / "jobs.jsonl", [
        {"name": "first", "image": "img.png", "mask": "mask.png", "prompt": "a red ball", "num_samples": 2,
         "seed": 1, **FAST},
        {"name": "blocked", "image": "img.png", "prompt": "a cat", "num_samples": 1, "seed": 2, **FAST},
        {"name": "second", "image": "other.png", "mask": "mask.png", "prompt": "a tree", "num_samples": 1,
         "seed": 3, **FAST},
    ], bom=True)
    out = root / "out"
    (out / "first").mkdir(parents=True)
    (out / "blocked").write_text("not a directory")
    (out / ".tmp-killed.json").write_text("{")
    (out / "first" / ".tmp-killed.png").write_bytes(b"\x89PNG")
    proc = launch(f"--manifest={manifest}", f"--output_dir={out}")
    return root, proc


def test_smoke_run_skips_the_blocked_job_and_cleans_up(smoke_run):
    root, proc = smoke_run
    out = root / "out"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped: manifest line 2: " in proc.stderr and "blocked exists and is not a directory" in proc.stderr
    assert "removed 2 temporary file(s)" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["results"]] == ["first", "second"]  # the BOM line is a job
    assert all(r["complete"] for r in report["results"]) and report["items"]["failed"] == 0
    assert [e["line"] for e in report["jobs"]["skipped_lines"]] == [2]
    assert (out / "blocked").read_text() == "not a directory"
    assert sorted(tree(out)) == sorted(["blocked", "report.json", "first", "second"] + [
        f"{job}/{f}" for job, n in (("first", 2), ("second", 1))
        for f in ["grid.png", "ranked.json", "crops"] + [f"sample_{k}.{e}" for k in range(n) for e in ("png", "json")]
        + [f"crops/sample_{k}.png" for k in range(n)]])
    assert np.asarray(Image.open(out / "first" / "sample_0.png")).shape == (30, 40, 3)  # the photo's size
    assert np.asarray(Image.open(out / "first" / "crops" / "sample_0.png")).shape == (64, 64, 3)
    identity = json.loads((out / "first" / "sample_0.json").read_text())["job"]["run"]
    assert identity["precision"] == "fp32" and identity["config"] == "smoke" and identity["image_size"] == 64
    assert isinstance(identity["weights"], str) and identity["weights"]


def test_moved_tree_reruns_with_nothing_to_compute(smoke_run):
    root, proc = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = root.parent / "moved"
    shutil.move(str(root), str(moved))
    before = tree(moved / "out")
    rerun = launch(f"--manifest={moved / 'jobs.jsonl'}", f"--output_dir={moved / 'out'}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads((moved / "out" / "report.json").read_text())
    assert report["items"] == {"total": 3, "skipped": 3, "computed": 0, "failed": 0, "summaries_written": 0}
    after = tree(moved / "out")
    assert [p for p in after if after[p] != before.get(p)] == ["report.json"]


def test_a_batch_never_holds_more_rows_than_a_group_has_items(tmp_path):
    """batch_size=10**8 for 3 samples: batches of 3 rows, not of 10**8 padding rows."""
    images(tmp_path)
    manifest = write_manifest(tmp_path / "jobs.jsonl", [
        {"name": "a", "image": "img.png", "prompt": "x", "num_samples": 3, "seed": 1, "batch_size": 10 ** 8}])
    jobs, stats, _, editor = run_fake(tmp_path / "out", jobs_of(manifest))
    assert editor.batch_rows == [3] and stats.computed == 3
