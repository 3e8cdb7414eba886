"""download: fetch a block of nanochat-format parquet shards, verified, resumable, in parallel.

Each shard is streamed to `<work>/shard_NNNNN.parquet.part` (resumed with an HTTP Range request after
a kill or a dropped connection), checked to be a parquet file with a `text` column, and only then
renamed to its final name. Transient failures (connection errors, timeouts, 5xx, a body cut short,
bytes that are not parquet) are retried with exponential backoff; a shard that stays bad fails the
stage with the URL and the reason, and no file under a final name is ever partial.
"""

import os
import shutil
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm import tqdm

from pipeline import cli, plan, store
from pipeline.store import StageError

CHUNK = 1 << 16  # small enough that a dropped connection keeps most of what arrived


def shard_name(index):
    return f"shard_{index:05d}.parquet"


class TransientError(Exception):
    """Worth another attempt: the server or the network may recover."""


class BadBodyError(TransientError):
    """The bytes arrived but are not a shard: start the next attempt from zero."""


# What to check when a source keeps serving bytes that are not a shard.
BAD_BODY_FIX = "check that the dataset's base_url serves nanochat-format parquet shards"


def shard_url(base_url, index):
    return f"{base_url.rstrip('/')}/{shard_name(index)}"


def _local_path(url):
    """A local source: file:// URL or a plain path (relative to the working directory)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.netloc + parsed.path))
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # a plain or a Windows path
        return Path(url)
    return None


def _fetch_local(src, part, progress):
    if not src.is_file():
        raise StageError(f"{src}: no such file (check the URL or path in config/config.yaml)")
    have = part.stat().st_size if part.exists() else 0
    with open(src, "rb") as fin, open(part, "ab") as fout:
        fin.seek(have)
        while block := fin.read(CHUNK):
            fout.write(block)
            progress(len(block))


def _fetch_http(url, part, progress, timeout):
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if r.status_code == 416 and have:  # the .part already holds the whole body
                return
            if r.status_code >= 500 or r.status_code in (408, 429):
                raise TransientError(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise StageError(f"{url}: HTTP {r.status_code} {r.reason} (check the dataset's base_url "
                                 "and that the shard index exists)")
            mode = "ab" if r.status_code == 206 else "wb"  # 200: the server ignored Range, start over
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


def text_column_problem(pf):
    """What keeps a parquet file (a pq.ParquetFile) from being a nanochat shard, by its schema; None if nothing."""
    names = pf.schema_arrow.names
    if "text" not in names:
        return f"no 'text' column (columns: {', '.join(names) or 'none'})"
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"the 'text' column holds {kind}, not strings"
    return None


def verify_shard(path, sha256=None):
    """Open as parquet and decode every row group of `text` (a string column of valid UTF-8); what we
    learnt about the shard. With `sha256`, the bytes must also be exactly those recorded earlier."""
    try:
        pf = pq.ParquetFile(path)
        if problem := text_column_problem(pf):
            raise ValueError(problem)
        for i in range(pf.num_row_groups):
            column = pf.read_row_group(i, columns=["text"]).column("text")
            try:  # full validation checks the UTF-8 that a plain read lets through
                column.validate(full=True)
            except pa.ArrowInvalid as e:
                raise ValueError(f"row group {i} of 'text' is not valid UTF-8 ({e})") from e
    except Exception as e:  # pyarrow raises several types for bytes that are not parquet
        raise BadBodyError(f"not a valid nanochat shard: {e}") from e
    if sha256 is not None and (digest := store.sha256_file(path)) != sha256:
        raise BadBodyError(f"sha256 {digest} is not the recorded {sha256}")
    return {"num_rows": pf.metadata.num_rows, "num_row_groups": pf.num_row_groups}


def fetch_shard(url, dest, sha256=None, **kw):
    return fetch(url, dest, lambda path: verify_shard(path, sha256), fix=BAD_BODY_FIX, **kw)


def fetch(url, dest, verify, *, attempts=5, backoff_s=1.0, timeout=60, progress=lambda n: None,
          fix="check that the URL serves the file it should"):
    """Download `url` to `dest`; `verify(path)` checks the bytes (raising BadBodyError) before they
    get the final name. A partial `.part` file is resumed, never trusted. `fix` says what to check
    when the bytes stay bad."""
    part = dest.with_name(dest.name + ".part")
    local = _local_path(url)
    for attempt in range(1, attempts + 1):
        try:
            if local is not None:
                _fetch_local(local, part, progress)
            else:
                _fetch_http(url, part, progress, timeout)
            info = verify(part)
            os.replace(part, dest)
            return {"url": url, **info, "attempts": attempt}
        except TransientError as e:
            # A bad body is discarded; a cut-short one is kept so the next try resumes it.
            if isinstance(e, BadBodyError):
                part.unlink(missing_ok=True)
            # a local file does not change between attempts: waiting for it to recover is pointless
            if attempt == attempts or (local is not None and isinstance(e, BadBodyError)):
                hint = fix if isinstance(e, BadBodyError) else "rerun to resume; check the network and the URL"
                raise StageError(f"{url}: failed after {attempt} attempt{'s' * (attempt > 1)}: {e} ({hint})") from e
            wait = backoff_s * 2 ** (attempt - 1)
            print(f"{url}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:.1f}s",
                  file=sys.stderr)
            time.sleep(wait)


def run(spec, inputs, out, work, threads):
    params, settings = spec["params"], spec["settings"]
    work.mkdir(parents=True, exist_ok=True)
    started = store.now_iso()
    names = [shard_name(i) for i in params["shards"]]
    lock = threading.Lock()
    bar = tqdm(total=len(names), unit="shard", desc=f"download {params['dataset']}", file=sys.stderr)
    nbytes = [0]

    def progress(n):
        with lock:
            nbytes[0] += n
            bar.set_postfix_str(f"{nbytes[0] / 1e6:.0f} MB")

    def one(index):
        dest = work / shard_name(index)
        url = shard_url(settings["base_url"], index)
        if dest.exists():  # renamed into place after verification; checked again, as the disk may have lost it
            try:
                info = {"url": url, "resumed": True, **verify_shard(dest)}
            except BadBodyError as e:
                print(f"{dest}: damaged since it was downloaded ({e}); fetching it again", file=sys.stderr)
                dest.unlink()
        if not dest.exists():
            info = fetch_shard(url, dest, attempts=settings["attempts"], backoff_s=settings["backoff_s"],
                               timeout=settings["timeout_s"], progress=progress)
        bar.update(1)
        return shard_name(index), info

    try:
        # I/O bound: parallel connections, not cores, decide the speed
        with ThreadPoolExecutor(max_workers=min(settings["max_parallel"], len(names))) as pool:
            shards = dict(pool.map(one, params["shards"]))
    finally:
        bar.close()
    store.seal(spec, names, work, out, resolved={"shards": shards}, started_at=started)


def check_intact(directory):
    """Refuse a download directory whose shards are not the bytes its manifest records (edited, or
    damaged on disk since), naming the file and the command that refetches it."""
    directory = Path(directory)
    if not (directory / store.MANIFEST).exists():
        return  # not a store directory (a folder given by hand): nothing was recorded to compare with
    problems = store.verify(directory)
    if problems:
        raise StageError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                         + f"; `python -m pipeline.download --repair {directory}` fetches the damaged shards again")


def repair(directory, *, attempts=None, backoff_s=None, timeout=None):
    """Fetch again every shard of a finished download directory that does not match its manifest; the
    new bytes must be exactly the recorded ones. The manifest stays as it is: once each bad file is
    replaced (atomically) the directory is what it records again. Returns the names fetched."""
    directory = Path(directory)
    manifest = store.read_manifest(directory)
    if manifest.get("stage") != "download":
        raise StageError(f"{directory}: a {manifest.get('stage')} directory; --repair refetches download "
                         "directories only (delete this one and rerun its Snakemake target)")
    settings = manifest["settings"]
    scratch = directory.with_name(f".{directory.name}.repair")  # same filesystem: the rename is atomic
    scratch.mkdir(exist_ok=True)
    fetched = []
    for name, rec in sorted(manifest["outputs"].items()):
        path = directory / name
        if store.mismatch(path, rec) is None:
            continue
        url = shard_url(settings["base_url"], int(name.removeprefix("shard_").removesuffix(".parquet")))
        fetch_shard(url, scratch / name, sha256=rec["sha256"], attempts=attempts or settings["attempts"],
                    backoff_s=settings["backoff_s"] if backoff_s is None else backoff_s,
                    timeout=timeout or settings["timeout_s"])
        os.replace(scratch / name, path)
        fetched.append(name)
        print(f"{path}: fetched again from {url}; matches the manifest", file=sys.stderr)
    shutil.rmtree(scratch, ignore_errors=True)
    return fetched


def _parse_range(text):
    """'0-31' or '0,5,9' or '6542' -> sorted list of shard indices."""
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise StageError(f"--shards {text!r}: {part!r} is not a shard index or a range like 0-9") from None
    if not out:
        raise StageError(f"--shards {text!r} names no shard; give a range like 0-9 (low end first)")
    return sorted(out)


def main(argv=None):
    ap = cli.parser("download", __doc__.splitlines()[0])
    ap.add_argument("--dataset", help="without --spec/--row: a dataset name from the config (e.g. climbmix)")
    ap.add_argument("--shards", help="with --dataset: shard indices, e.g. 0-9 or 6542")
    ap.add_argument("--base-url", help="override the dataset's base URL (http(s)://, file:// or a path)")
    ap.add_argument("--repair", metavar="DIR", help="fetch again the shards of a finished download directory "
                                                   "that no longer match its manifest")

    def specs_from_args(args):
        if args.repair:
            fetched = repair(args.repair)
            print(f"{args.repair}: " + (f"fetched {', '.join(fetched)} again" if fetched else "verifies; "
                                        "nothing to fetch"), file=sys.stderr)
            return []
        if not (args.dataset and args.shards):
            ap.error("give --spec, --row, --repair, or --dataset with --shards")
        cfg = plan.load_config(args.config)
        if args.dataset not in cfg["datasets"]:
            raise StageError(f"{args.config}: no dataset named {args.dataset!r} "
                             f"(datasets: {', '.join(cfg['datasets'])})")
        shards, last = _parse_range(args.shards), cfg["datasets"][args.dataset]["val_shard"]
        if shards[-1] > last:
            raise StageError(f"--shards {args.shards}: dataset {args.dataset!r} has shards 0..{last} "
                             f"({last} is the validation shard); shard {shards[-1]} is past its end")
        spec = plan.download_spec(cfg, args.dataset, shards)
        if args.base_url:
            spec["settings"]["base_url"] = args.base_url
        return [spec]

    return cli.run_stage("download", ap, run, argv, specs_from_args)


if __name__ == "__main__":
    sys.exit(main())
