"""Reading a file a user named, without ever hanging, following a stranger's link or filling RAM.

    data = read_regular_file(Path("notes.txt"), max_bytes=64 * 2**20)

Only regular files are read: a FIFO would block `open()` until some writer appears (forever, for
`--data` pointing at one), a device never ends (/dev/zero) and a socket cannot be opened. The
file is opened with O_NONBLOCK, so even a FIFO swapped in after a check cannot hang the open, and
its type and size are taken from the open descriptor (fstat), so what is checked is what is read.
Every problem is one OdloraError line naming the path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import OdloraError

KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
         stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def kind(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)")."""
    return next((name for test, name in KINDS.items() if test(mode)), "not a regular file")


def check_regular(path: Path, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OdloraError(f"{path}: {kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise OdloraError(f"{path}: {mib(st.st_size)} is over the limit of {mib(max_bytes)}")


def stat_path(path: Path, follow_symlinks: bool = True) -> os.stat_result:
    """os.stat with its errors as one line (missing, permission, a file used as a directory, link loops)."""
    try:
        return os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise OdloraError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise OdloraError(f"{path}: {e.strerror or e}") from None


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (a symlink the user named is followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise OdloraError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        check_regular(path, os.fstat(fd), max_bytes)  # before fdopen, which refuses a directory itself
    except OdloraError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)  # one byte more tells a file that grew since fstat
        except OSError as e:
            raise OdloraError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise OdloraError(f"{path}: over the limit of {mib(max_bytes)}")
    return data


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"
