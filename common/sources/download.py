"""Resumable, verified downloads of the public CT data sets (their extraction: common.imaging.archives).

``download_file`` streams a URL into ``<dest>.part`` (resuming it with an HTTP Range request), verifies size
and checksum, and only then renames it onto ``dest`` (atomic). Every failure is a ``DownloadError`` whose
message is one line.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from common.core.errors import DownloadError, one_line

CHUNK = 1 << 20
OFFLINE_HINT = "Offline? Import your own scans with: python 01_download_data.py --from DIR"


@dataclass(frozen=True)
class Source:
    """A downloadable archive. ``confirmed`` is False where the address/checksum are not pinned yet."""

    name: str
    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    confirmed: bool = True
    note: str = ""


# Medical Segmentation Decathlon, Task09 Spleen: the tar MONAI downloads. URL and md5 are those of
# MONAI's DecathlonDataset (monai/apps/datasets.py: resource/md5 tables), also used by MONAI's
# spleen tutorials. 61 portal-venous CT scans (41 in imagesTr with labels), ~1.5 GB, CC-BY-SA 4.0.
SPLEEN = Source(
    name="spleen",
    url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar",
    filename="Task09_Spleen.tar",
    md5="410d4a301da4e5b2f6f86ec3ddba524e",
    note="Medical Segmentation Decathlon Task09_Spleen (CC-BY-SA 4.0)",
)

# Learn2Reg lung CT inspiration/expiration pairs (Radboud UMC; Hering, Murphy & van Ginneken 2020,
# "Learn2Reg Challenge: CT Lung Registration - Training Data", Zenodo, doi:10.5281/zenodo.3835682).
# training.zip holds training/scans/case_XXX_{exp,insp}.nii.gz and training/lungMasks/. The address
# is the Zenodo record's file (used by DeepReg's lung CT demos); its checksum is NOT pinned here (to
# be confirmed from the Zenodo record page), so only the server's Content-Length is checked.
LEARN2REG = Source(
    name="learn2reg",
    url="https://zenodo.org/records/3835682/files/training.zip",
    filename="Learn2Reg_LungCT_training.zip",
    confirmed=False,
    note="Learn2Reg 2020 lung CT training data, Zenodo 3835682 (checksum to be confirmed)",
)

SOURCES: dict[str, Source] = {SPLEEN.name: SPLEEN, LEARN2REG.name: LEARN2REG}


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------
def file_digest(path: str | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | Path, *, expected_size: int | None = None, sha256: str | None = None,
                md5: str | None = None) -> str | None:
    """Return None when ``path`` matches the given size/checksums, else a one-line reason."""
    path = Path(path)
    size = path.stat().st_size
    if expected_size is not None and size != int(expected_size):
        return f"size {size} bytes, expected {int(expected_size)}"
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want:
            got = file_digest(path, algo)
            if got.lower() != want.lower():
                return f"{algo} {got}, expected {want.lower()}"
    return None


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------
def _resolve_host(url: str, timeout: float) -> None:
    """Fail fast when the host name does not resolve within ``timeout`` s (requests' timeout excludes DNS)."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise DownloadError(f"download of {url} failed: not a valid URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: dict[str, BaseException | None] = {"error": None}

    def work() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=work, name="resolve-" + host, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DownloadError(f"download of {url} failed: cannot resolve host {host} within {timeout:g} s. {OFFLINE_HINT}")
    if result["error"] is not None:
        raise DownloadError(f"download of {url} failed: cannot resolve host {host}. {OFFLINE_HINT}")


def _reason(exc: BaseException, url: str, connect_timeout: float) -> str:
    parts = urlsplit(url)
    where = parts.netloc or url
    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no answer from {where} within {connect_timeout:g} s"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return f"{where} stopped sending data (read timeout)"
    if "Failed to resolve" in text or "NameResolutionError" in text or "Name or service not known" in text:
        return f"cannot resolve host {parts.hostname}"
    if "Connection refused" in text:
        return f"connection to {where} refused"
    if "IncompleteRead" in text or "Connection broken" in text or "Connection reset" in text:
        return "connection dropped"
    if "Network is unreachable" in text:
        return "network is unreachable"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error talking to {where}"
    return one_line(f"{type(exc).__name__}: {text}")[:300]


def _connect_timeout(timeout: float | tuple[float, float] | None) -> float:
    if timeout is None:
        return 30.0
    if isinstance(timeout, (tuple, list)):
        return float(timeout[0])
    return float(timeout)


def download_file(url: str, dest: str | Path, *, expected_size: int | None = None, sha256: str | None = None,
                  md5: str | None = None, timeout: float | tuple[float, float] = (5, 60), progress: bool = True,
                  session: requests.Session | None = None) -> Path:
    """Download ``url`` to ``dest``; resume ``dest.part``; verify; rename atomically. Returns ``dest``.

    - ``dest`` already present and matching the given size/checksums: nothing is requested.
    - A partial ``dest.part`` is resumed with ``Range: bytes=N-`` (206 -> append; 200 -> restart).
    - A download that does not verify raises DownloadError and its ``.part`` is deleted.
    - Connection problems raise DownloadError (one line, with the offline hint); an interrupted
      transfer keeps ``.part`` so that the next call resumes it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    checks = dict(expected_size=expected_size, sha256=sha256, md5=md5)
    if dest.is_file() and verify_file(dest, **checks) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    connect_timeout = _connect_timeout(timeout)
    _resolve_host(url, connect_timeout)

    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > int(expected_size):
        part.unlink()
        offset = 0
    # identity encoding: byte offsets (Range, Content-Length) then refer to the file itself
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    http = session or requests
    try:
        resp = http.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True)
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"download of {url} failed: {_reason(exc, url, connect_timeout)}. {OFFLINE_HINT}") from exc

    with resp:
        if resp.status_code == 416 and offset:
            # Range not satisfiable: the .part may already be complete (crash before the rename);
            # otherwise it is stale (the file changed on the server): start over without Range.
            if _content_range_total(resp.headers.get("Content-Range", "")) == offset:
                return _finish(url, part, dest, checks)
            resp.close()
            part.unlink(missing_ok=True)
            return download_file(url, dest, timeout=timeout, progress=progress, session=session, **checks)
        if resp.status_code >= 400:
            raise DownloadError(f"download of {url} failed: HTTP {resp.status_code} {one_line(resp.reason or '')}. "
                                "Check the address or import your own scans with: python 01_download_data.py --from DIR")
        mode = "ab"
        if resp.status_code == 206 and offset:
            if _content_range_start(resp.headers.get("Content-Range", "")) != offset:
                resp.close()  # the server resumed somewhere else: start over without Range
                part.unlink(missing_ok=True)
                return download_file(url, dest, timeout=timeout, progress=progress, session=session, **checks)
        else:  # 200: the server ignored the Range header (or none was sent): start over
            mode, offset = "wb", 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else expected_size
        _stream(resp, part, mode, offset, total, url, progress)

    size = part.stat().st_size
    if total is not None and size < int(total):
        raise DownloadError(f"download of {url} interrupted at {size} of {int(total)} bytes; "
                            f"partial file kept at {part}; re-run to resume")
    return _finish(url, part, dest, checks)


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _content_range_total(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _stream(resp: requests.Response, part: Path, mode: str, offset: int, total: int | None, url: str,
            progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name[: -len(".part")], disable=not progress, leave=False)
    try:
        with open(part, mode) as fh:
            try:
                for chunk in _iter_body(resp):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                fh.flush()
                got = fh.tell()
                raise DownloadError(f"download of {url} interrupted at {got} bytes "
                                    f"({_reason(exc, url, 0)}); partial file kept at {part}; re-run to resume") from exc
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        bar.close()


def _iter_body(resp: requests.Response) -> Iterator[bytes]:
    """Body chunks as they arrive. urllib3's ``read1`` hands over every byte received before a dropped
    connection (``iter_content`` would discard the last partial chunk), so a resume loses nothing."""
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2
        yield from (c for c in resp.iter_content(CHUNK) if c)
        return
    while True:
        chunk = read1(CHUNK, decode_content=False)
        if not chunk:
            return
        yield chunk


def _finish(url: str, part: Path, dest: Path, checks: dict) -> Path:
    problem = verify_file(part, **checks)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} is corrupt ({problem}); the partial file was deleted; "
                            "re-run to download again")
    os.replace(part, dest)
    return dest


def download_source(source: Source, folder: str | Path, *, url: str | None = None, progress: bool = True,
                    timeout: float | tuple[float, float] = (5, 60)) -> Path:
    """Download ``source``'s archive into ``folder`` (verified against its pinned size/checksums)."""
    return download_file(url or source.url, Path(folder) / source.filename, expected_size=source.size,
                         sha256=source.sha256, md5=source.md5, timeout=timeout, progress=progress)
