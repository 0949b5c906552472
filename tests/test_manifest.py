"""The data manifest: its rows, `verify` statuses and `fetch` against a local HTTP server (no network)."""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from mmsoup import cli
from mmsoup.data import manifest as mf
from mmsoup.errors import MMSoupError

PAYLOAD = bytes(range(256)) * 1200  # 300 kB: several 1 MiB-chunk-free reads, cheap to hash


def _tar_gz(folder: str, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FILES = {"/blob.bin": PAYLOAD, "/set.tar.gz": _tar_gz("set", {"n0/a.txt": b"a", "n1/b.txt": b"b"})}


class _Handler(BaseHTTPRequestHandler):
    """Serves FILES with HTTP Range support (http.server's own handler has none)."""

    ranges: list[str] = []  # Range headers seen, for the resume assertions
    honor_range = True

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        header = self.headers.get("Range")
        if header:
            type(self).ranges.append(header)
        if header and self.honor_range:
            start, status = int(re.match(r"bytes=(\d+)-", header).group(1)), 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _reset_handler() -> None:
    _Handler.ranges, _Handler.honor_range = [], True


def _manifest(rows: list[dict]) -> pd.DataFrame:
    full = [{c: "" for c in mf.COLUMNS} | {"profile": "paper", "role": "x"} | r for r in rows]
    return pd.DataFrame(full, columns=list(mf.COLUMNS))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_repo_manifest_lists_the_72_checkpoints_and_the_paper_data() -> None:
    table = mf.read_manifest()
    assert tuple(table.columns) == mf.COLUMNS
    assert table["name"].is_unique
    paper = table[table["profile"] == "paper"].set_index("name")
    for i in range(72):
        assert paper.loc[f"model_{i}", "url"].endswith(f"/releases/download/v0.0.2/model_{i}.pt")
        assert paper.loc[f"model_{i}", "local_path"] == f"checkpoints/model_{i}.pt"
    for name in (
        "imagenet-train",
        "imagenet-val",
        "imagenetv2-matched-frequency",
        "imagenet-sketch",
        "imagenet-r",
        "objectnet-1.0",
        "imagenet-a",
        "imagenet_98_idxs",
    ):
        assert name in paper.index
    assert paper.loc["imagenet-train", "url"] == ""  # ImageNet is not publicly downloadable
    assert re.fullmatch(r"[0-9a-f]{64}", paper.loc["individual_model_results", "sha256"])
    assert not any(Path(p).is_absolute() for p in paper["local_path"])  # all under the data root


def test_data_root_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MMSOUP_DATA", str(tmp_path))
    assert mf.artifact_path("model_7") == tmp_path / "checkpoints" / "model_7.pt"
    monkeypatch.delenv("MMSOUP_DATA")
    assert mf.data_root() == Path("~/data/mmsoup").expanduser()
    assert mf.data_root(tmp_path / "x") == tmp_path / "x"  # an explicit root wins


def test_read_manifest_rejects_a_wrong_header(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("name,url\nx,y\n")
    with pytest.raises(MMSoupError, match="header"):
        mf.read_manifest(bad)


def test_verify_reports_present_missing_and_wrong_checksum(tmp_path: Path) -> None:
    (tmp_path / "good.bin").write_bytes(b"good")
    (tmp_path / "bad.bin").write_bytes(b"tampered")
    (tmp_path / "set" / "n0").mkdir(parents=True)
    table = _manifest(
        [
            {
                "name": "good",
                "local_path": "good.bin",
                "sha256": _sha(b"good"),
                "url": "http://h/good.bin",
            },
            {
                "name": "bad",
                "local_path": "bad.bin",
                "sha256": _sha(b"expected"),
                "url": "http://h/bad.bin",
            },
            {
                "name": "gone",
                "local_path": "gone.bin",
                "url": "http://h/gone.bin",
                "size": "460000000",
            },
            {"name": "private", "local_path": "private/", "notes": "ask the owners"},
            {"name": "set", "local_path": "set/"},
            {"name": "other", "local_path": "o.bin", "profile": "embedded"},
        ]
    )
    report = mf.verify("paper", tmp_path, table).set_index("name")
    assert report["status"].to_dict() == {
        "good": "present",
        "bad": "wrong checksum",
        "gone": "missing",
        "private": "missing",
        "set": "present",
    }
    assert report.loc["good", "fix"] == ""
    assert "python -m mmsoup data fetch gone" in report.loc["gone", "fix"]
    assert "~0.46 GB" in report.loc["gone", "fix"]
    assert "ask the owners" in report.loc["private", "fix"]
    assert str(tmp_path / "private") in report.loc["private", "fix"]
    assert report.loc["bad", "fix"].startswith(f"Delete {tmp_path / 'bad.bin'}")
    with pytest.raises(MMSoupError, match="embedded"):
        mf.verify("nope", tmp_path, table)


def test_fetch_downloads_verifies_and_renames_into_place(tmp_path: Path, server: str) -> None:
    table = _manifest(
        [
            {
                "name": "blob",
                "local_path": "d/blob.bin",
                "url": f"{server}/blob.bin",
                "sha256": _sha(PAYLOAD),
            }
        ]
    )
    [path] = mf.fetch(["blob"], tmp_path, progress=False, manifest=table)
    assert path == tmp_path / "d" / "blob.bin" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "d" / "blob.bin.part").exists()
    assert mf.verify("paper", tmp_path, table)["status"].tolist() == ["present"]


def test_fetch_resumes_a_partial_download_with_a_range_request(tmp_path: Path, server: str) -> None:
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD[:1000])
    mf.download(f"{server}/blob.bin", dest, _sha(PAYLOAD), progress=False)
    assert _Handler.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == PAYLOAD


def test_fetch_restarts_when_the_server_ignores_range(tmp_path: Path, server: str) -> None:
    _Handler.honor_range = False
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale prefix")
    mf.download(f"{server}/blob.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_renames_nothing_into_place(tmp_path: Path, server: str) -> None:
    dest = tmp_path / "blob.bin"
    with pytest.raises(MMSoupError, match="sha256"):
        mf.download(f"{server}/blob.bin", dest, _sha(b"something else"), progress=False)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()


def test_fetch_unpacks_a_tar_dataset_into_its_folder(tmp_path: Path, server: str) -> None:
    table = _manifest([{"name": "set", "local_path": "set/", "url": f"{server}/set.tar.gz"}])
    [path] = mf.fetch(["set"], tmp_path, progress=False, manifest=table)
    assert (path / "n0" / "a.txt").read_bytes() == b"a" and (path / "n1" / "b.txt").is_file()
    assert not (tmp_path / "downloads" / "set.tar.gz").exists()  # the archive is removed


def test_fetch_errors_are_one_clear_sentence(tmp_path: Path, server: str) -> None:
    with socket.socket() as s:  # a port nobody listens on: "offline"
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    table = _manifest(
        [
            {"name": "model_0", "local_path": "m0.pt", "url": f"http://127.0.0.1:{closed}/m0.pt"},
            {"name": "model_1", "local_path": "m1.pt", "url": f"{server}/missing.pt"},
            {
                "name": "imagenet",
                "local_path": "imagenet/",
                "notes": "request access at image-net.org",
            },
        ]
    )
    with pytest.raises(MMSoupError, match=r"Cannot reach 127\.0\.0\.1"):
        mf.fetch(["model_0"], tmp_path, progress=False, manifest=table)
    with pytest.raises(MMSoupError, match="HTTP 404"):
        mf.fetch(["model_1"], tmp_path, progress=False, manifest=table)
    with pytest.raises(MMSoupError, match="not publicly downloadable: request access"):
        mf.fetch(["imagenet"], tmp_path, progress=False, manifest=table)
    with pytest.raises(MMSoupError, match="did you mean .*model_0"):
        mf.fetch(["model_O"], tmp_path, progress=False, manifest=table)
    with pytest.raises(MMSoupError, match="Cannot reach"):  # a glob selects both checkpoints
        mf.fetch(["model_*"], tmp_path, progress=False, manifest=table)


def test_cli_handlers_report_and_exit_nonzero_when_data_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = argparse.Namespace(profile="paper", data_root=str(tmp_path))
    assert cli.cmd_data_verify(args) == 1  # nothing is present in an empty data root
    out = capsys.readouterr().out
    assert "missing" in out and "python -m mmsoup data fetch model_0" in out
    n = int((mf.read_manifest()["profile"] == "paper").sum())
    assert out.strip().splitlines()[-1].startswith(f"0 present, {n} missing")
    with pytest.raises(MMSoupError, match="Name what to fetch"):
        cli.cmd_data_fetch(argparse.Namespace(names=[], data_root=str(tmp_path)))
