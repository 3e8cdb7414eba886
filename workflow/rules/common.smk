# Shared by every rule: the checked config, the plan (the only source of store keys) and helpers
# that turn a {key} wildcard into the spec, inputs and command line of its stage.
import hashlib
import json
import os
import pathlib
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# The plan's keys digest the sources of `pipeline`, so they must be this checkout's, whatever else the
# interpreter running Snakemake has installed: its imports come from the checkout first. Only this
# process's import path is touched; jobs get no PATH or PYTHONPATH from here (see shell.prefix below).
sys.path.insert(0, workflow.basedir)
from pipeline import config as pipeline_config  # noqa: E402
from pipeline import launch as pipeline_launch  # noqa: E402
from pipeline import plan as pipeline_plan  # noqa: E402
from pipeline import resources as pipeline_resources  # noqa: E402
from pipeline import results as pipeline_results  # noqa: E402

try:
    CFG = pipeline_config.check(config)
except pipeline_config.ConfigError as e:
    raise WorkflowError(str(e)) from None

PLAN = pipeline_plan.make_plan(CFG)
# the checked config as the report job reads it, and a digest that names it
CFG_JSON = json.dumps(CFG, sort_keys=True, indent=1)
CFG_DIGEST = hashlib.sha256(CFG_JSON.encode()).hexdigest()[:16]
STORE = CFG["store_dir"]
WORK = CFG["work_dir"]
LOGS = "results/logs"
BENCHMARKS = "results/benchmarks"
CONDA_ENV = "../envs/environment.yaml"
CONDA_ENV_HF = "../envs/environment-hf.yaml"  # + transformers, for a published HuggingFace model

unknown = [r for r in CFG["report"].get("rows") or [] if r not in PLAN.rows]
if unknown:
    raise WorkflowError(
        f"report.rows names {', '.join(map(repr, unknown))}, not rows of the config: list rows from rows: "
        f"({', '.join(PLAN.rows)}), or leave report.rows out to show the rows that have results"
    )

# Every job runs `python -m pipeline.<stage>` (and torchrun) from its own environment: the activated
# .venv of scripts/setup, or the conda env of workflow/envs/ (which installs this checkout, -e ../..).
# Before its command, a job checks that this python imports `pipeline` from this very checkout, so a
# job never runs other sources than the ones its key was computed from; if not, one line says what to do.
CHECKOUT_CHECK = (
    "import os, sys, pipeline; here = os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__))); "
    "sys.exit(0 if os.path.samefile(here, sys.argv[1]) else 'this python imports pipeline from %s' % here)"
)
CHECKOUT_FIX = (
    '"this job\'s python ($(command -v python || echo none)) does not import pipeline from "'
    f"{shlex.quote(workflow.basedir)}"
    "\": run Snakemake from that checkout's environment (scripts/setup, then . .venv/bin/activate) or with"
    ' --software-deployment-method conda"'
)
# (Snakemake formats the prefix like a command, so no braces in it; `set -euo pipefail` is its default.)
shell.prefix(
    f"set -euo pipefail; python -I -c {shlex.quote(CHECKOUT_CHECK)} {shlex.quote(workflow.basedir)}"
    f" || (echo {CHECKOUT_FIX} >&2; exit 1); "
)


wildcard_constraints:
    key=pipeline_plan.KEY_PATTERN,
    row="|".join(re.escape(r) for r in PLAN.rows),
    series="|".join(re.escape(s) for s in CFG["series"]) or "(?!)",  # (?!): no series, nothing matches


def store_dirs(stage, keys):
    return [f"{STORE}/{stage}/{k}" for k in keys]


def spec_inputs(stage):
    """Input function: the store directories a spec reads, from the plan."""
    return lambda w: [f"{STORE}/{r}" for r in PLAN.spec(stage, w.key)["inputs"]]


def stage_command(stage):
    """Params function: the whole command of a one-process stage's job (pipeline.launch.stage_command)."""
    return lambda w, input, output, threads: pipeline_launch.stage_command(
        PLAN.spec(stage, w.key), input, output, WORK, threads
    )


def row_chain(row):
    """[(stage, store directory)] of a row's whole chain, in chain order (seeds in order within a stage)."""
    return [(stage, d) for stage in pipeline_plan.STAGES for d in store_dirs(stage, PLAN.rows[row].get(stage, []))]


def row_dirs(stage):
    """Input function: a row's store directories for one stage."""
    return lambda w: store_dirs(stage, PLAN.rows[w.row][stage])


def user_resource(rule, name):
    """A rule's set-resources entry `name` as the user wrote it (a string or number), else None."""
    own = (workflow.resource_settings.overwrite_resources or {}).get(rule) or {}
    if name not in own:  # Snakemake's Resources answer .get of a name they lack with an empty Resource
        return None
    value = own[name]  # Snakemake 9 keeps what was written as a Resource's `raw`; 8 keeps the value itself
    return str(getattr(value, "raw", value)).strip("'\"")


def slurm_partition(rule):
    """(partition, whether the rule's own) a rule's jobs go to: its set-resources' slurm_partition, else
    default-resources', else None for SLURM's default."""
    own = user_resource(rule, "slurm_partition")
    if own is not None:
        return own, True
    for arg in getattr(workflow.resource_settings.default_resources, "args", None) or []:
        name, _, value = arg.partition("=")
        if name.strip() == "slurm_partition":
            return value.strip().strip("'\"") or None, False
    return None, False


SLURM_NODES = {}  # sinfo's answer, asked once per run


def slurm_fit(stage, spec, wanted, fixed=None):
    """`wanted` CPUs, fitted to the rule's partition when the run submits to SLURM (or the run stops with
    what to set: sbatch would only say "More processors requested than permitted"); else as they are.
    `fixed`: what the user set them with, so they are checked rather than cut (pipeline.resources.fit_cpus)."""
    if getattr(workflow.executor_plugin, "name", None) != "slurm":  # local, dry run, or inside a SLURM job
        return wanted
    try:
        if not SLURM_NODES:
            SLURM_NODES["cpus"], SLURM_NODES["default"] = pipeline_resources.slurm_partitions()
        partition, per_rule = slurm_partition(stage)
        return pipeline_resources.fit_cpus(
            stage,
            wanted,
            pipeline_resources.least_cpus(stage, spec),
            partition,
            SLURM_NODES["cpus"],
            SLURM_NODES["default"],
            per_rule,
            fixed,
        )
    except pipeline_resources.SlurmFitError as e:
        raise WorkflowError(str(e)) from None


def job_threads(stage):
    """Threads function: the CPUs a stage's job would like (Snakemake caps them by --cores / --max-threads),
    fitted to the SLURM partition's biggest node when submitting there."""

    def threads(w):
        spec = PLAN.spec(stage, w.key)
        return slurm_fit(stage, spec, pipeline_resources.threads(stage, spec))

    return threads


def user_cpus_per_task(stage):
    """A rule's cpus_per_task as the user's set-resources gives it (what sbatch then gets), else None."""
    own = user_resource(stage, "cpus_per_task")
    try:
        return None if own is None else int(own)
    except ValueError:  # an expression: Snakemake evaluates it per job, past this check
        return None


def job_resources(stage):
    """`resources: **job_resources(stage)`: every scheduler resource, from the job's spec and capped threads.
    The job's CPUs are the threads job_threads fitted, unless the user set them: a set-threads (which
    bypasses job_threads) or set-resources' cpus_per_task (which bypasses this one's resource of that name)
    is checked here against the partition instead."""

    def one(name):
        def resource(w, threads):
            spec = PLAN.spec(stage, w.key)
            user = user_cpus_per_task(stage)
            if user is not None:
                slurm_fit(stage, spec, user, fixed="cpus_per_task")
            elif name == "cpus_per_task":
                slurm_fit(stage, spec, threads, fixed="set-threads")
            return pipeline_resources.job(stage, spec, threads)[name]

        return resource

    return {name: one(name) for name in pipeline_resources.NAMES}


def requested(kind):
    """Rows ("row") or series ("series") whose published files this run was asked for: the targets of the
    command line, or rule all's when none were named. A run that makes a row and draws the page waits for
    the row; a run that only draws the page trains nothing. Snakemake's Workflow holds them as
    dag_settings.targets (the DAGSettings of its API), unchanged from 8.0 through 9.27; a Snakemake that does
    not says so once, and the page then shows only the rows with results unless report.rows names them."""
    settings = getattr(workflow, "dag_settings", None)
    targets = getattr(settings, "targets", None)
    if targets is None:
        if kind == "row":
            logger.warning(
                "this Snakemake does not say which files the run was asked for: the leaderboard shows the rows "
                "that already have results; name the rows it should wait for in the config's report.rows"
            )
        return set()
    targets = {str(t) for t in targets} or {"all"}
    if "all" in targets:  # the rule, named or implied
        targets |= set(DEFAULT_TARGETS)
    return pipeline_results.asked_for(kind, targets, os.getcwd())


# a published file and the one that the report reads beside it
COMPANION = {"core.json": "manifest.json", "train_summary.json": "metrics.jsonl"}
# The published files of the config's rows that exist as the run starts, where it keeps its files
# (Snakemake's exists(): the working directory, or the default storage provider's prefix). Asked here
# while the Snakefile is read: exists() cannot ask a storage plugin from an input function, which runs
# inside Snakemake's own event loop (9.27: NestedCoroutineError).
PUBLISHED = {
    path
    for row in PLAN.rows
    for under in ("results", "results/imported")
    for name in COMPANION
    if exists(path := f"{under}/{row}/{name}")
} | {path for series in CFG["series"] if exists(path := f"results/series/{series}/series.json")}


def is_member(row):
    """A row made for a series: the page shows it in its series, not as a leaderboard row."""
    return pipeline_config.MEMBER in CFG["rows"][row]


def series_rows(wildcards):
    """Input function: the published files of every member of a series, both arms."""
    rows = [r for r in PLAN.rows if CFG["rows"][r].get(pipeline_config.MEMBER, {}).get("series") == wildcards.series]
    return [f"results/{row}/{name}" for row in rows for pair in COMPANION.items() for name in pair]


def report_rows(wildcards):
    """The row files the leaderboard reads and waits for. With report.rows: those rows' files (made if
    missing). Without: the published files there are (PUBLISHED), under results/ or results/imported/,
    and the files of the rows this run was asked for. Never a row nobody asked for. A series' members are
    shown in their series (results/series/<name>/series.json: there, or asked for), never as rows."""
    listed = CFG["report"].get("rows")
    asked = set(listed) if listed is not None else requested("row")
    files = {
        path
        for series in CFG["series"]
        if (path := f"results/series/{series}/series.json") in PUBLISHED or series in requested("series")
    }
    for row in [r for r in PLAN.rows if not is_member(r)] if listed is None else listed:
        # a row without training (a published HuggingFace model) publishes only core.json
        names = [n for n in COMPANION if n == "core.json" or PLAN.rows[row].get("train")]
        if row in asked:
            files |= {f"results/{row}/{name}" for name in names}
        else:
            files |= {
                f"{under}/{row}/{name}" for under in ("results", "results/imported") for name in names
            } & PUBLISHED
    files |= {os.path.join(os.path.dirname(f), COMPANION[n]) for f in files if (n := os.path.basename(f)) in COMPANION}
    return sorted(files)
