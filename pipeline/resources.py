"""What a stage's job asks of a scheduler, derived from its spec, so one profile serves every row.

The names are Snakemake resources as snakemake-executor-plugin-slurm (2.8.0) reads them; the local
executor only counts `gpu` (against a profile's `resources: gpu=N`), `mem_mb` and the threads.

    threads        CPUs of the job (per node); capped by `--cores` locally, by `max-threads` on SLURM
    cpus_per_task  the same number, for sbatch's --cpus-per-task
    mem_mb         memory per node (--mem)
    runtime        wall-clock limit in minutes (-t)
    nodes          --nodes
    gpu            GPUs of a one-node job (--gpus, a total; SLURM may spread a total over nodes, so a
                   multi-node job asks per node instead:)
    gres           gpu:<nproc_per_node> per node (--gres) for a multi-node job
    mpi, tasks, tasks_per_gpu
                   multi-node only: with `mpi` set the jobstep plugin runs the command in the batch
                   step instead of under `srun -n1`, so pipeline.launch can start one torchrun per
                   node with its own srun; `tasks` = nodes is the one task per node that srun fills,
                   and tasks_per_gpu=0 stops the plugin from turning it into --ntasks-per-gpu.

A value of None leaves the resource unset (Snakemake drops it), which is how a one-node job avoids
declaring `mpi`: the jobstep plugin looks at whether the key exists, not at its value.

On SLURM, the threads are also fitted to the partition's nodes (`fit_cpus`, from what `sinfo` says)
before anything is submitted: sbatch would refuse a job asking for more CPUs than any node has with
only "More processors requested than permitted".
"""

import subprocess

from pipeline import launch

NAMES = ("cpus_per_task", "mem_mb", "runtime", "nodes", "gpu", "gres", "mpi", "tasks", "tasks_per_gpu")

# Per GPU: data loader and host-side work; 8xH100 nodes have 12-28 cores and >=1 TB per 8 GPUs.
CPUS_PER_GPU = 8
HOST_MEM_MB_PER_GPU = 24000
# Wall-clock budget of an 8-GPU job (leaderboard rows train in ~3 h on 8 H100s, evaluate in minutes),
# scaled by 8 / GPUs so a 1-node 4-GPU row or a 2-node row gets a fitting limit.
TRAIN_MINUTES_AT_8_GPUS = 6 * 60
CORE_MINUTES_AT_8_GPUS = 2 * 60


def threads(stage, spec):
    """CPUs a stage would like; Snakemake caps them (--cores, --max-threads) before `job` sees them."""
    if stage in ("train", "core"):
        return CPUS_PER_GPU * spec["settings"]["launch"]["nproc_per_node"] if launch.gpus(spec) else 8
    return {"download": 2, "tokenizer": 16, "pretokenize": 8, "bundle": 1}[stage]


def job(stage, spec, threads):
    """Every resource of NAMES for one job, given its threads after Snakemake's caps."""
    res = dict.fromkeys(NAMES)
    res.update(cpus_per_task=threads, nodes=1)
    if stage == "download":
        res.update(mem_mb=2000, runtime=120)
    elif stage == "bundle":
        res.update(mem_mb=2000, runtime=60)
    elif stage == "tokenizer":
        # rustbpe holds the text and its pair counts: ~14 bytes per character of training text
        res.update(mem_mb=4000 + spec["params"]["max_chars"] * 14 // 1_000_000, runtime=60)
    elif stage == "pretokenize":
        res.update(mem_mb=2000 + 1500 * threads, runtime=120)  # one parquet shard in flight per thread
    elif stage in ("train", "core"):
        res.update(_accelerated(stage, spec, threads))
    else:
        raise ValueError(f"no resources for stage {stage!r}")
    return res


def _accelerated(stage, spec, threads):
    nodes, nproc = spec["settings"]["launch"]["nodes"], spec["settings"]["launch"]["nproc_per_node"]
    gpus = launch.gpus(spec)
    if not gpus:  # a CPU row
        return {"mem_mb": 4000 + 1000 * threads, "runtime": 60}
    minutes = TRAIN_MINUTES_AT_8_GPUS if stage == "train" else CORE_MINUTES_AT_8_GPUS
    res = {"mem_mb": HOST_MEM_MB_PER_GPU * nproc, "runtime": max(30, minutes * 8 // gpus), "nodes": nodes}
    if nodes == 1:
        res["gpu"] = nproc
    else:
        res.update(gres=f"gpu:{nproc}", mpi="srun", tasks=nodes, tasks_per_gpu=0)
    return res


# ----------------------------------------------------------------------------- fitting a job to SLURM's nodes

# One line per node and partition: the partition's name (sinfo marks the default one with *), the node's CPUs.
SINFO_ARGV = ["sinfo", "--noheader", "--Node", "--format=%P|%c"]
PROFILE = "workflow/profiles/slurm/config.v8+.yaml"


class SlurmFitError(Exception):
    """A job that no node of its partition can hold, or a partition SLURM does not know: one line, with the fix."""


def partition_cpus(sinfo_text):
    """({partition: CPUs of its biggest node}, default partition or None) from the output of SINFO_ARGV."""
    cpus, default = {}, None
    for line in sinfo_text.splitlines():
        if not line.strip():
            continue
        name, _, count = line.strip().partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        # a node that is down may report its CPUs as "0"; it simply adds nothing
        cpus[name] = max(cpus.get(name, 0), int(count.rstrip("+")))
    return cpus, default


def least_cpus(stage, spec):
    """The fewest CPUs per node a job can run on: one per GPU process for training and CORE, else one."""
    if stage in ("train", "core") and launch.gpus(spec):
        return spec["settings"]["launch"]["nproc_per_node"]
    return 1


def fit_cpus(rule, wanted, least, partition, cpus, default, per_rule=False, fixed=None):
    """CPUs per node to ask SLURM for: `wanted`, cut to what the partition's biggest node has; a
    SlurmFitError when the partition is unknown or even `least` would not fit, since sbatch would
    otherwise refuse with only "More processors requested than permitted". `per_rule`: the partition came
    from the rule's own set-resources, so the fix names that line. `fixed`: the user set the CPUs
    ("set-threads", or "cpus_per_task" in set-resources), so they are not cut but checked."""
    where = (f"set set-resources: {{{rule}: {{slurm_partition: ...}}}} in {PROFILE} (or --set-resources)" if per_rule
             else f"set default-resources: slurm_partition in {PROFILE}")
    name = partition or default
    if name is None:
        raise SlurmFitError(f"rule {rule}: SLURM has no default partition (sinfo marks none with *): {where}")
    if name not in cpus:
        raise SlurmFitError(f"rule {rule}: slurm_partition {name!r} is not a partition sinfo knows "
                            f"({', '.join(sorted(cpus)) or 'none'}): {where} to one of them")
    most = cpus[name]
    if most < least:
        raise SlurmFitError(f"rule {rule}: needs at least {least} CPUs per node (one per GPU process) but the "
                            f"nodes of partition {name!r} have at most {most} (sinfo): {where} to a partition "
                            f"with bigger nodes, or lower the row's launch.nproc_per_node")
    if fixed and wanted > most:
        said, fix = {
            "set-threads": ("set-threads", f"set-threads: {{{rule}: {most}}} or fewer in {PROFILE} (or "
                                           f"--set-threads {rule}={most})"),
            "cpus_per_task": ("set-resources' cpus_per_task", f"set-resources: {{{rule}: {{cpus_per_task: {most}}}}} "
                                                              f"or fewer in {PROFILE} (or --set-resources "
                                                              f"{rule}:cpus_per_task={most})"),
        }[fixed]
        raise SlurmFitError(f"rule {rule}: {said} asks for {wanted} CPUs per node but the nodes of partition "
                            f"{name!r} have at most {most} (sinfo): {fix}")
    return min(wanted, most)


def slurm_partitions(run=subprocess.run):
    """partition_cpus of this cluster, asked of sinfo; a SlurmFitError if sinfo cannot answer."""
    try:
        out = run(SINFO_ARGV, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmFitError(f"cannot ask SLURM for its partitions ({' '.join(SINFO_ARGV)}: {e}); run Snakemake "
                            "where sinfo works (the submit host)") from None
    if out.returncode != 0:
        raise SlurmFitError(f"cannot ask SLURM for its partitions ({' '.join(SINFO_ARGV)}: "
                            f"{out.stderr.strip() or 'exit ' + str(out.returncode)})")
    return partition_cpus(out.stdout)
