"""fetch: one file from an http(s):// URL, a file:// URL or a local path; resumable, retried, verified.

The download and bundle stages both fetch through here. The bytes go to `<dest>.part` (resumed with
an HTTP Range request after a kill or a dropped connection) and get the final name only once
`verify` accepts them. Transient failures (connection errors, timeouts, 5xx, a body cut short,
bytes that fail verification) are retried with exponential backoff.

HuggingFace answers a `resolve/<revision>/<file>` request with the commit it served, in the
`X-Repo-Commit` header (on the redirect to its CDN, not on the CDN's answer). That commit is kept
beside the file in `<dest>.source.json`: a `.part` is only continued from the commit it began with,
and a caller can tell later which commit a finished file came from. A server that does not say (a
plain mirror) and a local file give None: unknown.
"""

import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

import requests

from pipeline import store
from pipeline.errors import StageError

CHUNK = 1 << 16  # small enough that a dropped connection keeps most of what arrived
REVISION_HEADER = "X-Repo-Commit"


class TransientError(Exception):
    """Worth another attempt: the server or the network may recover."""


class BadBodyError(TransientError):
    """The bytes arrived but are not the file: start the next attempt from zero."""


def local_path(url):
    """A local source: file:// URL or a plain path (relative to the working directory); None for http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.netloc + parsed.path))
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # a plain or a Windows path
        return Path(url)
    return None


def _source_file(dest):
    return dest.with_name(dest.name + ".source.json")


def served_revision(dest):
    """The commit the bytes of `dest` (or of its `.part`) came from, as the server said; None if unknown."""
    try:
        return json.loads(_source_file(dest).read_text()).get("revision")
    except (OSError, ValueError):  # never recorded (a file fetched before this was kept), or cut by a kill
        return None


def record_revision(dest, revision):
    """Say that the bytes of `dest` (or of its `.part`) came from commit `revision` (None: unknown)."""
    store.write_json(_source_file(dest), {"revision": revision})


def _revision_of(response):
    """X-Repo-Commit of the first response that has it: HuggingFace sends it on the redirect."""
    for r in (*response.history, response):
        if REVISION_HEADER in r.headers:
            return r.headers[REVISION_HEADER]
    return None


def _fetch_local(src, dest, part, progress, accept_revision):
    if not src.is_file():
        raise StageError(f"{src}: no such file (check the URL or path in config/config.yaml)")
    accept_revision(None)
    have = part.stat().st_size if part.exists() else 0
    if have and served_revision(dest) is not None:  # begun from a server: its bytes and ours are not one file
        part.unlink()
        have = 0
    if not have:
        record_revision(dest, None)
    with open(src, "rb") as fin, open(part, "ab") as fout:
        fin.seek(have)
        while block := fin.read(CHUNK):
            fout.write(block)
            progress(len(block))


def _fetch_http(url, dest, part, progress, timeout, accept_revision, missing_fix):
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if r.status_code == 416 and have:  # the .part already holds the whole body (its commit is recorded)
                return
            if r.status_code >= 500 or r.status_code in (408, 429):
                raise TransientError(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise StageError(f"{url}: HTTP {r.status_code} {r.reason} ({missing_fix})")
            revision = _revision_of(r)
            accept_revision(revision)  # the caller may refuse this commit before a byte is written
            if r.status_code == 206:
                began = served_revision(dest)
                if began != revision:  # appending would splice two versions of the file into one
                    raise BadBodyError(f"the partial file came from commit {began or 'unknown'} but the server "
                                       f"now serves {revision or 'unknown'}; starting it over")
                mode = "ab"
            else:  # 200: a fresh start, or the server ignored Range
                mode = "wb"
                record_revision(dest, revision)
            expected = r.headers.get("Content-Length")
            got = 0
            with open(part, mode) as f:
                for block in r.iter_content(CHUNK):
                    f.write(block)
                    got += len(block)
                    progress(len(block))
            if expected is not None and got != int(expected):
                raise TransientError(f"body cut short: {got} of {expected} bytes")
    except requests.exceptions.ChunkedEncodingError as e:
        raise TransientError(f"body cut short ({e.__class__.__name__})") from e
    except (requests.ConnectionError, requests.Timeout) as e:
        raise TransientError(f"{e.__class__.__name__}: {e}") from e


def fetch_file(url, dest, verify, *, attempts=5, backoff_s=1.0, timeout=60, progress=lambda n: None,
               accept_revision=lambda revision: None, fix="check that the URL serves the file it should",
               missing_fix="check the URL"):
    """Download `url` to `dest`; `verify(path)` checks the bytes (raising BadBodyError) before they
    get the final name and returns what it learnt. A partial `.part` file is resumed, never trusted.
    `accept_revision(commit)` sees the commit the server says it serves (None: it does not say) before
    the body is read, and may raise to refuse it. `fix` says what to check when the bytes stay bad,
    `missing_fix` what to check when the server answers 4xx (no such file or revision).
    Returns {url, **verify's answer, attempts, revision}."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    local = local_path(url)
    for attempt in range(1, attempts + 1):
        try:
            if local is not None:
                _fetch_local(local, dest, part, progress, accept_revision)
            else:
                _fetch_http(url, dest, part, progress, timeout, accept_revision, missing_fix)
            info = verify(part)
            os.replace(part, dest)
            return {"url": url, **info, "attempts": attempt, "revision": served_revision(dest)}
        except TransientError as e:
            # A bad body is discarded; a cut-short one is kept so the next try resumes it.
            if isinstance(e, BadBodyError):
                part.unlink(missing_ok=True)
                if not dest.exists():  # the record described those bytes only
                    _source_file(dest).unlink(missing_ok=True)
            # a local file does not change between attempts: waiting for it to recover is pointless
            if attempt == attempts or (local is not None and isinstance(e, BadBodyError)):
                hint = fix if isinstance(e, BadBodyError) else "rerun to resume; check the network and the URL"
                raise StageError(f"{url}: failed after {attempt} attempt{'s' * (attempt > 1)}: {e} ({hint})") from e
            wait = backoff_s * 2 ** (attempt - 1)
            print(f"{url}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:.1f}s", file=sys.stderr)
            time.sleep(wait)
