"""Writing a command's output folder without ever losing what was there: THE rule for every tool.

- An existing output folder is replaced only when it is empty or recognisably an earlier output of
  the same kind (every entry in it is one the tool writes: ``recognise(folder)`` returns the entries
  it does not know); anything else is refused, naming what would be deleted.
- The output may not be, contain or sit inside one of the command's inputs (``sinklm convert run
  run/..`` or ``--out books/`` for inputs in ``books/``).
- All of that is checked before any work (:func:`check_output_folder`), and again at the swap.
- The new output is built in a temporary sibling folder (made with the user's umask, like any
  folder they create) and swapped in only once complete; on failure the sibling and any parent
  folders this created are removed, so a failed command leaves nothing behind and the old output
  untouched.
- A command killed outright (SIGKILL, a lost node) cannot clean up, so the siblings' names carry
  the host and process id that made them (``.NAME.partial-HOST-PID-XXXXXX``, ``.NAME.old-...``); the
  next build of the same output on that host removes the partial ones of processes no longer alive
  and, if the kill fell inside the swap (the earlier output moved aside, the new one not yet in
  place), puts the earlier output back first.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from data.shards import DataError

Recognise = Callable[[Path], list[str]]
"""``recognise(folder)`` -> the names of the entries in ``folder`` that this kind of output does not write."""


class OutputError(DataError):
    """An output path that would overwrite or delete something the command did not write."""


def _overlap(out: Path, inputs: Sequence[str | Path]) -> str | None:
    out = out.resolve()
    for raw in inputs:
        path = Path(raw).expanduser().resolve()
        if path == out:
            return f"output {out} is the input {raw} itself"
        if out in path.parents:
            return f"input {raw} is inside the output folder {out}, which --overwrite would delete"
        if path in out.parents:
            return f"output {out} is inside the input folder {raw}"
    return None


def check_output_folder(
    out: str | Path, overwrite: bool, kind: str, recognise: Recognise, inputs: Sequence[str | Path] = ()
) -> None:
    """Refuse ``out`` unless it is absent, empty, or (with ``overwrite``) an earlier ``kind`` written by us;
    refuse it when it overlaps any of ``inputs``. Raises :class:`OutputError`; changes nothing."""
    out = Path(out).expanduser()
    overlap = _overlap(out, inputs)
    if overlap:
        raise OutputError(f"{overlap}; choose an output folder outside the inputs")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is a file; expected a folder (absent, empty, or an earlier {kind})")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"output folder {out} already exists and is not empty: pass --overwrite to replace the earlier {kind}")
    foreign = sorted(recognise(out))
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputError(
            f"refusing to --overwrite {out}: it is not an earlier {kind} of sinklm (it holds {shown}, "
            f"which this command did not write and would delete); choose another output folder"
        )


def check_output_file(path: str | Path, what: str) -> None:
    """``path`` will be written as a file (or a folder for ``what`` ending in 'folder'): its parent must
    not be a file, and the path itself must not be a folder (for a file) or a file (for a folder)."""
    path = Path(path).expanduser()
    wants_dir = what.endswith("folder")
    if wants_dir and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is a file; expected a folder")
    if not wants_dir and path.is_dir():
        raise OutputError(f"{what} {path} is a folder; expected a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{what} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise OutputError(f"{what} {path}: cannot write in {parent} (permission denied)")
            break


def user_permissions(folder: Path) -> None:
    """Give everything under ``folder`` the permissions the user's umask gives a new file or folder
    (some writers, e.g. safetensors, create private 0600 files; an export is meant to be shared)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _sibling(out: Path, role: str) -> Path:
    return out.with_name(f".{out.name}.{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _dead_siblings(out: Path, role: str) -> list[Path]:
    """Siblings of ``out`` in ``role`` left by processes of this host that no longer run."""
    prefix, host = f".{out.name}.{role}-", socket.gethostname()
    dead = []
    for path in out.parent.glob(f"{prefix}*"):
        owner, _, rest = path.name[len(prefix):].rpartition("-")  # HOST-PID, XXXXXX
        made_on, _, pid = owner.rpartition("-")
        if made_on == host and pid.isdigit() and rest and not _alive(int(pid)):
            dead.append(path)
    return dead


def recover_killed_build(out: str | Path) -> None:
    """Undo what a killed build of ``out`` left: restore an earlier output it had moved aside, remove its partials."""
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return
    for old in _dead_siblings(out, "old"):
        if not out.exists():
            old.rename(out)  # killed mid-swap: the earlier output comes back
        else:
            shutil.rmtree(old, ignore_errors=True)  # killed after the swap: this was due for deletion
    for partial in _dead_siblings(out, "partial"):
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def building(
    out: str | Path, overwrite: bool, kind: str, recognise: Recognise, inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write into; on success it replaces ``out`` (checked as
    by :func:`check_output_folder`), on failure it is removed and ``out`` stays as it was."""
    out = Path(out).expanduser()
    recover_killed_build(out)
    check_output_folder(out, overwrite, kind, recognise, inputs)
    created = _missing_parents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "partial")
    tmp.mkdir()  # mode 0o777 minus the umask: the user's usual permissions (mkdtemp would give 0700)
    try:
        yield tmp
        check_output_folder(out, overwrite, kind, recognise, inputs)  # nothing foreign appeared meanwhile
        user_permissions(tmp)
        old = _sibling(out, "old")
        if out.is_dir():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first; only folders this call made, and only if still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
