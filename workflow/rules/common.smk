# Shared by every rule: the checked config, the plan (the only source of store keys) and helpers
# that turn a {key} wildcard into the spec, inputs and command line of its stage.
import json
import os
import re
import sys

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)  # `pipeline` imports from the checkout without an install
from pipeline import config as pipeline_config  # noqa: E402
from pipeline import launch as pipeline_launch  # noqa: E402
from pipeline import plan as pipeline_plan  # noqa: E402
from pipeline import resources as pipeline_resources  # noqa: E402

try:
    CFG = pipeline_config.check(config)
except pipeline_config.ConfigError as e:
    raise WorkflowError(str(e)) from None

PLAN = pipeline_plan.make_plan(CFG)
STORE = CFG["store_dir"]
WORK = CFG["work_dir"]
LOGS = "results/logs"
BENCHMARKS = "results/benchmarks"
CONDA_ENV = "../../envs/environment.yaml"
CONDA_ENV_HF = "../../envs/environment-hf.yaml"  # + transformers, for a published HuggingFace model
# Jobs run `python` from the environment running Snakemake, even when it is not activated (a
# --software-deployment-method conda job puts its own environment first again) ...
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
# ... and import `pipeline` from this checkout, the one whose sources the keys were computed from.
os.environ["PYTHONPATH"] = workflow.basedir + os.pathsep + os.environ.get("PYTHONPATH", "")


envvars:
    "PATH",
    "PYTHONPATH",


wildcard_constraints:
    key=pipeline_plan.KEY_PATTERN,
    row="|".join(re.escape(r) for r in PLAN.rows),


def store_dirs(stage, keys):
    return [f"{STORE}/{stage}/{k}" for k in keys]


def spec_inputs(stage):
    """Input function: the store directories a spec reads, from the plan."""
    return lambda w: [f"{STORE}/{r}" for r in PLAN.spec(stage, w.key)["inputs"]]


def spec_json(stage):
    """Params function: the spec as compact JSON for `python -m pipeline.<stage> --spec`."""
    return lambda w: json.dumps(PLAN.spec(stage, w.key), sort_keys=True, separators=(",", ":"))


def row_chain(row):
    """[(stage, store directory)] of a row's whole chain, in chain order (seeds in order within a stage)."""
    return [(stage, d) for stage in pipeline_plan.STAGES for d in store_dirs(stage, PLAN.rows[row].get(stage, []))]


def row_dirs(stage):
    """Input function: a row's store directories for one stage."""
    return lambda w: store_dirs(stage, PLAN.rows[w.row][stage])


def job_threads(stage):
    """Threads function: the CPUs a stage's job would like (Snakemake caps them by --cores / --max-threads)."""
    return lambda w: pipeline_resources.threads(stage, PLAN.spec(stage, w.key))


def job_resources(stage):
    """`resources: **job_resources(stage)`: every scheduler resource, from the job's spec and capped threads."""

    def one(name):
        return lambda w, threads: pipeline_resources.job(stage, PLAN.spec(stage, w.key), threads)[name]

    return {name: one(name) for name in pipeline_resources.NAMES}


def existing_rows(filename, under="results"):
    """Rows that have <under>/<row>/<filename>, looked up where this run keeps its files: the default
    storage provider's prefix when there is one (--default-storage-provider), else the working directory."""
    pattern, files = f"{under}/{{row}}/{filename}", None
    provider = workflow.storage_registry.default_storage_provider
    if provider is not None:
        obj = provider.object(f"{workflow.storage_settings.default_storage_prefix.rstrip('/')}/{pattern}")
        # the listing, not glob_wildcards(storage object): with the fs plugin that passes Paths to re.match
        pattern, files = obj.query, [str(f) for f in obj.list_candidate_matches()]
    return sorted(r for r in glob_wildcards(pattern, files=files).row if "/" not in r)


# a published file and the one that the report reads beside it
COMPANION = {"core.json": "manifest.json", "train_summary.json": "metrics.jsonl"}


def report_rows(wildcards):
    """Row files the leaderboard reads: those already there, and those this very run was asked for
    (else a run that trains a row and rebuilds the page would draw the page first, without the row)."""
    targets = getattr(workflow.dag_settings, "targets", None) or DEFAULT_TARGETS  # snakemake 9's CLI targets
    files = {str(t) for t in targets if re.fullmatch(r"results/[^/]+/(core|train_summary)\.json", str(t))}
    for name in COMPANION:
        files |= {f"results/{row}/{name}" for row in existing_rows(name)}
        files |= {f"results/imported/{row}/{name}" for row in existing_rows(name, "results/imported")}
    files |= {os.path.join(os.path.dirname(f), COMPANION[os.path.basename(f)]) for f in files}
    return sorted(files)
