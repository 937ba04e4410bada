"""Writing files safely, for every writer in bdjax (results, converted weights, the weights cache).

A file is written under a temporary name in its directory and renamed into place, so a process
killed at any moment leaves the old file, the new file, or nothing (plus, at worst, a `.tmp-*`
file that `remove_stale_temporaries` clears on the next run). A run writing into an output
directory holds its lock (`output_lock`), so two runs never mix their results there.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator

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


LOCK = ".bdjax-run.lock"  # held (flock) by the run writing into an output directory


class OutputInUse(ValueError):
    """The output directory is locked by another run."""


def _holder(fd: int) -> str:
    """Who holds the lock, as recorded in the lock file by `output_lock`."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not recorded itself yet"


@contextlib.contextmanager
def output_lock(output_dir: str, label: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on OUTPUT_DIR/.bdjax-run.lock; OutputInUse at once if another
    process holds it (its message names the directory as `label`). The OS drops the lock when its
    holder dies, so a crashed run never leaves the directory locked; the file records pid, host
    and start time for the message, and is removed (while still locked) when the run ends."""
    output_dir = os.path.abspath(output_dir)
    label = f"output directory {output_dir}" if label is None else label
    path = os.path.join(output_dir, LOCK)
    created, parent = [], output_dir
    while not os.path.lexists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    fd = None
    try:
        try:
            os.makedirs(output_dir, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    fd = None  # not ours: the file stays
                    raise OutputInUse(f"{label} is in use by another run ({holder}): wait for "
                                      "it to finish or choose another output directory") from None
                try:  # the previous holder may have removed the file between our open and flock
                    if os.path.samestat(os.fstat(fd), os.stat(path)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
                fd = None
        except OSError as e:
            check_writable(output_dir)  # its message says what is wrong, if it finds it
            raise PermissionError(f"cannot lock {path} ({e.strerror or e}); choose another output directory") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
            os.close(fd)
        for directory in created:  # made only to hold the lock: leave the disk as it was
            with contextlib.suppress(OSError):
                os.rmdir(directory)

