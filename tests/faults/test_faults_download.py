"""Download faults, injected through the loopback ShardServer (or a port nobody listens on): after each
one no file under a final name is wrong, a retry succeeds once the server recovers, and a permanent
failure names the URL and the reason."""

import http.server
import json
import shutil
import socket
import threading

import pytest

from helpers import WEBTEXT, ShardServer
from pipeline import config, download, plan, store, tokenizer
from pipeline.errors import StageError

pytestmark = pytest.mark.fault

SHARD = "shard_00001.parquet"


def fetch(url, dest, **kw):
    return download.fetch_shard(url, dest, **{"attempts": 3, "backoff_s": 0.01, "timeout": 5, **kw})


def same_as_source(path, name=SHARD):
    return store.sha256_file(path) == store.sha256_file(WEBTEXT / name)


def free_port():
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finals(directory):
    """Files under a final shard name (not .part scratch)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".parquet"))


def test_connection_refused_for_good_names_the_url_and_the_reason(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/{SHARD}"
    with pytest.raises(StageError) as err:
        fetch(url, tmp_path / SHARD, attempts=2)
    msg = str(err.value)
    assert msg.startswith(f"{url}: failed after 2 attempts") and "Connection refused" in msg
    assert "rerun to resume" in msg
    assert list(tmp_path.iterdir()) == []
    # the retries said why, as they went
    assert "attempt 1/2 failed" in capsys.readouterr().err


def test_connection_refused_until_the_server_restarts(tmp_path, monkeypatch):
    server = ShardServer(WEBTEXT)        # bound but stopped: its port refuses connections
    port, handler = server.httpd.server_address[1], server.httpd.RequestHandlerClass
    server.httpd.server_close()
    restarted = []
    real_sleep = download.fetch.time.sleep

    def sleep_then_restart(seconds):
        # the first backoff is when the server comes back, on the same port
        if not restarted:
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            restarted.append(httpd)
        real_sleep(seconds)

    monkeypatch.setattr(download.fetch.time, "sleep", sleep_then_restart)
    try:
        info = fetch(f"http://127.0.0.1:{port}/{SHARD}", tmp_path / SHARD)
    finally:
        for httpd in restarted:
            httpd.shutdown()
            httpd.server_close()
    assert info["attempts"] == 2
    assert same_as_source(tmp_path / SHARD)
    assert server.requests == [(SHARD, None)]  # the refused attempt never reached it


def test_server_error_for_good_then_recovers(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["500"] * 3
    url = f"{shard_server.url}/{SHARD}"
    with pytest.raises(StageError, match=r"failed after 3 attempts: HTTP 500") as err:
        fetch(url, tmp_path / SHARD)
    assert str(err.value).startswith(url)
    assert list(tmp_path.iterdir()) == []
    info = fetch(url, tmp_path / SHARD)  # the server has recovered: the rerun succeeds at once
    assert info["attempts"] == 1 and same_as_source(tmp_path / SHARD)


def test_body_cut_short_every_time_keeps_only_the_part_file_and_resumes_it(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["cut"] * 2
    url = f"{shard_server.url}/{SHARD}"
    with pytest.raises(StageError, match="failed after 2 attempts: body cut short") as err:
        fetch(url, tmp_path / SHARD, attempts=2)
    assert str(err.value).startswith(url)
    assert finals(tmp_path) == []  # nothing under the final name
    part = tmp_path / (SHARD + ".part")
    kept = part.stat().st_size
    assert 0 < kept < (WEBTEXT / SHARD).stat().st_size
    shard_server.requests.clear()
    assert fetch(url, tmp_path / SHARD)["attempts"] == 1
    assert shard_server.requests == [(SHARD, f"bytes={kept}-")]  # what arrived is not fetched twice
    assert same_as_source(tmp_path / SHARD) and not part.exists()


def test_stalled_server_for_good_names_the_timeout(shard_server, tmp_path):
    shard_server.faults[SHARD] = ["stall"] * 2
    url = f"{shard_server.url}/{SHARD}"
    with pytest.raises(StageError, match="failed after 2 attempts") as err:
        fetch(url, tmp_path / SHARD, attempts=2, timeout=0.3)
    assert str(err.value).startswith(url) and "timed out" in str(err.value)
    assert finals(tmp_path) == []


def test_html_error_page_with_status_200_is_never_kept(shard_server, tmp_path):
    # a captive portal or a CDN error page: 200, but not parquet; it must not be resumed either
    shard_server.faults[SHARD] = ["garbage"] * 2
    url = f"{shard_server.url}/{SHARD}"
    with pytest.raises(StageError, match="not a valid nanochat shard") as err:
        fetch(url, tmp_path / SHARD, attempts=2)
    assert "base_url serves nanochat-format parquet shards" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    shard_server.requests.clear()
    assert fetch(url, tmp_path / SHARD)["attempts"] == 1
    assert shard_server.requests == [(SHARD, None)]  # started from zero, not resumed from the page


# ----------------------------------------------------------------------------- the stage, and re-verification

def _spec(smoke_config, base_url, shards=(0, 1)):
    spec = plan.download_spec(config.check(smoke_config), "webtext", list(shards))
    spec["settings"].update(base_url=base_url, backoff_s=0.01, attempts=2, timeout_s=5)
    return spec


@pytest.fixture
def downloaded(shard_server, smoke_config, tmp_path):
    """A finished download directory of shards 0 and 1, fetched over HTTP."""
    out = tmp_path / "out"
    download.run(_spec(smoke_config, shard_server.url), [], out, tmp_path / "work", threads=2)
    shard_server.requests.clear()
    return out


def edit_in_place(path):
    """Change bytes in the middle, keeping the size: only a sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_edited_shard_is_found_refused_downstream_and_repaired(downloaded, shard_server, tmp_path, capsys):
    edit_in_place(downloaded / SHARD)
    assert store.verify(downloaded) == [f"{downloaded / SHARD}: sha256 differs from manifest (edited after the "
                                        "stage wrote it)"]
    # a stage that reads it refuses before using a byte, naming the file and the command that fixes it
    tok = plan.make_spec("tokenizer", {"dataset": "webtext", "vocab_size": 300, "max_chars": 10_000, "doc_cap": 100,
                                       "train_shards": 1})
    with pytest.raises(StageError) as err:
        tokenizer.run(tok, [downloaded, downloaded], tmp_path / "tok", tmp_path / "tokwork", 1)
    assert str(err.value).startswith(f"{downloaded / SHARD}: sha256 differs")
    assert f"python -m pipeline.download --repair {downloaded}" in str(err.value)
    assert not (tmp_path / "tok").exists()

    shard_server.faults[SHARD] = ["500"]  # a transient fault during the repair is retried too
    assert download.main(["--repair", str(downloaded), "--work", str(tmp_path / "work")]) == 0
    assert "fetched shard_00001.parquet again" in capsys.readouterr().err
    assert [name for name, _ in shard_server.requests] == [SHARD, SHARD]  # only the damaged shard
    assert store.verify(downloaded) == [] and same_as_source(downloaded / SHARD)
    assert not (downloaded.parent / f".{downloaded.name}.repair").exists()
    # a second repair has nothing to do
    assert download.main(["--repair", str(downloaded), "--work", str(tmp_path / "work")]) == 0
    assert "verifies; nothing to fetch" in capsys.readouterr().err


def test_repair_refuses_bytes_that_differ_from_the_record(downloaded, shard_server, tmp_path, capsys):
    (downloaded / SHARD).unlink()  # lost outright
    # upstream now serves other, perfectly valid parquet under that name: the record wins
    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copyfile(WEBTEXT / "shard_00002.parquet", changed / SHARD)
    shard_server.root = changed
    assert download.main(["--repair", str(downloaded), "--work", str(tmp_path / "work")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {shard_server.url}/{SHARD}: failed after 2 attempts: sha256 ")
    assert "is not the recorded" in last and "Traceback" not in last
    assert not (downloaded / SHARD).exists()  # the wrong bytes never took the final name
    shard_server.root = WEBTEXT  # upstream fixed
    assert download.main(["--repair", str(downloaded), "--work", str(tmp_path / "work")]) == 0
    assert store.verify(downloaded) == []


def test_repair_of_a_directory_that_is_not_a_download_says_what_to_do(tmp_path, capsys):
    spec = plan.make_spec("tokenizer", {"x": 1})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a")
    store.seal(spec, ["a.txt"], tmp_path / "src", tmp_path / "tok")
    assert download.main(["--repair", str(tmp_path / "tok")]) == 2
    assert "refetches download directories only (delete this one and rerun" in capsys.readouterr().err


def test_a_work_shard_damaged_after_a_kill_is_fetched_again(shard_server, smoke_config, tmp_path):
    spec = _spec(smoke_config, shard_server.url)
    work = tmp_path / "work"
    work.mkdir()
    # left by an earlier, killed run under its final name; the disk lost its tail since
    (work / SHARD).write_bytes((WEBTEXT / SHARD).read_bytes()[:5000])
    download.run(spec, [], tmp_path / "out", work, threads=2)
    assert store.verify(tmp_path / "out") == []
    assert same_as_source(tmp_path / "out" / SHARD)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not manifest["resolved"]["shards"][SHARD].get("resumed")


def test_the_stage_survives_every_fault_at_once(shard_server, smoke_config, tmp_path):
    shard_server.faults.update({"shard_00000.parquet": ["cut", "500"], SHARD: ["garbage"],
                                "shard_00002.parquet": ["stall"]})
    spec = _spec(smoke_config, shard_server.url, shards=(0, 1, 2))
    spec["settings"].update(attempts=3, timeout_s=0.5)
    download.run(spec, [], tmp_path / "out", tmp_path / "work", threads=3)
    assert store.verify(tmp_path / "out") == []
    for name in ("shard_00000.parquet", SHARD, "shard_00002.parquet"):
        assert same_as_source(tmp_path / "out" / name, name)
