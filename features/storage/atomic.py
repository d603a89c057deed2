"""Whole-or-nothing outputs: one writer per output (a lock file), files and folders published by rename.

Every command that writes something goes through here:
    check_output(out, kind=...)          before any long work: not a folder/file mix-up, writable, ours to replace
    with OutputLock(out): ...            a second writer fails at once naming the holder's PID
    with atomic_file(out) as tmp: ...    tmp is renamed over `out` only when the block succeeds
    with atomic_dir(out) as tmp: ...     the same for a folder (Linux: renameat2 RENAME_EXCHANGE, one atomic step)
Killed at any moment, `out` holds either the previous complete output or the new complete one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from features.errors import UserError


def fsync_replace(tmp: Path, dst: Path) -> None:
    """Durably rename a finished file over `dst`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _fsync_dir(d: Path) -> None:
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def stem(out: Path) -> str:
    """The name an output's helper files (lock, temp, probe, previous) are made from: its own name, or for a name
    near the file system's 255-byte limit a shortened one with a hash, so that '.NAME.tmp-PID.pre.onnx' fits."""
    name = Path(out).name
    if len(os.fsencode(name)) <= 200:
        return name
    return os.fsdecode(os.fsencode(name)[:150]) + "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]


def write_failed(out: str | os.PathLike, e: OSError) -> UserError:
    why = os.strerror(e.errno) if e.errno else str(e)
    fix = "choose a writable location" if e.errno == errno.EROFS else "free space or fix permissions and re-run"
    return UserError(f"{out}: cannot write ({why}); {fix} (the previous output, if any, is untouched)")


def check_output(out: str | os.PathLike, *, folder: bool, is_ours: Callable[[Path], bool], what: str) -> Path:
    """Validate an output path before any work: its kind, that we may replace it, and that its folder is writable."""
    p = Path(out)
    if p.name in ("", ".", "..") or p.resolve() == Path(p.resolve().anchor):
        raise UserError(f"--out {out}: names a folder that holds other things (the current or a parent folder); "
                        f"pass a new {'folder' if folder else 'file'} name, e.g. --out model")
    if p.exists() and not p.is_dir() and not p.is_file():  # followed through links: /dev/full, /proc/self/fd/1
        raise UserError(f"--out {p}: is a pipe, device or socket; imgsent writes whole {'folder' if folder else 'file'}s"
                        f" only (temp + rename), pass a new {'folder' if folder else 'file'} name")
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"--out {p}: is a file, not a folder; pass a folder name for the {what}")
    if not folder and p.is_dir():
        raise UserError(f"--out {p}: is a folder; pass a file name for the {what}")
    if p.exists() and not is_ours(p):
        others = is_ours.foreign(p) if isinstance(is_ours, holds_only) and p.is_dir() else []
        if others and len(others) < len(list(p.iterdir())):  # ours, but something else was put inside
            raise UserError(f"--out {p}: a {what} made by imgsent, but it also holds {', '.join(others[:3])}"
                            f"{' ...' if len(others) > 3 else ''}; move that out of it, or pass another --out")
        raise UserError(f"--out {p}: exists and is not a {what} made by imgsent; pass another --out or remove it")
    parent = p.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{stem(p)}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {p}: cannot write in {parent} ({os.strerror(e.errno) if e.errno else e}); "
                        "choose a writable location") from None
    return p


class holds_only:
    """`is_ours` for a folder output: it holds nothing but files the command writes (DVC may have removed some
    of them already), so a folder of the user's is never replaced."""

    def __init__(self, *patterns: str):
        self.patterns = patterns

    def foreign(self, d: Path) -> list[str]:
        """What else the folder holds: the names in the way, sorted."""
        return sorted(f.name + ("/" if f.is_dir() else "") for f in d.iterdir()
                      if not any(fnmatch.fnmatch(f.name, p) for p in self.patterns))

    def __call__(self, d: Path) -> bool:
        return d.is_dir() and not self.foreign(d)


class OutputLock:
    """One writer per output: an O_EXCL lock file `OUT.lock` holding pid and host; a dead holder's lock is stale."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out.with_name(f"{stem(self.out)}.lock")

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and not self._alive(holder):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = f"PID {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
                raise UserError(f"{self.out} is being written by {who} (lock {self.path}); wait for it to finish, "
                                "or delete the lock if that process is gone") from None
            except OSError as e:
                raise write_failed(self.path, e) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
            self._remove_dead_temp_files()
            return self
        raise UserError(f"{self.out}: could not take the lock {self.path}; delete it if no imgsent is writing there")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            # A lock file being written right now is empty for an instant; treat an old empty one as stale.
            try:
                return None if time.time() - self.path.stat().st_mtime > 5 else {"pid": "?", "host": "?"}
            except OSError:
                return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot check another machine: assume it is alive
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError):
            return True
        return True

    def _remove_dead_temp_files(self) -> None:
        """Files `.OUT.tmp-PID` a killed run left half-written: with the lock held, no live run owns one of ours,
        and one whose PID is gone on this host is rubbish (folders are recovered by `recover`)."""
        for tmp in _siblings(self.out, "tmp"):
            pid = re.match(r"\d+", tmp.name.rsplit(".tmp-", 1)[-1])  # .OUT.tmp-PID, or a helper's .OUT.tmp-PID.x.y
            if tmp.is_file() and pid and int(pid[0]) != os.getpid() and \
                    not self._alive({"pid": pid[0], "host": socket.gethostname()}):
                remove_quietly(tmp)

    def __exit__(self, *exc) -> None:
        remove_quietly(self.path)


def remove_quietly(p: Path) -> None:
    """Clean-up that never hides the error being raised: a file that cannot be removed (a read-only file system,
    no permission) is left, and the cause the user must fix is what they see."""
    with contextlib.suppress(OSError):
        p.unlink(missing_ok=True)


def _siblings(out: Path, tag: str) -> list[Path]:
    return list(out.parent.glob(f".{glob.escape(stem(out))}.{tag}-*"))


def through_link(out: str | os.PathLike) -> Path:
    """Where an output really goes: an `--out` that is a symlink (say, to a bigger disk) is written at its
    target, and the link stays, instead of being replaced by a real file on the small disk."""
    out = Path(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `out`; on success it replaces `out` (fsynced), on any failure it is removed."""
    out = through_link(out)
    tmp = out.with_name(f".{stem(out)}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_replace(tmp, out)
    except OSError as e:
        raise write_failed(out, e) from None
    finally:
        remove_quietly(tmp)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2). False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there, never leaving `out` half-written."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
    else:  # two renames: a kill between them leaves `.OUT.previous-PID`, restored by the next writer
        prev = out.with_name(f".{stem(out)}.previous-{os.getpid()}")
        os.rename(out, prev)
        os.rename(tmp, out)
        shutil.rmtree(prev, ignore_errors=True)
    _fsync_dir(out.parent)


def recover(out: Path) -> None:
    """Under the lock: restore an output a killed two-rename publish left aside, and drop stale temp folders."""
    prev = sorted(_siblings(out, "previous"))
    if prev and not out.exists():
        os.rename(prev[-1], out)
    for p in _siblings(out, "previous") + _siblings(out, "tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Lock `out`, yield an empty temp folder beside it, and publish it as `out` when the block succeeds."""
    out = through_link(out)
    with OutputLock(out):
        recover(out)
        tmp = out.with_name(f".{stem(out)}.tmp-{os.getpid()}")
        try:
            tmp.mkdir(parents=True)
            yield tmp
            publish_dir(tmp, out)
        except OSError as e:
            raise write_failed(out, e) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
