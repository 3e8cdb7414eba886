"""download: fetch a block of nanochat-format parquet shards, verified, resumable, in parallel.

Each shard is streamed to `<work>/shard_NNNNN.parquet.part` (resumed with an HTTP Range request after
a kill or a dropped connection), checked to be a parquet file with a `text` column, and only then
renamed to its final name. Transient failures (connection errors, timeouts, 5xx, a body cut short,
bytes that are not parquet) are retried with exponential backoff; a shard that stays bad fails the
stage with the URL and the reason, and no file under a final name is ever partial.

HuggingFace's `resolve/main` serves whatever the dataset's main branch holds that day, so the commit
each shard came from (the `X-Repo-Commit` the server answered with) is recorded in the manifest, per
shard and for the block, and one block never holds shards of two commits: a download resumed after
the dataset changed upstream is refused. A dataset's `revision:` pins the commit: it replaces `main`
in the URL and is part of the download key. A server that does not say (a mirror, a local folder) is
recorded as unknown (null).
"""

import os
import re
import shutil
import sys
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipeline import cli, fetch, keylock, plan, shards, store
from pipeline.errors import StageError
from pipeline.fetch import BadBodyError

# What to check when a source keeps serving bytes that are not a shard, or no shard at all.
BAD_BODY_FIX = "check that the dataset's base_url serves nanochat-format parquet shards"
MISSING_FIX = "check the dataset's base_url and revision, and that the shard index exists"


def dataset_url(base_url, revision=None):
    """`base_url` with HuggingFace's `/resolve/<ref>` pointing at `revision`; a URL without that part
    (a mirror, a folder) is used as it is, the mirror being taken to hold that revision."""
    if not revision:
        return base_url
    head, sep, tail = base_url.rstrip("/").rpartition("/resolve/")
    if not sep:
        return base_url
    _, slash, rest = tail.partition("/")  # a ref, then maybe a folder inside the repo
    return f"{head}/resolve/{urllib.parse.quote(revision, safe='')}{slash}{rest}"


def shard_url(base_url, index, revision=None):
    return f"{dataset_url(base_url, revision).rstrip('/')}/{shards.shard_name(index)}"


def is_commit(revision):
    """A full commit hash names one set of bytes; a branch or tag may move."""
    return bool(revision) and re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def verify_shard(path, sha256=None):
    """Open as parquet and decode every row group of `text` (a string column of valid UTF-8); what we
    learnt about the shard. With `sha256`, the bytes must also be exactly those recorded earlier."""
    try:
        info = shards.check(path)
    except shards.ShardProblem as e:
        raise BadBodyError(f"not a valid nanochat shard: {e}") from e
    if sha256 is not None and (digest := store.sha256_file(path)) != sha256:
        raise BadBodyError(f"sha256 {digest} is not the recorded {sha256}")
    return info


def fetch_shard(url, dest, sha256=None, **kw):
    return fetch.fetch_file(url, dest, lambda path: verify_shard(path, sha256), fix=BAD_BODY_FIX,
                            missing_fix=MISSING_FIX, **kw)


class BlockRevision:
    """The one commit a block's shards come from: the first shard whose server says which sets it,
    and a shard of another commit is refused, naming both and the fix. Thread-safe."""

    def __init__(self, spec, work):
        params = spec["params"]
        self.dataset, self.pinned, self.work = params["dataset"], params.get("revision"), work
        self.where = f"download of {self.dataset} shards {params['shards'][0]}-{params['shards'][-1]}"
        self.lock = threading.Lock()
        self.first = None  # (commit, shard name, fetched in an earlier run)

    @property
    def commit(self):
        return self.first and self.first[0]

    def check(self, name, commit, earlier=False):
        if commit is None:
            return  # the server did not say (a mirror, a local file): nothing to compare
        if is_commit(self.pinned) and commit != self.pinned:
            raise StageError(f"{self.where}: the server answered {name} with commit {commit}, not the pinned "
                             f"revision {self.pinned} (datasets.{self.dataset}.revision in the config); base_url "
                             f"must serve that revision (HuggingFace's .../resolve/main, or a mirror of {self.pinned})")
        with self.lock:
            if self.first is None:
                self.first = (commit, name, earlier)
                return
        first, first_name, first_earlier = self.first
        if commit == first:
            return

        def said(shard, sha, before):
            return (f"{shard}, fetched earlier into {self.work}, came from commit {sha}" if before
                    else f"the server now serves {shard} from commit {sha}")
        raise StageError(f"{self.where}: {said(name, commit, earlier)}, but {said(first_name, first, first_earlier)}; "
                         "one download key must not hold shards of two revisions (the dataset changed upstream). "
                         f"Pin one in the config, e.g. `revision: {first}` under datasets.{self.dataset} (a new "
                         f"key: the block is fetched again from that commit), or delete {self.work} to fetch the "
                         f"whole block again from {commit}")


def reuse_unpinned(spec, out, work):
    """Pinning a revision re-keys a block. If the block was downloaded under its unpinned key (a sibling
    of `out` in the store) and that manifest records the very commit now pinned, its shards are those
    bytes: link them into the work directory rather than fetch them again. Returns (that key, the names
    reused), or (None, [])."""
    pinned = spec["params"].get("revision")
    if not is_commit(pinned):
        return None, []
    unpinned = {k: v for k, v in spec["params"].items() if k != "revision"}
    earlier = Path(out).parent / plan.make_spec("download", unpinned)["key"]
    if not (earlier / store.MANIFEST).is_file():
        return None, []
    manifest = store.read_manifest(earlier)
    if manifest["resolved"].get("revision") != pinned:
        return None, []
    reused = []
    for name, record in sorted(manifest["outputs"].items()):
        dest = work / name
        if dest.exists() or store.mismatch(earlier / name, record) is not None:
            continue  # already here, or damaged there: fetched as usual
        fetch.record_revision(dest, pinned)  # before the file: a shard in the work dir always has its commit
        store.link_or_copy(earlier / name, dest)
        reused.append(name)
    if reused:
        print(f"{earlier}: {len(reused)} shards of commit {pinned} reused, not fetched again", file=sys.stderr)
    return earlier.name, reused


def run(spec, inputs, out, work, threads):
    params, settings = spec["params"], spec["settings"]
    work.mkdir(parents=True, exist_ok=True)
    started = store.now_iso()
    names = [shards.shard_name(i) for i in params["shards"]]
    reused_from, reused = reuse_unpinned(spec, out, work)
    revision = BlockRevision(spec, work)
    for name in names:  # shards of an earlier, killed run set the block's commit before any new one is fetched
        if (work / name).exists():
            revision.check(name, fetch.served_revision(work / name), earlier=True)
    lock = threading.Lock()
    bar = tqdm(total=len(names), unit="shard", desc=f"download {params['dataset']}", file=sys.stderr)
    nbytes = [0]

    def progress(n):
        with lock:
            nbytes[0] += n
            bar.set_postfix_str(f"{nbytes[0] / 1e6:.0f} MB")

    def one(index):
        name = shards.shard_name(index)
        dest = work / name
        url = shard_url(settings["base_url"], index, params.get("revision"))
        if dest.exists():  # renamed into place after verification; checked again, as the disk may have lost it
            try:
                info = {"url": url, "resumed": True, **verify_shard(dest), "revision": fetch.served_revision(dest)}
            except BadBodyError as e:
                print(f"{dest}: damaged since it was downloaded ({e}); fetching it again", file=sys.stderr)
                dest.unlink()
        if not dest.exists():
            info = fetch_shard(url, dest, attempts=settings["attempts"], backoff_s=settings["backoff_s"],
                               timeout=settings["timeout_s"], progress=progress,
                               accept_revision=lambda commit: revision.check(name, commit))
            # a resumed .part may hold the bytes of an answer before this one: its own commit counts
            revision.check(name, info["revision"])
        bar.update(1)
        return name, info

    try:
        # I/O bound: parallel connections, not cores, decide the speed
        with ThreadPoolExecutor(max_workers=min(settings["max_parallel"], len(names))) as pool:
            fetched = dict(pool.map(one, params["shards"]))
    finally:
        bar.close()
    # a base_url changed halfway through a block (HuggingFace, then a mirror): some shards name their
    # commit, some cannot; the block's commit is then said and recorded as unconfirmed for those
    unconfirmed = sorted(name for name, info in fetched.items() if info["revision"] is None) if revision.commit else []
    print(f"download {params['dataset']} shards {names[0]}..{names[-1]}: " + (
        f"revision {revision.commit}" if revision.commit else
        "revision unknown (the server did not say which commit it served: a mirror or a local folder)") + (
        f"; unconfirmed for {', '.join(unconfirmed)}, whose server did not say (a base_url changed mid-block)"
        if unconfirmed else ""), file=sys.stderr)
    resolved = {"shards": fetched, "revision": revision.commit}
    if unconfirmed:
        resolved["revision_unconfirmed"] = unconfirmed
    if reused:
        resolved["reused"] = {"from_key": reused_from, "shards": reused}
    store.seal(spec, names, work, out, resolved=resolved, started_at=started)


def one_commit(manifests, where):
    """The one dataset commit that the blocks behind `manifests` (download or pretokenize manifests, which
    carry the commit on) come from, None when no server said. Blocks of two commits are refused: each
    block is of one commit, but blocks fetched on different days may not be, and a row trains and
    validates on one version of its dataset."""
    blocks = {}
    for m in manifests:
        if m["resolved"].get("revision"):
            blocks.setdefault(m["resolved"]["revision"], []).append(f"{m['stage']}/{m['key']}")
    if len(blocks) <= 1:
        return next(iter(blocks), None)
    dataset = next(m["resolved"].get("dataset") or m["params"].get("dataset") for m in manifests)
    listing = "; ".join(f"commit {commit}: {', '.join(names)}" for commit, names in blocks.items())
    newest = list(blocks)[-1]
    raise StageError(f"{where}: its blocks come from {len(blocks)} commits of dataset {dataset!r} ({listing}); a row "
                     f"trains and validates on one. Pin one in the config, e.g. `revision: {newest}` under "
                     f"datasets.{dataset} (blocks already downloaded at that commit are reused, the others are "
                     "fetched again from it), then rerun")


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


def repair(directory, work_root, *, attempts=None, backoff_s=None, timeout=None):
    """Fetch again every shard of a finished download directory that does not match its manifest; the
    new bytes must be exactly the recorded ones. The manifest stays as it is: once each bad file is
    replaced (atomically) the directory is what it records again. Held under the key's lock in
    `work_root`, as the stage's runs are: two repairs (or a repair and a run) never share the scratch.
    Returns the names fetched."""
    directory = Path(directory)
    manifest = store.read_manifest(directory)
    if manifest.get("stage") != "download":
        raise StageError(f"{directory}: a {manifest.get('stage')} directory; --repair refetches download "
                         "directories only (delete this one and rerun its Snakemake target)")
    with keylock.held(work_root, f"download-{manifest['key']}"):
        return _refetch(directory, manifest, attempts, backoff_s, timeout)


def _refetch(directory, manifest, attempts, backoff_s, timeout):
    settings = manifest["settings"]
    # the commit the block came from: its bytes are still there after main has moved on
    revision = manifest["resolved"].get("revision") or manifest["params"].get("revision")
    scratch = directory.with_name(f".{directory.name}.repair")  # same filesystem: the rename is atomic
    scratch.mkdir(exist_ok=True)
    fetched = []
    for name, rec in sorted(manifest["outputs"].items()):
        path = directory / name
        if store.mismatch(path, rec) is None:
            continue
        url = shard_url(settings["base_url"], int(name.removeprefix("shard_").removesuffix(".parquet")), revision)
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
        if args.repair:  # under the lock the stage's runs hold, in their work root
            fetched = repair(args.repair, cli.roots(args)[1])
            print(f"{args.repair}: " + (f"fetched {', '.join(fetched)} again" if fetched else "verifies; "
                                        "nothing to fetch"), file=sys.stderr)
            return []
        if not (args.dataset and args.shards):
            ap.error("give --spec, --row, --repair, or --dataset with --shards")
        cfg = plan.load_config(args.config)
        if args.dataset not in cfg["datasets"]:
            raise StageError(f"{args.config}: no dataset named {args.dataset!r} "
                             f"(datasets: {', '.join(cfg['datasets'])})")
        indices, last = _parse_range(args.shards), cfg["datasets"][args.dataset]["val_shard"]
        if indices[-1] > last:
            raise StageError(f"--shards {args.shards}: dataset {args.dataset!r} has shards 0..{last} "
                             f"({last} is the validation shard); shard {indices[-1]} is past its end")
        spec = plan.download_spec(cfg, args.dataset, indices)
        if args.base_url:
            spec["settings"]["base_url"] = args.base_url
        return [spec]

    return cli.run_stage("download", ap, run, argv, specs_from_args)


if __name__ == "__main__":
    sys.exit(main())
