"""Atomic file writes: the one helper every writer in the package uses.

`atomic_write(path, write)` gives `write` a binary file object in the target's
directory, fsyncs it, and renames it over `path`, so a reader (a serving
replica, a restarting trainer) sees the old file or the new one, never half of
one. On any error the temporary file is removed and `path` is untouched.
"""

import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path, write):
    """Calls write(f) on a temp file beside `path`, then renames it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
