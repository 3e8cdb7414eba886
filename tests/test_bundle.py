"""The CORE bundle's sha256: recorded at the first download, pinned in the config with one command,
checked on every download after that (a zip over the loopback server, and a folder)."""

import copy
import json
import zipfile

import pytest
import yaml

from helpers import CORE_MINI, ShardServer
from pipeline import bundle, config, plan, store
from pipeline.errors import StageError


def zip_bundle(folder, dest, extra=None):
    """`folder` zipped as nanochat ships eval_bundle.zip (everything under eval_bundle/)."""
    with zipfile.ZipFile(dest, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"eval_bundle/{path.relative_to(folder)}")
        if extra:
            z.writestr("eval_bundle/NOTE.txt", extra)
    return dest


@pytest.fixture
def served(tmp_path):
    """A loopback server with the mini bundle as eval_bundle.zip, and the zip's sha256."""
    root = tmp_path / "served"
    root.mkdir()
    zipped = zip_bundle(CORE_MINI, root / "eval_bundle.zip")
    with ShardServer(root) as server:
        server.zip_url = f"{server.url}/eval_bundle.zip"
        server.sha256 = store.sha256_file(zipped)
        yield server


def dclm(smoke_config, url, sha256=None):
    cfg = copy.deepcopy(smoke_config)
    cfg["core_bundles"]["dclm_core"] = {"url": url, **({"sha256": sha256} if sha256 else {})}
    return config.check(cfg)


def spec_of(cfg, name="dclm_core"):
    spec = plan.bundle_spec(cfg, name)
    spec["settings"].update(attempts=2, backoff_s=0.01)
    return spec


def resolved(out):
    return json.loads((out / "manifest.json").read_text())["resolved"]


def test_the_sha256_is_recorded_at_first_download_with_the_line_that_pins_it(served, smoke_config, tmp_path,
                                                                               capsys):
    spec = spec_of(dclm(smoke_config, served.zip_url))
    assert spec["params"] == {"url": served.zip_url}
    bundle.run(spec, [], tmp_path / "out", tmp_path / "work", 1)
    got = resolved(tmp_path / "out")
    assert got["sha256"] == served.sha256 and got["source"] == "zip" and got["pinned"] is False
    assert f"not pinned: add `sha256: {served.sha256}` under core_bundles.dclm_core in the config" in \
        capsys.readouterr().err


def test_a_pinned_bundle_that_matches_is_sealed_under_its_own_key(served, smoke_config, tmp_path):
    unpinned, pinned = spec_of(dclm(smoke_config, served.zip_url)), spec_of(dclm(smoke_config, served.zip_url,
                                                                                  served.sha256))
    assert pinned["params"]["sha256"] == served.sha256 and pinned["key"] != unpinned["key"]
    bundle.run(pinned, [], tmp_path / "out", tmp_path / "work", 1)
    assert resolved(tmp_path / "out")["pinned"] is True
    assert store.verify(tmp_path / "out") == []


@pytest.mark.bad_input
def test_a_pinned_bundle_of_other_bytes_is_refused_naming_the_field_and_the_fix(served, smoke_config, tmp_path,
                                                                               capsys):
    # upstream replaced the zip: same url, a new file in it
    zip_bundle(CORE_MINI, served.root / "eval_bundle.zip", extra="a task added upstream")
    new = store.sha256_file(served.root / "eval_bundle.zip")
    spec = spec_of(dclm(smoke_config, served.zip_url, served.sha256))
    argv = ["--spec", json.dumps(spec), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert bundle.main(argv) == 2
    err = capsys.readouterr().err
    msg = err[err.index("error: "):].strip()
    assert "Traceback" not in err and "\n" not in msg
    assert msg.startswith(f"error: core_bundles.dclm_core.sha256: {served.zip_url} has sha256 {new}, which is not "
                          f"the configured {served.sha256}")
    assert f"pin it (`sha256: {new}` under core_bundles.dclm_core in the config)" in msg
    # a whole zip of other bytes is no transient fault: fetched once, nothing sealed, nothing kept
    assert len(served.requests) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not store.work_dir(spec, tmp_path / "work").exists()


@pytest.mark.bad_input
def test_a_pinned_folder_bundle_is_checked_by_its_tree_digest(smoke_config, tmp_path):
    cfg = copy.deepcopy(smoke_config)
    cfg["core_bundles"]["core_mini"]["sha256"] = "0" * 64
    with pytest.raises(StageError, match=f"core_bundles.core_mini.sha256: {CORE_MINI} has sha256 "
                                         f"{bundle.tree_digest(CORE_MINI)}, which is not the configured 0000"):
        bundle.run(spec_of(config.check(cfg), "core_mini"), [], tmp_path / "out", tmp_path / "work", 1)
    cfg["core_bundles"]["core_mini"]["sha256"] = bundle.tree_digest(CORE_MINI)
    bundle.run(spec_of(config.check(cfg), "core_mini"), [], tmp_path / "out", tmp_path / "work", 1)
    assert resolved(tmp_path / "out")["pinned"] is True


def write_config(smoke_config, tmp_path, url, sha256=None):
    cfg = copy.deepcopy(smoke_config)
    cfg["core_bundles"]["dclm_core"] = {"url": url, **({"sha256": sha256} if sha256 else {})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def pin(capsys, *argv):
    rc = bundle.main(["pin", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_pin_prints_the_line_to_add_from_the_store_or_a_fetch(served, smoke_config, tmp_path, capsys):
    path = write_config(smoke_config, tmp_path, served.zip_url)
    # not downloaded yet: fetched to scratch for its digest, and the scratch is gone after
    rc, out, err = pin(capsys, "dclm_core", "--config", path)
    assert (rc, out) == (0, f"    sha256: {served.sha256}\n")
    assert f"add to core_bundles.dclm_core in {path}" in err and f"fetched from {served.zip_url}" in err
    assert not (tmp_path / "work" / "bundle" / "pin-dclm_core").exists()
    # once the stage has run, its manifest is the record: nothing is fetched
    spec = plan.bundle_spec(config.load(path), "dclm_core")
    bundle.run(spec, [], store.store_dir(spec, tmp_path / "store"), tmp_path / "work" / "b", 1)
    served.requests.clear()
    rc, out, err = pin(capsys, "dclm_core", "--config", path)
    assert (rc, out) == (0, f"    sha256: {served.sha256}\n") and "recorded in" in err and served.requests == []
    # the printed line, added to the config, is a valid pin that the next download passes
    path = write_config(smoke_config, tmp_path, served.zip_url, served.sha256)
    rc, out, err = pin(capsys, "dclm_core", "--config", path)
    assert rc == 0 and "is pinned, and its sha256 matches" in err
    pinned = plan.bundle_spec(config.load(path), "dclm_core")
    bundle.run(pinned, [], tmp_path / "pinned", tmp_path / "work" / "p", 1)
    assert resolved(tmp_path / "pinned")["sha256"] == served.sha256


@pytest.mark.bad_input
def test_pin_refuses_a_wrong_pin_and_an_unknown_bundle(served, smoke_config, tmp_path, capsys):
    path = write_config(smoke_config, tmp_path, served.zip_url, "f" * 64)
    rc, out, err = pin(capsys, "dclm_core", "--config", path)
    assert rc == 2 and out == ""
    assert f"error: core_bundles.dclm_core.sha256: {served.zip_url} has sha256 {served.sha256}" in err
    rc, out, err = pin(capsys, "dclm", "--config", path)
    assert rc == 2 and "no core bundle named 'dclm' (core_bundles: core_mini, dclm_core)" in err


def test_pin_of_a_folder_bundle_prints_its_tree_digest(smoke_config, tmp_path, capsys):
    path = write_config(smoke_config, tmp_path, "unused")
    rc, out, err = pin(capsys, "core_mini", "--config", path)
    assert (rc, out) == (0, f"    sha256: {bundle.tree_digest(CORE_MINI)}\n") and "tree digest" in err


@pytest.mark.bad_input
@pytest.mark.parametrize("sha256, what", [
    ("abc", "'abc' does not match"),
    ("A" * 64, f"'{'A' * 64}' does not match"),
    (1234, "1234 is not of type 'string'"),
])
def test_a_bad_bundle_sha256_is_refused_naming_the_field(repo_config, sha256, what):
    cfg = copy.deepcopy(repo_config)
    cfg["core_bundles"]["dclm_core"]["sha256"] = sha256
    with pytest.raises(config.ConfigError) as err:
        config.check(cfg, source="my.yaml")
    line = next(line for line in str(err.value).splitlines() if "core_bundles.dclm_core.sha256:" in line)
    assert what in line and "python -m pipeline.bundle pin NAME" in line


def test_a_pinned_sha256_rekeys_the_bundle_and_the_core_evaluations_only(repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["core_bundles"]["dclm_core"]["sha256"] = "0" * 64
    before, after = plan.make_plan(config.check(repo_config)), plan.make_plan(config.check(cfg))
    for stage in ("download", "tokenizer", "pretokenize", "train"):
        assert before.rows["d12"][stage] == after.rows["d12"][stage], stage
    assert before.rows["d12"]["bundle"] != after.rows["d12"]["bundle"]
    assert before.rows["d12"]["core"] != after.rows["d12"]["core"]
    assert before.rows["smoke"] == after.rows["smoke"]   # another bundle: nothing moves
