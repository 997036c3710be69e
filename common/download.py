"""Resumable, checked HTTP downloads of dataset files (the raw D4RL HDF5 files), with the standard library only.

A file is fetched from the first source that serves a good copy: streamed to a temporary file next to its
destination (`.NAME.part`) with a progress bar, continued with an HTTP Range request when the connection drops (and by
the next process when this one is killed), then checked (the length the server announced, then `check(path)`, which
raises ValueError saying what is wrong) and only then renamed into place. A file that fails its check is deleted and
the next source is tried. Processes that want the same file wait for the one downloading it.
"""
from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from common.runtime import ExclusiveLock, UserError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60  # without a byte from the server
STALLED_ATTEMPTS = 3  # requests in a row that bring no new byte before a source is given up
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class DownloadError(UserError):
    """No source served a good copy; the message lists what each source answered."""


class _BadFile(Exception):
    """The bytes arrived but are not the file (wrong length, failed check)."""


def download(urls: list[str], destination: Path, check: Callable[[Path], None]) -> str:
    """Put a checked copy of the file at `urls` (tried in order) at `destination`; returns the URL that served it
    ("" when another process finished it meanwhile)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.part")
    lock_path = destination.with_name(f".{destination.name}.lock")
    failures = []
    lock = ExclusiveLock(lock_path, f"the download of {destination.name}", wait=True)
    try:
        if destination.is_file():
            return ""
        for url in urls:
            try:
                _fetch(url, partial)
                try:
                    check(partial)
                except ValueError as error:
                    raise _BadFile(str(error)) from None
            except urllib.error.HTTPError as error:
                failures.append(f"{url}: HTTP {error.code} {error.reason}")
            except NETWORK_ERRORS as error:
                failures.append(f"{url}: {_reason(error)}")
            except _BadFile as error:
                partial.unlink(missing_ok=True)
                failures.append(f"{url}: {error}")
            else:
                os.replace(partial, destination)
                return url
        partial.unlink(missing_ok=True)
        raise DownloadError("; ".join(failures))
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason).strip().splitlines()[0] if str(reason).strip() else type(error).__name__


def _fetch(url: str, partial: Path) -> None:
    """Stream `url` into `partial`, continuing from the bytes already there; retried while the server keeps sending
    new bytes, given up after STALLED_ATTEMPTS requests in a row that brought none."""
    stalled, last_error = 0, None
    while stalled < STALLED_ATTEMPTS:
        before = partial.stat().st_size if partial.exists() else 0
        try:
            total = _request(url, partial, before)
            size = partial.stat().st_size
            if total is None or size == total:
                return
            if size > total:
                raise _BadFile(f"{size} bytes where the server announced {total}")
            last_error = ConnectionError(f"the connection closed after {size} of {total} bytes")
        except NETWORK_ERRORS as error:
            if isinstance(error, urllib.error.HTTPError):
                raise
            last_error = error
        stalled = stalled + 1 if (partial.stat().st_size if partial.exists() else 0) == before else 0
    raise ConnectionError(_reason(last_error))


def _request(url: str, partial: Path, offset: int) -> int | None:
    """One GET from byte `offset` on; returns the file's full length when the server says it."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing after `offset`: complete, or a stale partial file
            full = re.search(r"/(\d+)$", error.headers.get("Content-Range", ""))
            if full and int(full.group(1)) == offset:
                return offset
            partial.unlink(missing_ok=True)
            return _request(url, partial, 0)
        raise
    with response:
        resumed = response.status == 206
        if resumed:
            full = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
            total = int(full.group(1)) if full else None
        else:  # a whole file, from the start
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as handle, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                desc=Path(url).name, mininterval=1.0, leave=False) as bar:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
    return total
