"""bdjax.files: the atomic write every writer uses (results, converted weights, the fetch manifest)."""

import os
import stat

import pytest

from bdjax import files


def test_atomic_write_renames_into_place_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the directory is created
    old = os.umask(0o027)
    try:
        files.atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
    finally:
        os.umask(old)
    assert path.read_text() == "new" and os.listdir(path.parent) == ["a.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(path), fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / f"{files.TMP_PREFIX}abc.png").write_text("x")
    (tmp_path / "keep.png").write_text("x")
    assert files.remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / f"{files.TMP_PREFIX}abc.png")]
    assert os.listdir(tmp_path) == ["keep.png"]


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
