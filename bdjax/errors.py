"""The errors bdjax's modules share, kept here so that none of them imports another for its
errors alone (bdjax/options.py re-exports `OptionError` as `bdjax.options.OptionError`), and the
rule every program (launch/, checkpoints_convert/) applies to an OSError: the system's failures
and failures on a named file are the user's to fix (one line, `os_error_line`), the rest are bugs."""

import errno


class OptionError(ValueError):
    """A value an edit cannot run with; the message opens with "name=value", and `name` is the
    option or request field at fault (so a program can name its own flag or field for it)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# What to do about the failures of the system rather than of the program (by errno).
ERRNO_FIXES = {
    errno.ENOSPC: "free space on that disk, or choose a directory on another one",
    errno.EDQUOT: "your disk quota is used up: free space within it, or choose a directory outside it",
    errno.EROFS: "that file system is read-only: choose a writable directory",
    errno.ELOOP: "symbolic links on that path form a loop: fix or remove them",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "that file system cannot hold a file this large: choose a directory on another one",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "something is already there: move it away, or choose another path",
    errno.ENOTDIR: "a file stands where a directory should be: choose another path",
    errno.EISDIR: "a directory stands where a file should be: choose another path",
}


def is_user_os_error(e: OSError) -> bool:
    """An OSError the user fixes: one raised with a message of its own (no errno: the checks'),
    one on a named file, or one of the system's failures in ERRNO_FIXES (a full or read-only
    disk, ...). Anything else (an I/O error on no file, a bad file descriptor) is a bug."""
    return e.errno is None or e.filename is not None or e.errno in ERRNO_FIXES


def os_error_line(e: OSError) -> str:
    """An OSError as `<what> (<file>): <fix>`; one raised with a message of its own (no errno),
    as the projects' checks raise them, as it is."""
    if e.errno is None or not e.strerror:
        return str(e)
    where = f" ({e.filename})" if e.filename is not None else ""
    return f"{e.strerror}{where}: {ERRNO_FIXES.get(e.errno, 'check that path and its file system')}"

