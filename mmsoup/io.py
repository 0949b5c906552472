"""Files and folders: atomic output (every file mmsoup writes appears whole or not at all), the
checks of the paths a command will read or write (done before any work; they create nothing), the
cache root, a file's sha256 and JSON input with one-sentence errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmsoup.errors import MMSoupError

CACHE_ENV = "MMSOUP_CACHE"
_BLOCK = 1 << 20  # 1 MiB: hashing streams a file, whatever its size


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache` if given, else $MMSOUP_CACHE, else ~/.cache/mmsoup."""
    given = cache or os.environ.get(CACHE_ENV)
    return Path(given or Path.home() / ".cache" / "mmsoup").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed one is an MMSoupError naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise MMSoupError(f"The {what} {path} does not exist; check the path.")
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise MMSoupError(
            f"The {what} {path} cannot be read ({e.strerror}); fix its permissions."
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MMSoupError(f"The {what} {path} is not valid JSON ({e}); fix or re-create it.") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data reaches the disk before the rename makes it visible
            os.fsync(f.fileno())
        # mkstemp creates 0600; the output gets the mode open() would give it (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            raise MMSoupError(
                f"The disk filled up while writing {path}; free space and run again (nothing was written)."
            ) from e
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def public_dir(path: str | os.PathLike) -> Path:
    """Give a folder made by tempfile.mkdtemp (0700) the mode os.mkdir would (0777 & ~umask)."""
    os.chmod(path, 0o777 & ~current_umask())
    return Path(path)


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a non-Python writer (safetensors' Rust) reports it only in text."""
    if isinstance(e, MMSoupError):  # already one sentence (a nested atomic write)
        return False
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "os error 28" in str(e) or "No space left on device" in str(e)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# -- checks of paths before any work: they create nothing ---------------------------------------
def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (absolute)."""
    path = Path(path).expanduser().absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in `folder` (permissions, read-only mounts, /proc; even as root)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:  # an unnamed (or at once deleted) file: the kernel's own answer, nothing left behind
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_writable(path: str | os.PathLike, flag: str, file: bool = False) -> Path:
    """Refuse, naming `flag`, a folder (or with `file` a file's folder) that cannot be created or written."""
    path = Path(path).expanduser()
    if file and path.is_dir():
        raise MMSoupError(
            f"{flag} {path} is a folder; pass a file path such as {path / 'model.safetensors'}."
        )
    folder = path.parent if file else path
    base = nearest_existing(folder)
    if not file and base == folder.absolute() and not base.is_dir():
        raise MMSoupError(f"{flag} {folder} is a file, not a folder; pass a folder.")
    if not base.is_dir():
        raise MMSoupError(
            f"{flag} {path} cannot be created because {base} is a file; pass another path."
        )
    if not _can_write_in(base):
        raise MMSoupError(
            f"{flag} {path} cannot be written (no write access to {base}); pass a folder you can write to."
        )
    return path


def check_readable(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, naming `flag`, an input file that does not exist or cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MMSoupError(f"{flag} {path} does not exist (or is not a file); check the path.")
    if not os.access(path, os.R_OK):
        raise MMSoupError(
            f"{flag} {path} cannot be read; fix its permissions or pass another file."
        )
    return path


def check_free_space(path: str | os.PathLike, needed: int, flag: str) -> None:
    """Refuse, naming `flag`, a folder whose disk has less than `needed` bytes free."""
    base = nearest_existing(path)
    free = shutil.disk_usage(base).free
    if free < needed:
        raise MMSoupError(
            f"{flag} {path} needs about {needed / 2**20:.0f} MiB but its disk has {free / 2**20:.0f} MiB "
            "free; free space or pass a folder on another disk."
        )
