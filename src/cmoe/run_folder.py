"""Output folders: checked before the work, written all or nothing, resumable work kept in OUTPUT.partial."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from cmoe.errors import CMoEError

# a folder of our own naming left by a writer that was killed: `.OUT.tmp-<pid>-...` or `.OUT.old-<pid>`
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)(-.*)?$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[^-]+$")  # before the pid was in the name
_LEGACY_AGE_S = 3600


def check_writable_destination(path, overwrite: bool = False) -> Path:
    """Fail now, in one sentence, if `path` cannot become an output folder (before any long work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CMoEError(f"{path} is a file, not a folder; choose another output folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CMoEError(f"{path} already exists and is not empty; choose another output folder or pass --overwrite.")
    parent = _blocking_ancestor(path)
    if parent is not None:
        problem = "not a folder" if not parent.is_dir() else "not writable"
        raise CMoEError(f"{path} cannot be created: {parent} is {problem}; choose another output folder.")
    return path


def check_writable_file(path, flag: str) -> None:
    """Fail now, in one sentence, if the file `path` (given as `flag`) cannot be written later; its folders are
    made when it is."""
    path = Path(path)
    if path.is_dir():
        raise CMoEError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'results.json'}.")
    parent = _blocking_ancestor(path)
    if parent is not None:
        raise CMoEError(f"{flag} {path} cannot be written: {parent} is not a writable folder.")


def _blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing path above `path` where it is not a writable folder, else None."""
    parent = _existing_ancestor(path.parent)
    return None if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) else parent


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def partial_folder(output) -> Path:
    """Where a resumable run (sweep, fine-tune) keeps its work until it is done: OUTPUT.partial beside OUTPUT."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def drop_if_nothing_to_resume(work: Path, resumable: bool) -> None:
    """Remove a work folder that holds nothing a later run could resume (a run that failed early)."""
    if work.exists() and not resumable:
        shutil.rmtree(work)


@contextmanager
def atomic_directory(path):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed.

    The folder gets the permissions the umask gives a new folder, not mkdtemp's 0700. Leftovers of writers
    to the same place that were killed (their process is gone) are removed first.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CMoEError(f"{path} cannot be created ({error.strerror}); choose another output folder.") from error
    remove_leftovers(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as error:
        raise CMoEError(f"{path} cannot be written ({error.strerror}); choose another output folder.") from error
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _follow_umask(tmp)
    publish(tmp, path)


def publish(finished: Path, path: Path) -> None:
    """Put the finished folder in `path`'s place: whatever was there is moved aside first and removed after,
    so `path` always holds one whole folder."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    finished.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    """Write a file whole or not at all: to a temporary name beside it, then renamed over it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_file(path):
    """Yield a temporary file name beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CMoEError(f"{path.parent} cannot be created ({error.strerror}); choose another output file.") from error
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(path: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` folders beside `path` whose writing process no longer runs."""
    removed = []
    for entry in path.parent.glob(f".{path.name}.*"):
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == path.name:
            stale = not _process_alive(int(match["pid"]))
        else:
            legacy = _LEGACY_TMP.match(entry.name)
            stale = bool(legacy and legacy["name"] == path.name
                         and time.time() - entry.stat().st_mtime > _LEGACY_AGE_S)
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _follow_umask(folder: Path) -> None:
    """Files as the umask makes them: writers that go through mkstemp (safetensors' does) leave 0600."""
    mode = 0o666 & ~_umask()
    for entry in folder.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, mode)
        elif entry.is_dir():
            os.chmod(entry, 0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
