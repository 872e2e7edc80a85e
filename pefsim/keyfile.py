"""Private key files, mode 0600 from the moment they exist.

A key written with ``write_bytes`` and narrowed with ``chmod(0o600)`` after was, in between,
as readable as the umask left it (0644 usually): another user who opened it in that window kept a
descriptor to it, and its content. Every private key pefsim writes (the mTLS CA and identity keys
in pefsim/tls.py, the ESM signing key in pefsim/blob.py) goes through :func:`write_private`,
which creates the file with mode 0600 in the open(2) itself (a umask can only narrow that).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

MODE = 0o600


def write_private(path: Path, data: bytes, replace: bool = False) -> Path:
    """Write ``data`` to a new file ``path`` created with mode 0600 (O_CREAT | O_EXCL, so never
    through a file or symlink already there). An existing ``path`` is FileExistsError unless
    ``replace``: then the data goes to a new 0600 file in the same directory, renamed over
    ``path`` (a reader sees the old key or the new one, whole, and never a wider file)."""
    path = Path(path)
    if replace:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600, O_EXCL
    else:
        tmp = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if replace:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
