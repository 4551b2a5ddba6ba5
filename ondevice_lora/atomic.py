"""Crash-safe writing: an output appears at its final path complete, and what was there before
stays there, complete, until the new one is.

    with staged_dir(out) as tmp:
        write files into tmp
    # here `out` is the new directory; on any exception (Ctrl-C included) `out` is untouched

The scheme ("stage, exchange, sweep"):

1. **Stage** beside `out` (same filesystem), in `.NAME.odlora-staging.PID.XXXX`: the pid in the
   name says which process it belongs to.
2. **Exchange** with Linux `renameat2(RENAME_EXCHANGE)`: one system call swaps the staged directory
   and the old one, so at every instant the final path holds either the old or the new directory,
   complete. The old one, now under the staging name, is deleted afterwards.
   Where the kernel, libc or filesystem lacks the call (macOS, some network filesystems), two
   renames: `out` -> `.NAME.odlora-old.PID`, staged -> `out`. A kill between them leaves no `out`;
   the next write to `out` (`prepare`) first renames the old copy back.
3. **Sweep**: every write to `out` first deletes the staging and old copies that a dead process
   left beside it (never a live process's: the pid in the name is checked).

A packed adapter is two files, the blob and its sidecar `<blob>.json` (which records the blob's
sha256), and two files cannot be exchanged in one call. `staged_pair` commits them in this order:
the new sidecar to `.<blob>.odlora-pending.PID.json`, the new blob over the old, the pending sidecar
over the old sidecar. The rule that readers (`pair_sidecar`) and the next pack apply: a pending
sidecar describes the blob when its sha256 is the blob's (the kill fell after the blob's rename:
roll forward); otherwise the blob's own sidecar does (the kill fell before it: roll back, and the
next pack deletes the pending one). Either way a reader sees the old pair or the new pair.

What this protects against is a process that dies (kill -9, the OOM killer, Ctrl-C, an exception),
not a power cut: nothing is fsynced.

Tests kill at chosen instants: with ODLORA_TEST_KILL_AT=POINT:N[:SIGNAL] the process sends itself
SIGKILL (or SIGNAL, e.g. INT) the Nth time it reaches `kill_point(POINT)` (tests/test_crash_safety.py).
Unset, a kill point costs one environment lookup.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .formats.manifest import sha256_file

STAGING, OLD, PENDING = "odlora-staging", "odlora-old", "odlora-pending"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
# renameat2's syscall number where glibc (< 2.28) has no wrapper for it.
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "i686": 353, "armv7l": 382, "riscv64": 276,
                 "ppc64le": 357, "s390x": 347}
KILL_ENV = "ODLORA_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


# -- test kill points -----------------------------------------------------------------------------

def kill_point(name: str) -> None:
    """Where tests may kill this process (see the module docstring); a no-op otherwise."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, n, *sig = spec.split(":")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] == int(n):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig[0]}") if sig else signal.SIGKILL)


# -- names beside `out` ---------------------------------------------------------------------------

def _side_name(out: Path, tag: str, suffix: str = "") -> str:
    return f".{out.name}.{tag}.{os.getpid()}{suffix}"


def _owner(name: str, out: Path, tag: str) -> Optional[int]:
    """The pid in a side name `.NAME.TAG.PID[...]` of `out`, or None if `name` is not one."""
    prefix = f".{out.name}.{tag}."
    if not name.startswith(prefix):
        return None
    pid = name[len(prefix):].split(".")[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(out: Path, tag: str) -> list[Path]:
    """Side files of `out` with this tag that a dead process left."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if (pid := _owner(p.name, out, tag)) is not None and pid != os.getpid() and not _alive(pid))


def remove(path: Path) -> None:
    """Delete a file or directory tree if it is there (never following a link)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def prepare(out: Path) -> None:
    """Before writing `out`: its parent exists, a copy the two-rename fallback set aside is back
    if the final path is missing, and what dead writers left beside it is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in _stale(out, OLD):
        if not os.path.lexists(out):
            os.rename(old, out)  # killed between the fallback's two renames: the old copy returns
        else:
            remove(old)
    for leftover in _stale(out, STAGING):
        remove(leftover)
    settle_pair(out)


def discard(out: Path) -> None:
    """Delete an output this process is done with, and what dead writers left beside it."""
    for leftover in _stale(out, STAGING) + _stale(out, OLD):
        remove(leftover)
    remove(out)


# -- the exchange -------------------------------------------------------------------------------------

def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the kernel, libc or filesystem does not offer it."""
    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    args = (AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        rc = fn(*args)
    elif platform.machine() in SYS_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(SYS_RENAMEAT2[platform.machine()]), ctypes.c_int(args[0]),
                          ctypes.c_char_p(args[1]), ctypes.c_int(args[2]), ctypes.c_char_p(args[3]),
                          ctypes.c_uint(flags))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def swap_in(new: Path, out: Path) -> None:
    """Put the finished directory `new` at `out` (module docstring, step 2). Afterwards `new`
    names the old copy or nothing: the caller deletes it."""
    if not os.path.lexists(out):
        if not _renameat2(new, out, RENAME_NOREPLACE):
            os.rename(new, out)
        return
    if _renameat2(new, out, RENAME_EXCHANGE):
        kill_point("swapped")
        return
    old = out.with_name(_side_name(out, OLD))
    os.rename(out, old)
    kill_point("set-aside")
    os.rename(new, out)
    remove(old)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside `out`, deleted when the block ends, whatever happens."""
    prepare(out)
    tmp = Path(tempfile.mkdtemp(prefix=_side_name(out, STAGING, "."), dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it the user's usual mode
    try:
        yield tmp
    finally:
        remove(tmp)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A directory to fill, swapped in at `out` when the block ends without an exception."""
    out = Path(out)
    with _staging(out) as tmp:
        yield tmp
        kill_point("staged")
        swap_in(tmp, out)


# -- a blob and its sidecar -----------------------------------------------------------------------------

def sidecar_of(blob: Path) -> Path:
    return blob.with_name(blob.name + ".json")


def _pending(blob: Path) -> list[Path]:
    if not blob.parent.is_dir():
        return []
    return sorted(p for p in blob.parent.iterdir()
                  if _owner(p.name, blob, PENDING) is not None and p.name.endswith(".json"))


def _describes(sidecar: Path, blob: Path) -> bool:
    """Whether a sidecar records this blob's sha256."""
    try:
        info = json.loads(sidecar.read_text())
        return blob.is_file() and isinstance(info, dict) and info.get("sha256") == sha256_file(blob)
    except (OSError, ValueError):
        return False


def pair_sidecar(blob: Path) -> Path:
    """The sidecar that describes `blob`: its own, or the pending one of a pack killed after it
    renamed the new blob into place (module docstring)."""
    blob = Path(blob)
    return next((p for p in _pending(blob) if _describes(p, blob)), sidecar_of(blob))


def settle_pair(blob: Path) -> None:
    """Finish or undo the commit of a pack that died: a pending sidecar that describes the blob
    replaces its sidecar (roll forward), one that does not is deleted (roll back)."""
    for pending in _pending(blob):
        pid = _owner(pending.name, blob, PENDING)
        if pid != os.getpid() and _alive(pid):
            continue
        if _describes(pending, blob):
            os.replace(pending, sidecar_of(blob))
        else:
            pending.unlink(missing_ok=True)


@contextmanager
def staged_pair(blob: Path) -> Iterator[tuple[Path, Path]]:
    """(blob, sidecar) to write in a staging directory, committed at `blob` and `<blob>.json` as
    a pair when the block ends without an exception (module docstring)."""
    blob = Path(blob)
    with _staging(blob) as tmp:
        yield tmp / blob.name, tmp / sidecar_of(blob).name
        kill_point("staged")
        pending = blob.with_name(_side_name(blob, PENDING, ".json"))
        os.rename(tmp / sidecar_of(blob).name, pending)
        kill_point("pair-pending")
        os.replace(tmp / blob.name, blob)
        kill_point("pair-blob")
        os.replace(pending, sidecar_of(blob))
