# Shared by every rule: the checked config, the plan (the only source of store keys) and helpers
# that turn a {key} wildcard into the spec, inputs and command line of its stage.
import glob
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


def report_rows(wildcards):
    """Row files the leaderboard reads: those already there, and those this very run was asked for
    (else a run that trains a row and rebuilds the page would draw the page first, without the row)."""
    targets = getattr(workflow.dag_settings, "targets", None) or DEFAULT_TARGETS  # snakemake 9's CLI targets
    requested = [t for t in targets if re.fullmatch(r"results/[^/]+/(core|train_summary)\.json", str(t))]
    present = glob.glob("results/*/core.json") + glob.glob("results/*/train_summary.json")
    return sorted(set(present + requested + glob.glob("results/imported/*/core.json")))
