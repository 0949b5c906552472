"""The data manifest: every artifact of a profile, where it lives, how to verify and fetch it.

`data_manifest.csv` (repository root) has one row per artifact: the 72 released
checkpoints, ImageNet and its five shifts, the held-out mask and the Soups result files, with URL
where public, expected size, sha256 where known, license and the local path under the data root
(`$MMSOUP_DATA`, default `~/data/mmsoup`). A `local_path` ending in `/` is a folder (a dataset);
a folder with a URL is fetched as a tar archive and unpacked into place.
"""

from __future__ import annotations

import difflib
import fnmatch
import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mmsoup.errors import MMSoupError
from mmsoup.io import sha256_file
from mmsoup.progress import tqdm

COLUMNS = (
    "name",
    "role",
    "profile",
    "source",
    "url",
    "size",
    "sha256",
    "license",
    "local_path",
    "notes",
)
DATA_ENV = "MMSOUP_DATA"
MANIFEST_ENV = "MMSOUP_MANIFEST"
DEFAULT_ROOT = "~/data/mmsoup"
MANIFEST_NAME = "data_manifest.csv"
PRESENT, MISSING, WRONG = "present", "missing", "wrong checksum"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_CHUNK = 1 << 20


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: `root` if given, else `$MMSOUP_DATA`, else `~/data/mmsoup`."""
    return Path(root or os.environ.get(DATA_ENV) or DEFAULT_ROOT).expanduser()


def manifest_path() -> Path:
    """Locate `data_manifest.csv`: `$MMSOUP_MANIFEST`, the source checkout, or the package data."""
    here = Path(__file__).resolve().parent  # mmsoup/data
    candidates = [
        os.environ.get(MANIFEST_ENV),
        here.parents[1] / MANIFEST_NAME,
        here / MANIFEST_NAME,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise MMSoupError(
        f"Cannot find {MANIFEST_NAME} (looked in ${MANIFEST_ENV}, {here.parents[1]} and {here}); "
        f"set {MANIFEST_ENV} to the file of the mmsoup repository."
    )


def read_manifest(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The manifest as a DataFrame of strings (empty cells are ''), columns `COLUMNS`."""
    path = Path(path) if path is not None else manifest_path()
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as e:
        raise MMSoupError(f"Cannot read the manifest {path} ({e}); fix or restore the file.") from e
    if tuple(table.columns) != COLUMNS:
        raise MMSoupError(
            f"{path} has the header {','.join(table.columns)}; it must be exactly {','.join(COLUMNS)}."
        )
    return table


def _row(name: str, manifest: pd.DataFrame) -> pd.Series:
    hits = manifest[manifest["name"] == name]
    if hits.empty:
        close = difflib.get_close_matches(name, manifest["name"].tolist(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise MMSoupError(f"{name!r} is not in the data manifest{hint}; see `mmsoup data verify`.")
    return hits.iloc[0]


def local_path(row: pd.Series, root: str | os.PathLike | None = None) -> Path:
    """Where an artifact lives: its `local_path` under the data root (absolute paths as they are)."""
    return data_root(root) / Path(row["local_path"]).expanduser()


def artifact_path(
    name: str, root: str | os.PathLike | None = None, manifest: pd.DataFrame | None = None
) -> Path:
    """The local path of the manifest row `name` under the data root."""
    manifest = read_manifest() if manifest is None else manifest
    return local_path(_row(name, manifest), root)


def _human(size: str) -> str:
    if not size.isdigit():
        return "size unknown"
    n = int(size)
    return f"~{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{n} bytes"


def _fix(row: pd.Series, status: str, path: Path) -> str:
    """The one sentence that tells a user how to make this row `present`."""
    fetch = f"run `python -m mmsoup data fetch {row['name']}`"
    if status == PRESENT:
        return ""
    if status == WRONG:
        how = fetch if row["url"] else f"obtain it again ({row['notes']})"
        return f"Delete {path} and {how}."
    if row["url"]:
        then = "" if _unpacked_by_fetch(row) else f", then {row['notes'].rstrip('.')}"
        return f"{fetch[0].upper()}{fetch[1:]} ({_human(row['size'])} from {row['url']}){then}."
    return f"Not downloadable by URL: {row['notes'].rstrip('.')}; put it at {path}."


def _unpacked_by_fetch(row: pd.Series) -> bool:
    """A file, or a folder whose URL is a tar archive: `fetch` puts it in place by itself."""
    return not row["local_path"].endswith("/") or _archive_name(row["url"]).endswith(TAR_SUFFIXES)


def _archive_name(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name


def _status(row: pd.Series, path: Path) -> str:
    if row["local_path"].endswith("/"):  # a dataset folder: present once it has any entry
        return PRESENT if path.is_dir() and any(path.iterdir()) else MISSING
    if not path.is_file():
        return MISSING
    if row["sha256"] and sha256_file(path) != row["sha256"].lower():
        return WRONG
    return PRESENT


def verify(
    profile: str, root: str | os.PathLike | None = None, manifest: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Status of every artifact of `profile`: name, role, status, path, fix.

    `profile` is a manifest profile (`embedded`, `paper`) or a profile spec such as `smoke` or
    `paper:n_runs=3` (then only model_0..model_3 of the released checkpoints are listed).
    """
    manifest = read_manifest() if manifest is None else manifest
    n_models = None
    if profile not in set(manifest["profile"]):
        from mmsoup.datasets import dataset
        from mmsoup.profiles import get_profile

        prof = get_profile(profile)  # an unknown name: one sentence listing the profiles
        profile = dataset(prof.dataset).manifest_profile
        n_models = prof.n_runs + 1 if prof.search == "released" else None
    rows = manifest[manifest["profile"] == profile]
    if n_models is not None:
        index = rows["name"].str.extract(r"^model_(\d+)$")[0].astype(float)
        rows = rows[~(index >= n_models)]
    if rows.empty:
        known = ", ".join(sorted(set(manifest["profile"])))
        raise MMSoupError(f"No manifest rows for profile {profile!r}; pick one of: {known}.")
    records = []
    for _, row in rows.iterrows():
        path = local_path(row, root)
        status = _status(row, path)
        records.append(
            {
                "name": row["name"],
                "role": row["role"],
                "status": status,
                "path": str(path),
                "fix": _fix(row, status, path),
            }
        )
    return pd.DataFrame.from_records(records, columns=["name", "role", "status", "path", "fix"])


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).netloc or url


def download(
    url: str, dest: str | os.PathLike, sha256: str = "", progress: bool = True, timeout: float = 60
) -> Path:
    """Download `url` to `dest`: resumable (HTTP Range into `dest.part`), sha256-checked, atomic."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "mmsoup"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and offset):  # 416 on a resume: the partial file is already whole
            raise MMSoupError(
                f"Downloading {url} failed with HTTP {e.code} ({e.reason}); check the URL in "
                f"{MANIFEST_NAME} or try again later."
            ) from e
        response = None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MMSoupError(
            f"Cannot reach {_host(url)} ({reason}); connect to the network and run fetch again "
            f"(a partial download resumes from {part})."
        ) from e
    if response is not None:
        with response:
            # a server that ignores Range answers 200 with the whole file: start over
            if offset and (response.status != 206 or not _range_starts_at(response, offset)):
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            )
            try:
                with open(part, "ab" if offset else "wb") as f, bar:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise MMSoupError(
                    f"The download of {url} broke off ({e}); run fetch again to resume from {part}."
                ) from e
            if total is not None and part.stat().st_size != total:
                raise MMSoupError(
                    f"The download of {url} ended after {part.stat().st_size} of {total} bytes; "
                    "run fetch again to resume."
                )
    if sha256:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()  # a corrupt prefix must not be resumed
            raise MMSoupError(
                f"{url} has sha256 {got} but the manifest expects {sha256}; the download was "
                f"deleted, nothing was written to {dest}: check the URL and the sha256 in {MANIFEST_NAME}."
            )
    with open(part, "rb+") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(part, dest)
    return dest


def _range_starts_at(response, offset: int) -> bool:
    content_range = response.headers.get("Content-Range", "")  # "bytes start-end/total"
    return content_range.startswith(f"bytes {offset}-")


def _unpack(archive: Path, target: Path) -> Path:
    """Unpack a tar archive so that its top folder becomes `target` (renamed in only when whole)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # refuses absolute paths and links out of tmp
        except (tarfile.TarError, OSError) as e:
            raise MMSoupError(
                f"Cannot unpack {archive} ({e}); delete it and run fetch again."
            ) from e
        entries = [p for p in Path(tmp).iterdir() if not p.name.startswith(".")]
        top = Path(tmp) / target.name
        if not top.is_dir():
            if len(entries) != 1 or not entries[0].is_dir():
                raise MMSoupError(
                    f"{archive} does not unpack to one folder named {target.name}; unpack it by hand into {target}."
                )
            top = entries[0]
        if target.is_dir():
            target.rmdir()  # an empty folder (`fetch` skips non-empty ones as present)
        os.replace(top, target)
    archive.unlink()
    return target


def fetch(
    names: Iterable[str],
    root: str | os.PathLike | None = None,
    progress: bool = True,
    manifest: pd.DataFrame | None = None,
) -> list[Path]:
    """Download the named artifacts (glob patterns allowed, e.g. `model_*`) into the data root."""
    manifest = read_manifest() if manifest is None else manifest
    rows = []
    for pattern in names:
        hits = manifest[[fnmatch.fnmatchcase(n, pattern) for n in manifest["name"]]]
        rows += [r for _, r in hits.iterrows()] if not hits.empty else [_row(pattern, manifest)]
    done = []
    for row in rows:
        path = local_path(row, root)
        if not row["url"]:
            raise MMSoupError(f"{row['name']} is not publicly downloadable: {row['notes']}")
        if _status(row, path) == PRESENT:
            done.append(path)
            continue
        if not row["local_path"].endswith("/"):
            done.append(download(row["url"], path, row["sha256"], progress))
            continue
        archive = data_root(root) / "downloads" / _archive_name(row["url"])
        if (
            not archive.is_file()
        ):  # a whole archive from an earlier run that stopped before unpacking
            download(row["url"], archive, row["sha256"], progress)
        if not _unpacked_by_fetch(row):
            raise MMSoupError(
                f"{row['name']} was downloaded to {archive}, which mmsoup does not unpack: {row['notes']}"
            )
        done.append(_unpack(archive, path))
    return done


def format_report(table: pd.DataFrame) -> str:
    """The verify table as text: one line per artifact, the fix below each non-present one."""
    lines = []
    for _, r in table.iterrows():
        lines.append(f"{r['status']:<15} {r['name']:<32} {r['path']}")
        if r["fix"]:
            lines.append(f"{'':<15} -> {r['fix']}")
    counts = table["status"].value_counts()
    lines.append(", ".join(f"{counts.get(s, 0)} {s}" for s in (PRESENT, MISSING, WRONG)))
    return "\n".join(lines)
