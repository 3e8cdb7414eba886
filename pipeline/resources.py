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
"""

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
