"""Writing files safely, for every writer in bdjax (results, converted weights, the weights cache).

A file is written under a temporary name in its directory and renamed into place, so a process
killed at any moment leaves the old file, the new file, or nothing (plus, at worst, a `.tmp-*`
file that `remove_stale_temporaries` clears on the next run).
"""

from __future__ import annotations

import os
import tempfile

TMP_PREFIX = ".tmp-"  # every temporary file bdjax writes starts with this


def file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 less the process's umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # read it by setting it, then put it back
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path`; the temp file never outlives a failure
    (a killed process can leave one: `remove_stale_temporaries` clears it on the next run).
    The file gets the usual umask-derived mode, not mkstemp's private 0600."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        os.chmod(tmp, file_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the `.tmp-*` files a killed write left in `directory` (not its subdirectories);
    returns the removed paths. Call it only where no other writer is active."""
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(TMP_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def check_writable(output_dir: str, dirs=(), files=()) -> None:
    """Fail now, before any slow work, if files could not be written to `output_dir`: also
    if one of the subdirectories `dirs` it will write into is a file there, or one of the `files`
    it will write (relative paths) is a directory.

    Leaves nothing behind: a directory created for the probe is removed again.
    """
    if not output_dir:
        raise ValueError(f"output directory {output_dir!r} is empty: name a directory")
    for name in dirs:
        path = os.path.join(output_dir, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"cannot write to {path}: it is a file, not a directory; move it or choose "
                                     "another output directory")
    for name in files:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot write {path}: a directory has that name; move it or choose another "
                                    "output directory")
    parent = os.path.abspath(output_dir)
    created = []
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot write to {output_dir}: {parent} is a file, not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=f"{TMP_PREFIX}probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to {output_dir} ({e.strerror}); choose another output directory") from None
    finally:
        for path in created:  # innermost first
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
