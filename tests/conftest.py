"""Shared fixtures: the shipped real-text shards built once, configs, the README's main command run once,
and the fault suite's summary line. What tests import by name lives in helpers.py."""

import copy
from pathlib import Path

import pytest
import yaml

from helpers import CORE_MINI, REPO, WEBTEXT, ShardServer, snakemake, write_config


@pytest.fixture
def shard_server():
    with ShardServer(WEBTEXT) as srv:
        yield srv


@pytest.fixture(scope="session")
def repo_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture
def smoke_config(repo_config, tmp_path):
    """The repo config with absolute paths, storing under tmp_path."""
    cfg = copy.deepcopy(repo_config)
    cfg["store_dir"] = str(tmp_path / "store")
    cfg["work_dir"] = str(tmp_path / "work")
    cfg["datasets"]["webtext"]["base_url"] = str(WEBTEXT)
    cfg["core_bundles"]["core_mini"]["url"] = str(CORE_MINI)
    return cfg


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The smoke row's downloads, tokenizer and token shards, built once per test session."""
    from pipeline import config, download, plan, pretokenize, tokenizer
    from pipeline.store import store_dir, work_dir

    root = tmp_path_factory.mktemp("smoke")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["store_dir"], cfg["work_dir"] = str(root / "store"), str(root / "work")
    cfg["datasets"]["webtext"]["base_url"] = str(WEBTEXT)
    cfg = config.check(cfg)
    p = plan.make_plan(cfg)
    keys = p.rows["smoke"]
    modules = {"download": download, "tokenizer": tokenizer, "pretokenize": pretokenize}
    for stage in ("download", "tokenizer", "pretokenize"):
        for key in keys[stage]:
            spec = p.specs[key]
            inputs = [Path(cfg["store_dir"]) / r for r in spec["inputs"]]
            modules[stage].run(spec, inputs, store_dir(spec, cfg["store_dir"]), work_dir(spec, cfg["work_dir"]), 2)
    return {"cfg": cfg, "plan": p, "root": root,
            "tokenizer": store_dir(p.specs[keys["tokenizer"][0]], cfg["store_dir"]),
            "blocks": [store_dir(p.specs[k], cfg["store_dir"]) for k in keys["pretokenize"]]}


# ----------------------------------------------------------------------------- the fault suite's summary line

SUITE = {"fault": "faults injected", "bad_input": "bad inputs tried"}


def pytest_terminal_summary(terminalreporter):
    """One line: how many faults and bad inputs the run tried (tests marked fault / bad_input), and how
    many of those tests passed, i.e. the pipeline survived or refused clearly."""
    reports = [r for outcome in ("passed", "failed", "skipped") for r in terminalreporter.stats.get(outcome, [])
               if getattr(r, "when", None) == "call" or (outcome == "skipped" and getattr(r, "when", None) == "setup")]
    parts = []
    for marker, what in SUITE.items():
        marked = [r for r in reports if marker in r.keywords]
        if marked:
            ok = sum(r.outcome == "passed" for r in marked)
            skipped = sum(r.outcome == "skipped" for r in marked)
            parts.append(f"{len(marked) - skipped} {what} ({ok} handled" + (f", {skipped} skipped" if skipped else "")
                         + ")")
    if parts:
        terminalreporter.write_line("fault suite: " + ", ".join(parts))


# ----------------------------------------------------------------------------- Snakemake end to end


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The README's main command, run twice, in a scratch directory, shards over loopback HTTP."""
    work = tmp_path_factory.mktemp("workflow")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    with ShardServer(REPO / "tests" / "fixtures" / "webtext") as server:
        cfg["datasets"]["webtext"]["base_url"] = server.url
        cfg = write_config(work, cfg)
        first = snakemake(work)   # no target: rule all, as the README's command runs it
        first_board = (work / "reports" / "leaderboard.md").read_text() if first.returncode == 0 else ""
        second = snakemake(work)
        requested = sorted(name for name, _ in server.requests)
    return {"dir": work, "cfg": cfg, "first": first, "first_board": first_board, "second": second,
            "requested": requested}
