import json

import pytest

from pipeline import plan, store
from pipeline.errors import StageError


def sealed(tmp_path, files=None):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    files = files or {"a.txt": "alpha\n", "sub/b.bin": "beta"}
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    spec = plan.make_spec("download", {"dataset": "x", "shards": [0]})
    manifest = store.seal(spec, list(files), work, out, resolved={"n": 1}, started_at=store.now_iso())
    return spec, out, manifest


def test_manifest_records_provenance_and_every_output(tmp_path):
    spec, out, manifest = sealed(tmp_path)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["key"] == spec["key"] and manifest["params"] == spec["params"]
    assert manifest["outputs"]["a.txt"] == {"sha256": store.sha256_file(out / "a.txt"), "size": 6}
    assert set(manifest) >= {"source_digest", "inputs", "git", "packages", "hardware", "started_at",
                             "finished_at", "wall_time_s", "resolved", "command"}
    assert manifest["git"]["commit"] is None or len(manifest["git"]["commit"]) == 40
    assert manifest["packages"]["pyarrow"] and manifest["packages"]["python"]
    assert not (tmp_path / "work").exists()


@pytest.mark.fault
def test_verify_names_an_edited_or_missing_file(tmp_path, capsys):
    _, out, _ = sealed(tmp_path)
    assert store.verify(out) == []
    (out / "a.txt").write_text("alphA\n")  # same size, other bytes
    (out / "sub" / "b.bin").unlink()
    problems = store.verify(out)
    assert any("a.txt" in p and "sha256 differs" in p for p in problems)
    assert any("b.bin" in p and "missing" in p for p in problems)
    assert store.main(["verify", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_directory_without_manifest_is_incomplete(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(StageError, match="has no manifest.json"):
        store.read_manifest(tmp_path / "half")
    assert "did not finish" in store.verify(tmp_path / "half")[0]


def test_seal_refuses_a_missing_output_and_leaves_no_manifest(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    spec = plan.make_spec("download", {"dataset": "x", "shards": [0]})
    with pytest.raises(StageError, match="did not produce"):
        store.seal(spec, ["absent.parquet"], work, out)
    assert not (out / "manifest.json").exists()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    store.atomic_write(tmp_path / "f.json", "{}")
    store.write_json(tmp_path / "f.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": 1}
