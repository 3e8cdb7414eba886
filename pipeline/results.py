"""results: a row's published files (results/<row>/, or results/imported/<row>/), verified against
its chain before any number is read (pipeline.provenance); what the report, the entry and a series read."""

import json
import os
import re
from pathlib import Path

from pipeline import provenance
from pipeline import recipe as recipes

IMPORTED = "imported"  # results/imported/<row>/: rows brought in by `python -m pipeline.report import`
# the targets that name a row's or a series' published files
TARGETS = {"row": r"results/([^/]+)/(?:core|train_summary)\.json", "series": r"results/series/([^/]+)/series\.json"}


def asked_for(kind, targets, workdir):
    """The rows ("row") or series ("series") whose published files are among `targets`, as a command line
    names them: relative to `workdir` or absolute, with or without ./ or a doubled slash."""
    names = set()
    for target in map(str, targets):
        path = os.path.normpath(os.path.join(workdir, target))
        rel = os.path.relpath(path, workdir)
        if not rel.startswith(".." + os.sep) and (m := re.fullmatch(TARGETS[kind], rel.replace(os.sep, "/"))):
            names.add(m[1])
    return names


def _read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_row(results, name, row_cfg, store_root=None):
    """What results/<name>/ (or results/imported/<name>/) holds, or a 'not run' row."""
    d = Path(results) / name
    if not (d / "core.json").is_file() and (Path(results) / IMPORTED / name / "core.json").is_file():
        d = Path(results) / IMPORTED / name
    found = {"row": name, "description": row_cfg.get("description", name), "reference": row_cfg.get("reference"),
             "hf_model": row_cfg.get("hf_model"), "recipe": None if "hf_model" in row_cfg else recipes.commit_of(
                 row_cfg.get("recipe")), "status": "not run", "core": None, "summary": None,
             "manifest": None, "metrics": [], "problems": [], "imported": d.parent.name == IMPORTED}
    if not any((d / f).is_file() for f in provenance.PUBLISHED):
        return found
    problems = provenance.row_problems(d, store_root, provenance.REPORT_HASH_LIMIT)
    if problems:
        return {**found, "status": "refused", "problems": problems}
    core, summary = _read_json(d / "core.json"), _read_json(d / "train_summary.json")
    metrics = []
    if (d / "metrics.jsonl").is_file():
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {**found, "status": "reproduced" if core else "trained", "core": core, "summary": summary,
            "manifest": provenance.read_row_manifest(d), "metrics": metrics}


def stage_manifests(manifest, name):
    """A row manifest's manifests of one stage (one per seed; none for a row not run)."""
    return provenance.manifests((manifest or {}).get("chain", {}), name)


def first_train(manifest):
    """The first seed's train manifest ({} for a row without one): its git, resolved and params."""
    return next(iter(stage_manifests(manifest, "train")), {})
