import copy
import json
import shutil
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import WEBTEXT
from pipeline import config, download, keylock, plan, store
from pipeline.errors import StageError

SHARD = "shard_00001.parquet"


def fetch(server, tmp_path, **kw):
    kw = {"attempts": 5, "backoff_s": 0.01, "timeout": 5, **kw}
    return download.fetch_shard(f"{server.url}/{SHARD}", tmp_path / SHARD, **kw)


def same_as_source(path):
    return store.sha256_file(path) == store.sha256_file(WEBTEXT / SHARD)


@pytest.mark.fault
def test_server_that_fails_twice_then_succeeds(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["500", "500"]
    info = fetch(shard_server, tmp_path)
    assert info["attempts"] == 3
    assert info["num_rows"] == 1024
    assert same_as_source(tmp_path / SHARD)


@pytest.mark.fault
def test_body_cut_short_is_resumed_with_a_range_request(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["cut"]
    info = fetch(shard_server, tmp_path)
    assert info["attempts"] == 2
    first, second = shard_server.requests
    assert first == (SHARD, None)
    assert second[1] is not None and second[1].startswith("bytes=") and second[1] != "bytes=0-"
    assert same_as_source(tmp_path / SHARD)
    assert not (tmp_path / (SHARD + ".part")).exists()


@pytest.mark.fault
def test_non_parquet_body_fails_naming_url_and_reason(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["garbage"] * 10
    with pytest.raises(StageError) as err:
        fetch(shard_server, tmp_path, attempts=3)
    assert f"{shard_server.url}/{SHARD}" in str(err.value)
    assert "not a valid nanochat shard" in str(err.value)
    assert "after 3 attempts" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # neither a final file nor a partial one


@pytest.mark.fault
def test_non_parquet_body_once_is_retried(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["garbage"]
    assert fetch(shard_server, tmp_path)["attempts"] == 2
    assert same_as_source(tmp_path / SHARD)


@pytest.mark.fault
def test_missing_shard_fails_at_once(shard_server, tmp_path):
    with pytest.raises(StageError, match="HTTP 404"):
        download.fetch_shard(f"{shard_server.url}/shard_09999.parquet", tmp_path / "x.parquet",
                             attempts=5, backoff_s=0.01, timeout=5)
    assert len(shard_server.requests) == 1


@pytest.mark.fault
def test_stalled_server_times_out_and_retries(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["stall"]
    info = fetch(shard_server, tmp_path, timeout=0.5)
    assert info["attempts"] == 2
    assert same_as_source(tmp_path / SHARD)


@pytest.mark.fault
def test_partial_file_left_by_a_kill_is_resumed(shard_server, tmp_path):
    part = tmp_path / (SHARD + ".part")
    part.write_bytes((WEBTEXT / SHARD).read_bytes()[:1000])
    fetch(shard_server, tmp_path)
    assert shard_server.requests == [(SHARD, "bytes=1000-")]
    assert same_as_source(tmp_path / SHARD)


def _spec(smoke_config, base_url, shards=(0, 1, 2)):
    cfg = config.check(smoke_config)
    spec = plan.download_spec(cfg, "webtext", list(shards))
    spec["settings"].update(base_url=base_url, backoff_s=0.01, attempts=2)
    return spec


@pytest.mark.parametrize("via", ["http", "file_url", "path"])
def test_stage_writes_verified_shards_and_manifest(shard_server, smoke_config, tmp_path, via):
    base = {"http": shard_server.url, "file_url": WEBTEXT.as_uri(), "path": str(WEBTEXT)}[via]
    spec = _spec(smoke_config, base)
    out, work = tmp_path / "out", tmp_path / "work"
    download.run(spec, [], out, work, threads=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"] == spec["key"] and manifest["stage"] == "download"
    assert sorted(manifest["outputs"]) == [f"shard_0000{i}.parquet" for i in range(3)]
    for name, rec in manifest["outputs"].items():
        assert rec["sha256"] == store.sha256_file(WEBTEXT / name)
    assert store.verify(out) == []
    assert not work.exists()  # scratch is dropped once the store holds the files


@pytest.mark.fault
def test_stage_failure_leaves_no_manifest_and_no_final_file(shard_server, smoke_config, tmp_path):
    shard_server.faults["shard_00002.parquet"] = ["garbage"] * 10
    spec = _spec(smoke_config, shard_server.url)
    out, work = tmp_path / "out", tmp_path / "work"
    with pytest.raises(StageError, match="shard_00002.parquet"):
        download.run(spec, [], out, work, threads=2)
    assert not (out / "manifest.json").exists()
    assert not (work / "shard_00002.parquet").exists()
    # the shards that did verify are kept for the rerun, which fetches only the missing one
    shard_server.faults.clear()
    shard_server.requests.clear()
    download.run(spec, [], out, work, threads=2)
    assert [name for name, _ in shard_server.requests] == ["shard_00002.parquet"]
    assert store.verify(out) == []


@pytest.mark.fault
def test_cli_reports_a_permanent_failure_in_one_line(shard_server, smoke_config, tmp_path, capsys):
    spec = _spec(smoke_config, shard_server.url, shards=[3])  # not shipped: the server answers 404
    rc = download.main(["--spec", json.dumps(spec), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2
    assert last.startswith("error: ") and "shard_00003.parquet" in last and "HTTP 404" in last
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- which revision the bytes are

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def hf_url(server):
    """The loopback server's answer to HuggingFace's resolve URL of the webtext dataset."""
    return f"{server.url}/datasets/team/webtext/resolve/main"


def another_revision(folder):
    """A copy of the shipped shards whose shard 1 holds other documents: the dataset after a commit."""
    folder.mkdir()
    for path in WEBTEXT.glob("shard_*.parquet"):
        (folder / path.name).write_bytes(path.read_bytes())
    pq.write_table(pa.table({"text": ["a document added upstream", "and another"]}), folder / SHARD)
    return folder


def manifest_of(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("redirect", [False, True], ids=["header", "header_on_the_redirect"])
def test_the_revision_served_is_recorded_per_shard_and_for_the_block(shard_server, smoke_config, tmp_path,
                                                                     redirect):
    # HuggingFace sends X-Repo-Commit on its 302 to the CDN, whose answer has no such header
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    shard_server.redirect = redirect
    spec = _spec(smoke_config, hf_url(shard_server))
    download.run(spec, [], tmp_path / "out", tmp_path / "work", threads=2)
    resolved = manifest_of(tmp_path / "out")["resolved"]
    assert resolved["revision"] == COMMIT_A
    assert {name: info["revision"] for name, info in resolved["shards"].items()} == {
        f"shard_0000{i}.parquet": COMMIT_A for i in range(3)}
    assert all(info["url"].startswith(hf_url(shard_server)) for info in resolved["shards"].values())


@pytest.mark.parametrize("via", ["http", "path"])
def test_a_source_that_does_not_say_is_recorded_as_unknown(shard_server, smoke_config, tmp_path, via):
    spec = _spec(smoke_config, {"http": shard_server.url, "path": str(WEBTEXT)}[via])
    download.run(spec, [], tmp_path / "out", tmp_path / "work", threads=2)
    resolved = manifest_of(tmp_path / "out")["resolved"]
    assert resolved["revision"] is None
    assert [info["revision"] for info in resolved["shards"].values()] == [None, None, None]


@pytest.mark.fault
def test_a_mirror_finishing_a_block_leaves_those_shards_unconfirmed(shard_server, smoke_config, tmp_path, capsys):
    """HuggingFace serves shard 0 and then fails; the block is finished from a folder that names no commit.
    The block keeps shard 0's commit, and records (and says) that the other two are unconfirmed."""
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    for name in ("shard_00001.parquet", "shard_00002.parquet"):
        shard_server.faults[name] = ["404"]
    work = tmp_path / "work"
    with pytest.raises(StageError):
        download.run(_spec(smoke_config, hf_url(shard_server)), [], tmp_path / "out", work, threads=1)
    assert [p.name for p in work.glob("*.parquet")] == ["shard_00000.parquet"]
    download.run(_spec(smoke_config, str(WEBTEXT)), [], tmp_path / "out", work, threads=1)  # base_url is no key
    resolved = manifest_of(tmp_path / "out")["resolved"]
    assert resolved["revision"] == COMMIT_A
    assert resolved["revision_unconfirmed"] == ["shard_00001.parquet", "shard_00002.parquet"]
    assert [info["revision"] for info in resolved["shards"].values()] == [COMMIT_A, None, None]
    assert "unconfirmed for shard_00001.parquet, shard_00002.parquet" in capsys.readouterr().err


def test_a_pinned_revision_goes_into_the_url_and_the_key(shard_server, smoke_config, tmp_path):
    unpinned = _spec(smoke_config, hf_url(shard_server))
    # without revision: the params, and so the keys, are those of the stores made before pinning existed
    assert unpinned["params"] == {"dataset": "webtext", "hf_repo": None, "shards": [0, 1, 2]}
    assert unpinned["key"] == plan.make_spec("download", unpinned["params"])["key"]
    smoke_config["datasets"]["webtext"]["revision"] = COMMIT_B
    pinned = _spec(smoke_config, hf_url(shard_server))
    assert pinned["params"]["revision"] == COMMIT_B and pinned["key"] != unpinned["key"]
    # the server knows only that commit: asking for main would be a 404
    shard_server.revisions[COMMIT_B] = (COMMIT_B, WEBTEXT)
    download.run(pinned, [], tmp_path / "out", tmp_path / "work", threads=2)
    resolved = manifest_of(tmp_path / "out")["resolved"]
    assert resolved["revision"] == COMMIT_B
    assert [info["url"] for info in resolved["shards"].values()] == [
        f"{shard_server.url}/datasets/team/webtext/resolve/{COMMIT_B}/shard_0000{i}.parquet" for i in range(3)]


def test_the_revision_replaces_only_the_ref_of_a_resolve_url():
    hf = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    assert download.dataset_url(hf, None) == hf
    assert download.dataset_url(hf, COMMIT_A) == hf.replace("/main", f"/{COMMIT_A}")
    assert download.dataset_url(hf + "/data/", "v1.0") == hf.replace("/main", "/v1.0/data")
    assert download.dataset_url(hf, "refs/convert/parquet") == hf.replace("/main", "/refs%2Fconvert%2Fparquet")
    # a mirror or a folder has no ref to replace: it is taken to hold the pinned revision
    assert download.dataset_url("http://mirror.local/climbmix", COMMIT_A) == "http://mirror.local/climbmix"
    assert download.shard_url("/data/climbmix/", 7, COMMIT_A) == "/data/climbmix/shard_00007.parquet"


@pytest.mark.fault
def test_a_resumed_download_of_another_revision_is_refused(shard_server, smoke_config, tmp_path):
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    spec = _spec(smoke_config, hf_url(shard_server))
    out, work = tmp_path / "out", tmp_path / "work"
    shard_server.faults["shard_00002.parquet"] = ["500"] * 2   # shards 0 and 1 arrive, then the job dies
    with pytest.raises(StageError):
        download.run(spec, [], out, work, threads=2)
    shard_server.revisions["main"] = (COMMIT_B, WEBTEXT)       # overnight, main moves on
    shard_server.requests.clear()
    with pytest.raises(StageError) as err:
        download.run(spec, [], out, work, threads=2)
    msg = str(err.value)
    assert "shard_00002.parquet" in msg and COMMIT_A in msg and COMMIT_B in msg
    assert f"revision: {COMMIT_A}` under datasets.webtext" in msg and f"delete {work}" in msg
    # refused on the answer's headers: not a byte of commit B's shard was kept
    assert shard_server.requests == [("shard_00002.parquet", None)]
    assert sorted(p.name for p in work.glob("*.parquet")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert not list(work.glob("*.part"))
    assert not (out / "manifest.json").exists()
    # either fix works: pin the commit the block began with (a new key) ...
    smoke_config["datasets"]["webtext"]["revision"] = COMMIT_A
    shard_server.revisions[COMMIT_A] = (COMMIT_A, WEBTEXT)
    pinned = _spec(smoke_config, hf_url(shard_server))
    download.run(pinned, [], tmp_path / "pinned", tmp_path / "pinned_work", threads=2)
    assert manifest_of(tmp_path / "pinned")["resolved"]["revision"] == COMMIT_A
    # ... or start the block over, all from the new commit
    shutil.rmtree(work)
    download.run(spec, [], out, work, threads=2)
    assert manifest_of(out)["resolved"]["revision"] == COMMIT_B


@pytest.mark.fault
def test_a_partial_shard_of_another_commit_is_started_over(shard_server, tmp_path):
    moved = another_revision(tmp_path / "moved")
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    shard_server.faults[SHARD] = ["cut"]
    url = f"{hf_url(shard_server)}/{SHARD}"
    with pytest.raises(StageError, match="body cut short"):
        download.fetch_shard(url, tmp_path / SHARD, attempts=1, timeout=5)
    assert (tmp_path / (SHARD + ".part")).stat().st_size > 0
    shard_server.revisions["main"] = (COMMIT_B, moved)
    shard_server.requests.clear()
    info = download.fetch_shard(url, tmp_path / SHARD, attempts=3, backoff_s=0.01, timeout=5)
    # the Range request shows the commit moved, so the half of A's shard is dropped, not spliced onto B's
    assert [rng is None for _, rng in shard_server.requests] == [False, True]
    assert info["revision"] == COMMIT_B
    assert store.sha256_file(tmp_path / SHARD) == store.sha256_file(moved / SHARD)


@pytest.mark.fault
def test_a_server_that_does_not_serve_the_pinned_commit_is_refused(shard_server, smoke_config, tmp_path):
    smoke_config["datasets"]["webtext"]["revision"] = COMMIT_A
    shard_server.revisions[COMMIT_A] = (COMMIT_B, WEBTEXT)     # a mirror that holds another commit
    spec = _spec(smoke_config, hf_url(shard_server))
    with pytest.raises(StageError) as err:
        download.run(spec, [], tmp_path / "out", tmp_path / "work", threads=2)
    msg = str(err.value)
    assert f"commit {COMMIT_B}, not the pinned revision {COMMIT_A} (datasets.webtext.revision" in msg
    assert not list((tmp_path / "work").glob("*.parquet"))


@pytest.mark.fault
def test_repair_fetches_the_recorded_commit_after_main_moved_on(shard_server, smoke_config, tmp_path):
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    spec = _spec(smoke_config, hf_url(shard_server))
    out = tmp_path / "out"
    download.run(spec, [], out, tmp_path / "work", threads=2)
    # main now serves other bytes for shard 1; the recorded commit still serves the old ones
    shard_server.revisions.update(main=(COMMIT_B, another_revision(tmp_path / "moved")),
                                  **{COMMIT_A: (COMMIT_A, WEBTEXT)})
    (out / SHARD).write_bytes(b"damaged")
    assert download.repair(out, tmp_path / "work", attempts=1) == [SHARD]
    assert store.verify(out) == []


@pytest.mark.fault
def test_a_repair_waits_for_the_keys_lock(shard_server, smoke_config, tmp_path):
    """A repair holds the lock the stage's runs hold: never two at once in one scratch folder."""
    shard_server.revisions.update(main=(COMMIT_A, WEBTEXT), **{COMMIT_A: (COMMIT_A, WEBTEXT)})
    spec = _spec(smoke_config, hf_url(shard_server))
    out, work = tmp_path / "out", tmp_path / "work"
    download.run(spec, [], out, work, threads=2)
    (out / SHARD).write_bytes(b"damaged")
    fetched = []
    with keylock.held(work, f"download-{spec['key']}", log=lambda m: None):  # as a run of the stage would
        repairing = threading.Thread(target=lambda: fetched.append(download.repair(out, work, attempts=1)))
        repairing.start()
        repairing.join(3)
        assert repairing.is_alive() and fetched == [] and (out / SHARD).read_bytes() == b"damaged"
    repairing.join(60)
    assert fetched == [[SHARD]] and store.verify(out) == []


def test_pinning_the_recorded_commit_reuses_the_block_downloaded_before(shard_server, smoke_config, tmp_path):
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    unpinned = _spec(smoke_config, hf_url(shard_server))
    download.run(unpinned, [], store.store_dir(unpinned, tmp_path / "store"), tmp_path / "w1", threads=2)
    smoke_config["datasets"]["webtext"]["revision"] = COMMIT_A    # the commit its manifest recorded
    pinned = _spec(smoke_config, hf_url(shard_server))
    shard_server.requests.clear()
    out = store.store_dir(pinned, tmp_path / "store")
    download.run(pinned, [], out, tmp_path / "w2", threads=2)
    assert shard_server.requests == []                            # the same bytes: nothing fetched again
    resolved = manifest_of(out)["resolved"]
    assert resolved["revision"] == COMMIT_A and resolved["reused"]["from_key"] == unpinned["key"]
    assert manifest_of(out)["outputs"] == manifest_of(store.store_dir(unpinned, tmp_path / "store"))["outputs"]
    # a pin of another commit than the one recorded reuses nothing
    smoke_config["datasets"]["webtext"]["revision"] = COMMIT_B
    shard_server.revisions[COMMIT_B] = (COMMIT_B, WEBTEXT)
    other = _spec(smoke_config, hf_url(shard_server))
    out = store.store_dir(other, tmp_path / "store")
    download.run(other, [], out, tmp_path / "w3", threads=2)
    assert len(shard_server.requests) == 3 and "reused" not in manifest_of(out)["resolved"]


# ----------------------------------------------------------------------------- config and sources

@pytest.mark.bad_input
@pytest.mark.parametrize("revision, what", [
    (123, "123 is not of type 'string'"),
    ("", "'' does not match"),
    ("main branch", "'main branch' does not match"),
])
def test_a_bad_revision_is_refused_naming_the_field(repo_config, revision, what):
    cfg = copy.deepcopy(repo_config)
    cfg["datasets"]["climbmix"]["revision"] = revision
    with pytest.raises(config.ConfigError) as err:
        config.check(cfg, source="my.yaml")
    line = next(line for line in str(err.value).splitlines() if "datasets.climbmix.revision:" in line)
    assert what in line and "the dataset commit to download" in line


def test_a_pinned_revision_keys_that_dataset_only(repo_config):
    cfg = copy.deepcopy(repo_config)
    cfg["datasets"]["climbmix"]["revision"] = COMMIT_A
    before, after = plan.make_plan(config.check(repo_config)), plan.make_plan(config.check(cfg))
    assert before.rows["d24_jan29"] == after.rows["d24_jan29"]   # a FineWeb row: not a key moves
    for stage in ("download", "tokenizer", "pretokenize", "train", "core"):
        assert not set(before.rows["d24_climbmix"][stage]) & set(after.rows["d24_climbmix"][stage]), stage
    assert before.rows["d24_climbmix"]["bundle"] == after.rows["d24_climbmix"]["bundle"]


# ----------------------------------------------------------------------------- one commit per row

@pytest.mark.fault
def test_a_row_never_trains_on_blocks_of_two_commits(shard_server, smoke_config, smoke_data, tmp_path, capsys):
    """Each block is of one commit; blocks fetched on different days may not be. The tokenizer (over its
    download blocks) and train (over the pretokenized blocks, which carry the commit on) refuse a mix."""
    from pipeline import pretokenize, tokenizer
    shard_server.revisions["main"] = (COMMIT_A, WEBTEXT)
    early = tmp_path / "early"
    download.run(_spec(smoke_config, hf_url(shard_server), (0, 1)), [], early, tmp_path / "w1", threads=2)
    shard_server.revisions["main"] = (COMMIT_B, another_revision(tmp_path / "upstream"))  # a month later
    late = tmp_path / "late"
    download.run(_spec(smoke_config, hf_url(shard_server), (6,)), [], late, tmp_path / "w2", threads=2)

    tok_spec = plan.make_spec("tokenizer", {"vocab_size": 300, "train_shards": 2, "max_chars": 20000,
                                            "doc_cap": 1000}, ["download/early", "download/late"])
    with pytest.raises(StageError) as err:
        tokenizer.run(tok_spec, [early, late], tmp_path / "tok", tmp_path / "w3", threads=2)
    message = str(err.value)
    assert message.startswith(f"tokenizer {tok_spec['key']}: its blocks come from 2 commits of dataset 'webtext' "
                              f"(commit {COMMIT_A}: download/")
    assert f"commit {COMMIT_B}: download/" in message and f"`revision: {COMMIT_B}` under datasets.webtext" in message
    assert not (tmp_path / "tok").exists()

    blocks = []
    for name, block in (("a", early), ("b", late)):
        spec = plan.make_spec("pretokenize", {"block": name}, ["tokenizer/t", f"download/{name}"])
        pretokenize.run(spec, [smoke_data["tokenizer"], block], tmp_path / f"tokens_{name}", tmp_path / f"w_{name}",
                        threads=2)
        blocks.append(store.read_manifest(tmp_path / f"tokens_{name}"))
    assert [(b["resolved"]["dataset"], b["resolved"]["revision"]) for b in blocks] == [
        ("webtext", COMMIT_A), ("webtext", COMMIT_B)]
    assert download.one_commit([blocks[0], blocks[0]], "train x") == COMMIT_A
    unknown = copy.deepcopy(blocks[1])
    unknown["resolved"]["revision"] = None   # a mirror that did not say: nothing to compare
    assert download.one_commit([blocks[0], unknown], "train x") == COMMIT_A
    with pytest.raises(StageError, match=r"^train x: its blocks come from 2 commits of dataset 'webtext'"):
        download.one_commit(blocks, "train x")
    # what train does with them, before it builds anything
    from pipeline import train
    spec = plan.make_spec("train", {}, ["tokenizer/t", "pretokenize/a", "pretokenize/b"])
    capsys.readouterr()
    rc = train.main(["--spec", json.dumps(spec), "--inputs", str(smoke_data["tokenizer"]), str(tmp_path / "tokens_a"),
                     str(tmp_path / "tokens_b"), "--out", str(tmp_path / "trained"), "--work", str(tmp_path / "w4")])
    assert rc == 2 and not (tmp_path / "trained").exists()
    assert capsys.readouterr().err.startswith(f"error: train {spec['key']}: its blocks come from 2 commits of dataset")
