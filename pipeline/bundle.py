"""bundle: the CORE eval bundle as a store artifact: fetched, checked, unpacked, sealed.

The source is nanochat's eval_bundle.zip (an http(s):// or file:// URL, or a path to the zip) or an
already unpacked folder. The zip is downloaded with pipeline.download's resume and retries, checked
against the config's `sha256` when one is given (its sha256 is recorded either way), and unpacked in
the work directory; only then is it sealed into the store, so a store bundle is always whole.
"""

import shutil
import sys
import zipfile
from pathlib import Path

from pipeline import cli, download, store
from pipeline.store import StageError


def _verify_zip(expected_sha256):
    def verify(path):
        if not zipfile.is_zipfile(path):
            raise download.BadBodyError("not a zip file")
        digest = store.sha256_file(path)
        if expected_sha256 and digest != expected_sha256:
            raise download.BadBodyError(f"sha256 {digest} is not the configured {expected_sha256}")
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad:
            raise download.BadBodyError(f"zip member {bad} is corrupt")
        return {"sha256": digest}
    return verify


def _bundle_root(folder):
    """The folder holding core.yaml: the top level, or the single folder the zip wraps it in."""
    hits = sorted(Path(folder).glob("core.yaml")) or sorted(Path(folder).glob("*/core.yaml"))
    if not hits:
        raise StageError(f"no core.yaml in the eval bundle unpacked at {folder} (the bundle's url must be "
                         "nanochat's eval_bundle.zip, or a folder holding core.yaml, eval_meta_data.csv, eval_data/)")
    return hits[0].parent


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def tree_digest(root):
    """sha256 over every file's relative path and sha256: a folder bundle's fingerprint."""
    lines = "".join(f"{name}\t{store.sha256_file(Path(root) / name)}\n" for name in _files(Path(root)))
    return store.sha256_bytes(lines.encode())


def digest(path):
    """A bundle's sha256 as the bundle stage records it: the zip's bytes, or a folder's tree_digest."""
    path = Path(path)
    return tree_digest(_bundle_root(path)) if path.is_dir() else store.sha256_file(path)


def unpacked(path, into):
    """An unpacked bundle folder for `path`: the folder itself, or a zip extracted under `into`."""
    path = Path(path)
    if path.is_dir():
        return _bundle_root(path)
    if not zipfile.is_zipfile(path):
        raise StageError(f"{path}: neither an eval bundle folder nor a zip of one")
    with zipfile.ZipFile(path) as z:
        z.extractall(into)
    return _bundle_root(into)


def run(spec, inputs, out, work, threads):
    params, settings = spec["params"], spec["settings"]
    url = params["url"]
    work.mkdir(parents=True, exist_ok=True)
    started = store.now_iso()
    local = download._local_path(url)
    if local is not None and local.is_dir():
        root = _bundle_root(local)
        resolved = {"source": "folder", "sha256": tree_digest(root)}
    else:
        info = download.fetch(url, work / "eval_bundle.zip", _verify_zip(params.get("sha256")),
                              attempts=settings.get("attempts", 5), backoff_s=settings.get("backoff_s", 1.0),
                              fix="check the core bundle's url (nanochat's eval_bundle.zip) and its sha256")
        shutil.rmtree(work / "unpacked", ignore_errors=True)
        root = unpacked(work / "eval_bundle.zip", work / "unpacked")
        resolved = {"source": "zip", "sha256": info["sha256"]}
    files = _files(root)
    resolved["files"] = len(files)
    if not root.is_relative_to(work):  # a folder of the user's: seal a copy (seal tidies its source away)
        staging = work / "copy"
        for name in files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, staging / name)
        root = staging
    store.seal(spec, files, root, out, resolved=resolved, started_at=started)
    shutil.rmtree(work, ignore_errors=True)
    print(f"bundle: {len(files)} files from {url}", file=sys.stderr)


def main(argv=None):
    return cli.run_stage("bundle", cli.parser("bundle", __doc__.splitlines()[0]), run, argv)


if __name__ == "__main__":
    sys.exit(main())
