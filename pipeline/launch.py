"""The command line that runs a train (or core) spec: the seed's flags, under torchrun when it uses >1 process.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 -m pipeline.train -- \\
        --depth=26 --device-batch-size=16 --target-param-data-ratio=8.5 --fp8 ... --spec '...'

A row with `launch: {nodes: 2}` cannot know its hosts when Snakemake plans the job, so its command is
`python -m pipeline.launch multinode ... -m pipeline.train -- <flags>`: on the job's first node it reads
the allocation (SLURM_JOB_ID, and the node list from SLURM_JOB_NODELIST or, where the jobstep plugin
removed that, from `scontrol show job`) and execs

    srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ... torchrun --nnodes=2 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=<first node>:29500 --rdzv_id=<job id> -m pipeline.train -- ...
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys


def after_separator(argv):
    """The arguments after a leading `--`: torchrun (and our own wrappers) hand the separator on to the module."""
    argv = list(argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def compact_json(obj):
    """A spec (or a flag's dict) on one command line: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def flag_args(params, names=None):
    """Spec parameters (plus the run/model-tag names) as base_train-style `--flag=value` arguments."""
    args = []
    for key, value in {**(names or {}), **params}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, dict):  # --knobs: a row's recipe overrides, as compact JSON
            args.append(f"{flag}={compact_json(value)}")
        elif value is not False and value is not None:
            args.append(f"{flag}={value}")
    return args


# base_train flags that only name a run (wandb's name, the checkpoint's tag): kept in a train spec's settings,
# not its key, since renaming a run must not retrain it
NAME_FLAGS = ("run", "model_tag")


def run_names(spec):
    """A train spec's name flags, as flag_args takes them."""
    return {k: spec["settings"][k] for k in NAME_FLAGS if k in spec["settings"]}


def train_argv(spec, inputs, out, work):
    """argv for `pipeline.train` (after the launcher)."""
    return [*flag_args(spec["params"], run_names(spec)), "--spec", compact_json(spec), "--inputs",
            *map(str, inputs), "--out", str(out), "--work", str(work)]


def device_type(spec):
    return spec["params"].get("device_type") or spec["settings"].get("device_type")


def launcher(spec, module="pipeline.train", threads=None):
    """One CPU process runs plainly; one node runs torchrun --standalone; several nodes go through the
    `multinode` wrapper below, which finds the hosts at run time. `threads`: CPUs per node of the job."""
    launch = spec["settings"]["launch"]
    nproc, nodes = launch["nproc_per_node"], launch["nodes"]
    if nodes > 1:
        cpus = [f"--cpus-per-node={threads}"] if threads else []
        gpu = ["--gpu"] if device_type(spec) != "cpu" else []
        return ["python", "-m", "pipeline.launch", "multinode", f"--nodes={nodes}", f"--nproc-per-node={nproc}",
                *cpus, *gpu, "-m", module, "--"]
    if nproc == 1 and device_type(spec) == "cpu":
        return ["python", "-m", module]
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", module, "--"]


def gpus(spec):
    """GPUs a train or core job occupies (0 on CPU): what a profile's `resources: gpu=N` budgets."""
    if device_type(spec) == "cpu":
        return 0
    launch = spec["settings"]["launch"]
    return launch["nproc_per_node"] * launch["nodes"]


def stage_command(spec, inputs, out, work, threads=1):
    """The command of a one-process stage (download, tokenizer, pretokenize, bundle), as its rule runs it."""
    argv = ["python", "-m", f"pipeline.{spec['stage']}", "--spec", compact_json(spec), "--out", str(out),
            "--work", str(work), *(["--inputs", *map(str, inputs)] if inputs else [])]
    if spec["stage"] == "bundle":  # one file, one thread
        return _shell(argv)
    # rustbpe's pool, which the tokenizer's training sizes from its environment
    prefix = f"RAYON_NUM_THREADS={threads} " if spec["stage"] == "tokenizer" else ""
    return prefix + _shell([*argv, "--threads", str(threads)])


def train_command(spec, inputs, out, work, threads=None):
    """The whole shell command for a train spec (OMP_NUM_THREADS=1 as nanochat runs it under torchrun)."""
    return _shell(locked(spec, out, work, launcher(spec, threads=threads) + train_argv(spec, inputs, out, work)))


def core_command(spec, inputs, out, work, threads=None):
    """The core stage's command: its items are split over the same processes as training."""
    argv = ["--spec", compact_json(spec), "--inputs", *map(str, inputs), "--out", str(out), "--work", str(work)]
    command = _shell(locked(spec, out, work, launcher(spec, "pipeline.core", threads=threads) + argv))
    if "hf_model" not in spec["params"]:
        return command
    # a HuggingFace model is fetched (or found missing, in one line) before torchrun starts, whose own
    # traceback would otherwise follow any rank's failure; grouped so that the rule's redirect takes both
    return f"({_shell(['python', '-m', 'pipeline.hf', 'fetch', spec['params']['hf_model']])} && {command})"


def locked(spec, out, work, cmd):
    """`cmd` under the key's lock (pipeline.keylock): one holder for all the ranks it starts."""
    return ["python", "-m", "pipeline.keylock", "--work", str(work), "--name", f"{spec['stage']}-{spec['key']}",
            "--done", os.path.join(str(out), "manifest.json"), "--", *cmd]


def _shell(cmd):
    # the multinode wrapper sets it itself, for the torchruns it starts on every node
    prefix = "OMP_NUM_THREADS=1 " if "torchrun" in cmd else ""
    return prefix + " ".join(shlex.quote(c) for c in cmd)


# --- several nodes: built on the job's first node, from the allocation --------------------------------

RDZV_PORT = 29500


class LaunchError(RuntimeError):
    pass


def _run(argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def slurm_hosts(env, run=_run):
    """(job id, host names) of the SLURM allocation described by `env`; `run(argv) -> stdout` runs scontrol.

    The jobstep plugin keeps only SLURM_JOB_ID (and a few ids) in a job's environment, so the node list
    comes from `scontrol show job` unless SLURM_JOB_NODELIST survived (a hand-written sbatch script)."""
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise LaunchError("a multi-node launch runs inside a SLURM allocation (no SLURM_JOB_ID in the "
                          "environment); submit it with the slurm profile, or set launch.nodes: 1")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        m = re.search(r"(?:^|\s)NodeList=(\S+)", run(["scontrol", "show", "job", "--oneliner", job_id]))
        if not m or m.group(1) == "(null)":
            raise LaunchError(f"scontrol names no nodes for SLURM job {job_id}")
        nodelist = m.group(1)
    hosts = run(["scontrol", "show", "hostnames", nodelist]).split()
    if not hosts:
        raise LaunchError(f"scontrol expands node list {nodelist!r} to no hosts")
    return job_id, hosts


def multinode_argv(nodes, nproc, module, args, env, *, cpus_per_node=None, gpu=False, run=_run, port=RDZV_PORT):
    """(argv, environment) that start one torchrun per node of the allocation, meeting at the first node."""
    job_id, hosts = slurm_hosts(env, run)
    if len(hosts) != nodes:
        raise LaunchError(f"the row asks for {nodes} nodes but SLURM job {job_id} has {len(hosts)} "
                          f"({', '.join(hosts)}); give the rule `nodes={nodes}` (pipeline.resources does)")
    step = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cpus_per_node:
        step.append(f"--cpus-per-task={cpus_per_node}")  # a step's tasks otherwise get one CPU each
    if gpu:
        step.append(f"--gpus-per-node={nproc}")
    torchrun = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={hosts[0]}:{port}", f"--rdzv_id={job_id}", "--max_restarts=0", "-m", module, "--"]
    return step + torchrun + list(args), {**env, "OMP_NUM_THREADS": "1"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch",
                                     description="Run a module under torchrun on every node of this SLURM job.")
    sub = parser.add_subparsers(dest="command", required=True)
    multi = sub.add_parser("multinode", help="srun + torchrun (c10d rendezvous on the first node)")
    multi.add_argument("--nodes", type=int, required=True)
    multi.add_argument("--nproc-per-node", type=int, required=True)
    multi.add_argument("--cpus-per-node", type=int)
    multi.add_argument("--gpu", action="store_true", help="give each node's torchrun its node's GPUs")
    multi.add_argument("--port", type=int, default=RDZV_PORT)
    multi.add_argument("-m", dest="module", required=True)
    multi.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's arguments")
    ns = parser.parse_args(argv)
    args = after_separator(ns.args)
    try:
        cmd, env = multinode_argv(ns.nodes, ns.nproc_per_node, ns.module, args, dict(os.environ),
                                  cpus_per_node=ns.cpus_per_node, gpu=ns.gpu, port=ns.port)
    except (LaunchError, subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"pipeline.launch: {e}", file=sys.stderr)
        return 2
    print("pipeline.launch:", " ".join(shlex.quote(c) for c in cmd[:cmd.index("--")]), "-- ...", file=sys.stderr,
          flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
