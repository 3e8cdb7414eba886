"""bundle: the CORE eval bundle as a store artifact: fetched, checked, unpacked, sealed.

The source is nanochat's eval_bundle.zip (an http(s):// or file:// URL, or a path to the zip) or an
already unpacked folder. The zip is downloaded with pipeline.fetch's resume and retries and unpacked in
the work directory; only then is it sealed into the store, so a store bundle is always whole.

Its sha256 (the zip's bytes, or a folder's tree digest) is recorded in the manifest either way; a
bundle whose config entry pins `sha256:` must have exactly that one. To pin it:

    python -m pipeline.bundle pin dclm_core      # prints the line to add under core_bundles.dclm_core
"""

import argparse
import shutil
import sys
import zipfile
from pathlib import Path

from pipeline import cli, fetch, plan, store
from pipeline.errors import StageError
from pipeline.fetch import BadBodyError

FIX = "check the core bundle's url (nanochat's eval_bundle.zip)"


def _verify_zip(path):
    if not zipfile.is_zipfile(path):
        raise BadBodyError("not a zip file")
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad:
        raise BadBodyError(f"zip member {bad} is corrupt")
    return {"sha256": store.sha256_file(path)}


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


def pin_advice(name, digest):
    """Where the pin goes, in words a user can follow."""
    return f"`sha256: {digest}` under core_bundles.{name} in the config" if name else \
        f"`sha256: {digest}` in the bundle's entry under core_bundles in the config"


def _pin_mismatch(name, url, digest, pinned):
    field = f"core_bundles.{name}.sha256" if name else "the bundle's sha256"
    return StageError(f"{field}: {url} has sha256 {digest}, which is not the configured {pinned}; if the "
                      f"bundle changed upstream and the new one is wanted, pin it ({pin_advice(name, digest)}), "
                      "else point url at the bundle that was pinned")


def run(spec, inputs, out, work, threads):
    params, settings = spec["params"], spec["settings"]
    url, pinned, name = params["url"], params.get("sha256"), settings.get("name")
    work.mkdir(parents=True, exist_ok=True)
    started = store.now_iso()
    local = fetch.local_path(url)
    if local is not None and local.is_dir():
        root = _bundle_root(local)
        resolved = {"source": "folder", "sha256": tree_digest(root)}
    else:
        info = fetch.fetch_file(url, work / "eval_bundle.zip", _verify_zip, attempts=settings.get("attempts", 5),
                                backoff_s=settings.get("backoff_s", 1.0), fix=FIX, missing_fix=FIX)
        resolved = {"source": "zip", "sha256": info["sha256"]}
    if pinned and resolved["sha256"] != pinned:
        # a whole, valid zip of other bytes: not a transient fault, and nothing of it is worth keeping
        shutil.rmtree(work, ignore_errors=True)
        raise _pin_mismatch(name, url, resolved["sha256"], pinned)
    if resolved["source"] == "zip":
        shutil.rmtree(work / "unpacked", ignore_errors=True)
        root = unpacked(work / "eval_bundle.zip", work / "unpacked")
    files = _files(root)
    resolved.update(files=len(files), pinned=bool(pinned))
    if not root.is_relative_to(work):  # a folder of the user's: seal a copy (seal tidies its source away)
        staging = work / "copy"
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, staging / rel)
        root = staging
    store.seal(spec, files, root, out, resolved=resolved, started_at=started)
    shutil.rmtree(work, ignore_errors=True)
    print(f"bundle: {len(files)} files from {url}, sha256 {resolved['sha256']}" + (
        " (as pinned)" if pinned else
        f"; not pinned: add {pin_advice(name, resolved['sha256'])} to have every later download checked "
        f"against it (`python -m pipeline.bundle pin {name}` prints the line)"), file=sys.stderr)


def pin(name, config_path="config/config.yaml", store_root=None, work_root=None):
    """(sha256, where it came from, the config's pin or None) for core bundle `name`: recorded by the
    bundle stage if it ran, else computed (a zip is fetched to a scratch folder for it). A bundle
    already pinned is checked against its pin."""
    cfg = plan.load_config(config_path)
    bundles = cfg.get("core_bundles", {})
    if name not in bundles:
        raise StageError(f"{config_path}: no core bundle named {name!r} (core_bundles: {', '.join(bundles) or 'none'})")
    url, pinned = bundles[name]["url"], bundles[name].get("sha256")
    sealed = store.store_dir(plan.bundle_spec(cfg, name), store_root or cfg["store_dir"])
    local = fetch.local_path(url)
    if (sealed / store.MANIFEST).exists():  # the stage's own record (for a pinned bundle: it matched)
        digest, source = store.read_manifest(sealed)["resolved"]["sha256"], f"recorded in {sealed / store.MANIFEST}"
    elif local is not None and local.is_dir():
        digest, source = tree_digest(_bundle_root(local)), f"the tree digest of {local}"
    else:
        scratch = Path(work_root or cfg["work_dir"]) / "bundle" / f"pin-{name}"
        try:
            digest = fetch.fetch_file(url, scratch / "eval_bundle.zip", _verify_zip, fix=FIX, missing_fix=FIX)["sha256"]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        source = f"fetched from {url}"
    if pinned and digest != pinned:
        raise _pin_mismatch(name, url, digest, pinned)
    return digest, source, pinned


def _pin_main(argv):
    ap = argparse.ArgumentParser(prog="python -m pipeline.bundle pin",
                                 description="print the config line that pins a CORE bundle's sha256")
    ap.add_argument("name", help="the bundle's name under core_bundles in the config, e.g. dclm_core")
    ap.add_argument("--config", default="config/config.yaml", help="config file (default: %(default)s)")
    ap.add_argument("--store", help="store root (default: the config's store_dir)")
    ap.add_argument("--work", help="scratch root for a bundle not yet in the store (default: the config's work_dir)")
    args = ap.parse_args(argv)
    try:
        digest, source, pinned = pin(args.name, args.config, args.store, args.work)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if pinned:
        print(f"core_bundles.{args.name} is pinned, and its sha256 matches ({source})", file=sys.stderr)
    else:
        print(f"# add to core_bundles.{args.name} in {args.config} (sha256 {source}):", file=sys.stderr)
    print(f"    sha256: {digest}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pin"]:
        return _pin_main(argv[1:])
    ap = cli.parser("bundle", __doc__.splitlines()[0])
    ap.epilog = "`python -m pipeline.bundle pin NAME` prints the config line that pins bundle NAME's sha256."
    return cli.run_stage("bundle", ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())
