"""The SLURM path: resources from the spec, the launch builder, the profiles, and a real one-node
SLURM on localhost (tests/slurm/slurm-localhost.sh) running the smoke row end to end."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import REPO, ShardServer, snakemake_cmd, unlocked, write_config
from pipeline import config, launch, plan, resources

SLURM_SCRIPTS = REPO / "tests" / "slurm"
# Snakemake's jobs run `python` from PATH: the venv running these tests, as for a user who activated it
ENV = {**os.environ, "WANDB_MODE": "disabled",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
SLURM_RULES = {"download": 2, "tokenizer": 1, "pretokenize": 2, "train": 1, "bundle": 1, "core": 1}


def row_spec(stage, row, **launch_settings):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["rows"][row].setdefault("launch", {}).update(launch_settings)
    p = plan.make_plan(config.check(cfg))
    return p.spec(stage, p.rows[row][stage][0])


def fake_scontrol(answers):
    """`run` for launch.slurm_hosts: answers keyed by the argv, and a record of the calls."""
    calls = []

    def run(argv):
        calls.append(argv)
        return answers[tuple(argv)]

    run.calls = calls
    return run


# --- launch builder ----------------------------------------------------------------------------------

def test_one_node_two_processes_is_a_standalone_torchrun():
    spec = row_spec("train", "d26_fp8", nproc_per_node=2)
    assert launch.launcher(spec) == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "pipeline.train", "--"]
    cmd = unlocked(launch.train_command(spec, ["in"], "out", "work", threads=16))
    assert cmd.startswith("OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m pipeline.train -- --run=")
    # the same geometry through the srun wrapper, as a one-node allocation would run it
    env = {"SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "localhost", "PATH": "/bin"}
    run = fake_scontrol({("scontrol", "show", "hostnames", "localhost"): "localhost\n"})
    argv, child_env = launch.multinode_argv(1, 2, "pipeline.train", ["--depth=26"], env, cpus_per_node=16, run=run)
    assert argv == ["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "--cpus-per-task=16", "torchrun", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=localhost:29500", "--rdzv_id=41", "--max_restarts=0", "-m", "pipeline.train",
                    "--", "--depth=26"]
    assert child_env == {**env, "OMP_NUM_THREADS": "1"} and "OMP_NUM_THREADS" not in env


def test_two_nodes_of_eight_meet_on_the_first_node():
    spec = row_spec("train", "d26_fp8", nodes=2)
    prefix = launch.launcher(spec, threads=64)
    assert prefix == ["python", "-m", "pipeline.launch", "multinode", "--nodes=2", "--nproc-per-node=8",
                      "--cpus-per-node=64", "--gpu", "-m", "pipeline.train", "--"]
    assert unlocked(launch.core_command(row_spec("core", "d26_fp8", nodes=2), ["i"], "o", "w", 64)).startswith(
        "python -m pipeline.launch multinode --nodes=2 --nproc-per-node=8 --cpus-per-node=64 --gpu -m pipeline.core --")

    # a hand-written sbatch script still has the node list in its environment
    env = {"SLURM_JOB_ID": "9001", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2"}
    run = fake_scontrol({("scontrol", "show", "hostnames", "gpu[07-08]"): "gpu07\ngpu08\n"})
    argv, child_env = launch.multinode_argv(2, 8, "pipeline.train", ["--fp8"], env, cpus_per_node=64, gpu=True,
                                            run=run)
    assert argv[:argv.index("torchrun")] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                             "--kill-on-bad-exit=1", "--cpus-per-task=64", "--gpus-per-node=8"]
    assert argv[argv.index("torchrun"):] == ["torchrun", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                                             "--rdzv_endpoint=gpu07:29500", "--rdzv_id=9001", "--max_restarts=0",
                                             "-m", "pipeline.train", "--", "--fp8"]
    assert child_env["OMP_NUM_THREADS"] == "1"

    # under the jobstep plugin only SLURM_JOB_ID survives: the node list comes from scontrol
    env = {"SLURM_JOB_ID": "9002"}
    run = fake_scontrol({
        ("scontrol", "show", "job", "--oneliner", "9002"): "JobId=9002 JobName=x NodeList=gpu[11,13] BatchHost=gpu11\n",
        ("scontrol", "show", "hostnames", "gpu[11,13]"): "gpu11\ngpu13\n"})
    argv, _ = launch.multinode_argv(2, 8, "pipeline.core", [], env, gpu=True, run=run)
    assert "--rdzv_endpoint=gpu11:29500" in argv and "--rdzv_id=9002" in argv
    assert [c[:3] for c in run.calls] == [["scontrol", "show", "job"], ["scontrol", "show", "hostnames"]]


def test_a_multinode_launch_refuses_outside_an_allocation_or_on_the_wrong_node_count():
    with pytest.raises(launch.LaunchError, match="inside a SLURM allocation"):
        launch.multinode_argv(2, 8, "pipeline.train", [], {"PATH": "/bin"})
    run = fake_scontrol({("scontrol", "show", "hostnames", "gpu07"): "gpu07\n"})
    with pytest.raises(launch.LaunchError, match="asks for 2 nodes but SLURM job 5 has 1 .gpu07."):
        launch.multinode_argv(2, 8, "pipeline.train", [], {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "gpu07"},
                              run=run)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, "-m", "pipeline.launch", "multinode", "--nodes=2", "--nproc-per-node=8",
                          "-m", "pipeline.train", "--", "--depth=26"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60)
    assert out.returncode == 2 and "inside a SLURM allocation" in out.stderr


def test_one_cpu_process_runs_plainly():
    spec = row_spec("train", "smoke")
    assert launch.launcher(spec) == ["python", "-m", "pipeline.train"]
    cmd = unlocked(launch.train_command(spec, [], "o", "w", threads=2))
    assert cmd.startswith("python -m pipeline.train --run=smoke")
    assert launch.launcher(row_spec("core", "smoke"), "pipeline.core") == ["python", "-m", "pipeline.core"]
    # CPU ranks on several nodes: the same srun + torchrun, without GPUs
    run = fake_scontrol({("scontrol", "show", "hostnames", "n[1-2]"): "n1\nn2\n"})
    argv, _ = launch.multinode_argv(2, 4, "pipeline.train", [], {"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "n[1-2]"},
                                    run=run)
    assert not [a for a in argv if a.startswith("--gpus")] and "--nproc_per_node=4" in argv


# --- resources ---------------------------------------------------------------------------------------

def test_resources_follow_the_rows_launch():
    spec = row_spec("train", "d26_fp8")
    train = resources.job("train", spec, resources.threads("train", spec))
    assert train == {"cpus_per_task": 64, "mem_mb": 192000, "runtime": 360, "nodes": 1, "gpu": 8, "gres": None,
                     "mpi": None, "tasks": None, "tasks_per_gpu": None}
    two = resources.job("train", row_spec("train", "d26_fp8", nodes=2), 64)
    assert two == {"cpus_per_task": 64, "mem_mb": 192000, "runtime": 180, "nodes": 2, "gpu": None, "gres": "gpu:8",
                   "mpi": "srun", "tasks": 2, "tasks_per_gpu": 0}
    four = resources.job("core", row_spec("core", "d26_fp8", nproc_per_node=4), 32)
    assert (four["gpu"], four["mem_mb"], four["runtime"]) == (4, 96000, 240)
    smoke = resources.job("train", row_spec("train", "smoke"), 2)
    assert smoke["gpu"] is None and smoke["nodes"] == 1 and smoke["mem_mb"] == 6000 and smoke["cpus_per_task"] == 2
    assert resources.threads("train", row_spec("train", "smoke")) == 8  # capped by --cores / the profile


def test_every_stage_of_every_row_has_resources():
    cfg = config.load(REPO / "config" / "config.yaml")
    p = plan.make_plan(cfg)
    for row, keys in p.rows.items():
        for stage in plan.STAGES:
            for key in keys.get(stage) or []:
                spec = p.spec(stage, key)
                res = resources.job(stage, spec, resources.threads(stage, spec))
                assert set(res) == set(resources.NAMES), (row, stage)
                assert res["mem_mb"] > 0 and res["runtime"] > 0 and res["cpus_per_task"] >= 1, (row, stage)
    tok_small = resources.job("tokenizer", row_spec("tokenizer", "smoke"), 2)["mem_mb"]
    tok_big = resources.job("tokenizer", row_spec("tokenizer", "d26_fp8"), 16)["mem_mb"]
    assert tok_small < 5000 < 30000 < tok_big  # sized by max_chars: 8M vs 2B characters


# --- fitting a job to the partition's nodes (what sinfo reports) -------------------------------------

SINFO = "gpu|32\ngpu|32\ngpu|24\ncpu*|8\ncpu*|0\ndebug|2\n"   # `sinfo --noheader --Node --format=%P|%c`


def test_sinfo_gives_each_partitions_biggest_node_and_the_default():
    assert resources.partition_cpus(SINFO) == ({"gpu": 32, "cpu": 8, "debug": 2}, "cpu")
    assert resources.partition_cpus("") == ({}, None)


def test_a_request_is_cut_to_the_biggest_node_of_its_partition():
    cpus, default = resources.partition_cpus(SINFO)
    assert resources.fit_cpus("train", 64, 8, "gpu", cpus, default) == 32
    assert resources.fit_cpus("tokenizer", 16, 1, None, cpus, default) == 8   # the default partition
    assert resources.fit_cpus("download", 2, 1, "gpu", cpus, default) == 2    # fits: unchanged


@pytest.mark.bad_input
def test_what_no_node_can_hold_stops_with_what_to_set():
    cpus, default = resources.partition_cpus(SINFO)
    spec = row_spec("train", "d26_fp8")
    assert resources.least_cpus("train", spec) == 8 and resources.least_cpus("tokenizer", spec) == 1
    with pytest.raises(resources.SlurmFitError) as e:
        resources.fit_cpus("train", 64, resources.least_cpus("train", spec), "debug", cpus, default)
    assert str(e.value) == ("rule train: needs at least 8 CPUs per node (one per GPU process) but the nodes of "
                            "partition 'debug' have at most 2 (sinfo): set default-resources: slurm_partition in "
                            "workflow/profiles/slurm/config.v8+.yaml to a partition with bigger nodes, or lower "
                            "the row's launch.nproc_per_node")
    with pytest.raises(resources.SlurmFitError, match=r"slurm_partition 'gpus' is not a partition sinfo knows "
                                                      r"\(cpu, debug, gpu\): set default-resources"):
        resources.fit_cpus("train", 64, 8, "gpus", cpus, default)
    with pytest.raises(resources.SlurmFitError, match="no default partition"):
        resources.fit_cpus("core", 8, 1, None, {"gpu": 32}, None)
    with pytest.raises(resources.SlurmFitError, match=r"rule train: .*: set set-resources: \{train: "
                                                      r"\{slurm_partition: \.\.\.\}\} in workflow/profiles/slurm"):
        resources.fit_cpus("train", 64, 8, "debug", cpus, default, per_rule=True)
    assert resources.fit_cpus("tokenizer", 8, 1, "gpu", cpus, default, fixed="set-threads") == 8  # fits: as set
    with pytest.raises(resources.SlurmFitError) as e:
        resources.fit_cpus("tokenizer", 64, 1, "gpu", cpus, default, fixed="set-threads")  # set, not cut
    assert str(e.value) == ("rule tokenizer: set-threads asks for 64 CPUs per node but the nodes of partition 'gpu' "
                            "have at most 32 (sinfo): set-threads: {tokenizer: 32} or fewer in "
                            "workflow/profiles/slurm/config.v8+.yaml (or --set-threads tokenizer=32)")
    with pytest.raises(resources.SlurmFitError) as e:
        resources.fit_cpus("pretokenize", 48, 1, "gpu", cpus, default, fixed="cpus_per_task")
    assert str(e.value) == ("rule pretokenize: set-resources' cpus_per_task asks for 48 CPUs per node but the nodes "
                            "of partition 'gpu' have at most 32 (sinfo): set-resources: {pretokenize: "
                            "{cpus_per_task: 32}} or fewer in workflow/profiles/slurm/config.v8+.yaml (or "
                            "--set-resources pretokenize:cpus_per_task=32)")


@pytest.mark.bad_input
def test_sinfo_that_cannot_answer_is_one_line():
    def failing(argv, **kw):
        assert argv == resources.SINFO_ARGV
        return SimpleNamespace(returncode=1, stdout="", stderr="slurm_load_partitions: Unable to contact slurm "
                                                                "controller (connect failure)")

    with pytest.raises(resources.SlurmFitError, match="Unable to contact slurm controller"):
        resources.slurm_partitions(run=failing)

    def missing(argv, **kw):
        raise FileNotFoundError(2, "No such file or directory", "sinfo")

    with pytest.raises(resources.SlurmFitError, match="run Snakemake where sinfo works"):
        resources.slurm_partitions(run=missing)
    answering = resources.slurm_partitions(run=lambda argv, **kw: SimpleNamespace(returncode=0, stdout=SINFO))
    assert answering == ({"gpu": 32, "cpu": 8, "debug": 2}, "cpu")


class _Resources(dict):
    """Snakemake's job.resources as the plugin reads it: .get() and attributes, unset names absent."""

    __getattr__ = dict.__getitem__


def sbatch_line(res, threads):
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_Resources({k: v for k, v in res.items() if v is not None}), threads=threads)
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "",
              "workdir": "/w"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_the_plugin_turns_them_into_the_intended_sbatch_options():
    """Checked against snakemake-executor-plugin-slurm 2.8.0 itself, not against what its docs say."""
    one = sbatch_line(resources.job("train", row_spec("train", "d26_fp8"), 64), 64)
    assert " --mem 192000" in one and " -t 360" in one and " --nodes=1" in one and " --cpus-per-task=64" in one
    assert one.endswith(" --gpus=8") and "--ntasks" not in one and "--gres" not in one
    two = sbatch_line(resources.job("train", row_spec("train", "d26_fp8", nodes=2), 64), 64)
    assert " --nodes=2" in two and " --ntasks=2" in two and two.endswith(" --gres=gpu:8")
    assert "--ntasks-per-gpu" not in two and "--gpus" not in two  # tasks_per_gpu=0 keeps one task per node
    cpu = sbatch_line(resources.job("pretokenize", row_spec("pretokenize", "smoke"), 2), 2)
    assert " --ntasks=1" in cpu and " --cpus-per-task=2" in cpu and " --mem 5000" in cpu and "gpu" not in cpu


# --- Snakemake with the profiles ---------------------------------------------------------------------

def job_blocks(out):
    """{rule: [(threads, resources line, shell command)]} of a dry run printed with -p."""
    blocks = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):\n(.*?)(?=^\[|\Z)", out, re.M | re.S):
        body = m.group(2)
        res = re.search(r"^\s+resources: (.*)$", body, re.M)
        threads = re.search(r"^\s+threads: (\d+)$", body, re.M)
        shell = re.search(r"^Shell command: (.*)$", body, re.M)
        blocks.setdefault(m.group(1), []).append((int(threads.group(1)) if threads else 1, res and res.group(1),
                                                  shell and shell.group(1)))
    return blocks


def slurm_dry_run(workdir, cfg):
    """`snakemake -n -p --profile workflow/profiles/slurm` for d26_fp8's core.json under `cfg`."""
    write_config(workdir, cfg)
    out = subprocess.run(snakemake_cmd(workdir, "-n", "-p", "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
                                       "results/d26_fp8/core.json", cores=None),
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def assert_resources(res, *items):
    """Each `name=value` is one whole entry of a job's printed resources."""
    for item in items:
        assert re.search(rf"(^|, ){item}(,|$)", res), (item, res)


@pytest.mark.slow
def test_dry_run_with_the_slurm_profile_plans_eight_gpus_for_training(tmp_path, repo_config):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    out = slurm_dry_run(tmp_path, repo_config)
    text = out.stdout + out.stderr
    assert "Using profiles" in text and "workflow/profiles/slurm" in text
    blocks = job_blocks(out.stdout)
    ((threads, res, shell),) = blocks["train"]
    assert threads == 64
    assert_resources(res, "cpus_per_task=64", "runtime=360", "nodes=1", "gpu=8", "mem_mb=192000")
    assert "mpi=" not in res and "gres=" not in res
    shell = unlocked(shell)
    assert shell.startswith("OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 -m pipeline.train --")
    ((_, core, _),) = blocks["core"]
    assert "gpu=8" in core and "runtime=120" in core
    # 37 blocks for train shards 0-368, the row's validation shard 369 (-n 370's last), and 1822 for the
    # tokenizer's compression figures (the dataset's own last shard, shared by every row on it)
    assert len(blocks["download"]) == 37 + 2 and all("gpu" not in r for _, r, _ in blocks["download"])


@pytest.mark.slow
def test_dry_run_of_a_two_node_row_plans_one_task_per_node_and_the_srun_wrapper(tmp_path, repo_config):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["d26_fp8"]["launch"] = {"nodes": 2, "nproc_per_node": 8}
    ((_, res, shell),) = job_blocks(slurm_dry_run(tmp_path, cfg).stdout)["train"]
    assert_resources(res, "nodes=2", "gres=gpu:8", "mpi=srun", "tasks=2", "tasks_per_gpu=0", "runtime=180")
    assert unlocked(shell).startswith("python -m pipeline.launch multinode --nodes=2 --nproc-per-node=8 "
                                      "--cpus-per-node=64 --gpu -m pipeline.train -- --run=d26-feb2-fp8")


LOCAL_GPU_SNAKEFILE = '''
rule all:
    input: "a.txt", "b.txt"

rule gpu_job:
    output: "{name}.txt"
    resources: gpu=8
    shell: "date +%s.%N > {output}; sleep 1.5; date +%s.%N >> {output}"
'''


@pytest.mark.slow
def test_the_local_profile_never_runs_two_eight_gpu_jobs_at_once(tmp_path):
    (tmp_path / "Snakefile").write_text(LOCAL_GPU_SNAKEFILE)
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(tmp_path / "Snakefile"),
                          "--directory", str(tmp_path), "--profile", str(REPO / "workflow" / "profiles" / "local")],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (a0, a1), (b0, b1) = ([float(x) for x in (tmp_path / f"{n}.txt").read_text().split()] for n in "ab")
    assert a1 <= b0 or b1 <= a0, "both 8-GPU jobs ran at the same time"
    # without the profile's gpu budget, Snakemake would have started them together
    for n in "ab":
        (tmp_path / f"{n}.txt").unlink()
    free = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(tmp_path / "Snakefile"),
                           "--directory", str(tmp_path), "--cores", "2"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert free.returncode == 0, free.stderr[-2000:]
    (a0, a1), (b0, b1) = ([float(x) for x in (tmp_path / f"{n}.txt").read_text().split()] for n in "ab")
    assert not (a1 <= b0 or b1 <= a0)


# --- a real SLURM on localhost -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM on this machine, started (and installed, if missing) by tests/slurm/slurm-localhost.sh.

    Skipped only where the script cannot work at all (not root, no apt); if it can and fails, the tests fail."""
    if os.geteuid() != 0:
        pytest.skip("a localhost SLURM cluster needs root (tests/slurm/slurm-localhost.sh starts munge, slurmctld "
                    "and slurmd)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no SLURM packages and no apt-get to install them (Debian: munge slurmctld slurmd slurm-client)")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    was_up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    start = subprocess.run([str(SLURM_SCRIPTS / "slurm-localhost.sh")], capture_output=True, text=True, timeout=900)
    if start.returncode != 0:
        pytest.fail(f"tests/slurm/slurm-localhost.sh could not start SLURM:\n{start.stdout}\n{start.stderr}")
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    yield {"cpus": cpus}
    if not was_up:
        subprocess.run([str(SLURM_SCRIPTS / "slurm-localhost-stop.sh")], capture_output=True, timeout=120)


def squeue_all():
    """{job id: (state, comment)} of every job SLURM still remembers (MinJobAge=3600 keeps finished ones)."""
    out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True,
                         check=True).stdout
    return {i: (state, comment) for i, state, comment in (line.split("|", 2) for line in out.splitlines())}


@pytest.mark.slow
def test_smoke_row_runs_through_slurm_and_matches_the_local_run(slurm_cluster, tmp_path, smoke_run):
    """Every heavy job is an sbatch job (an id, a SLURM log, COMPLETED in squeue); the light ones stay local;
    core.json is byte for byte the local run's (the smoke_run fixture). Both runs use 2 threads per job (the
    node's CPUs and the local --cores), so CPU training computes the same numbers."""
    local_dir, slurm_dir = smoke_run["dir"], tmp_path / "slurm"
    slurm_dir.mkdir()
    cfg = copy.deepcopy(smoke_run["cfg"])
    cores = str(min(2, slurm_cluster["cpus"]))
    with ShardServer(REPO / "tests" / "fixtures" / "webtext") as server:
        cfg["datasets"]["webtext"]["base_url"] = server.url
        write_config(slurm_dir, cfg)
        # SIGTERM does not stop a Snakemake waiting on SLURM jobs: timeout -k
        slurm = subprocess.run(
            ["timeout", "-k", "10", "420", *snakemake_cmd(
                slurm_dir, "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
                # no slurmdbd here, so no sacct; squeue sees finished jobs for MinJobAge (3600 s)
                "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5",
                "--seconds-between-status-checks", "3", "results/smoke/core.json", cores=cores)],
            capture_output=True, text=True, env=ENV)
    log = slurm.stdout + slurm.stderr
    assert slurm.returncode == 0, log[-4000:]
    assert smoke_run["first"].returncode == 0, smoke_run["first"].stderr[-3000:]

    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", log)
    by_rule = {}
    for job_id, slurm_log in submitted:
        rule = re.search(r"slurm_logs/rule_(\w+)/", slurm_log).group(1)
        by_rule.setdefault(rule, []).append((job_id, Path(slurm_log)))
    assert {r: len(v) for r, v in by_rule.items()} == SLURM_RULES
    seen = squeue_all()
    for rule, jobs in by_rule.items():
        for job_id, slurm_log in jobs:
            assert slurm_log.name == f"{job_id}.log" and slurm_log.is_file()
            assert f"--allowed-rules {rule}" in slurm_log.read_text()  # the job ran that rule's step
            state, comment = seen[job_id]
            assert state == "COMPLETED" and comment.startswith(f"rule_{rule}_wildcards_"), (job_id, state, comment)
    for light in ("publish_row",):
        assert re.search(rf"^localrule {light}:", log, re.M)

    local_core = (local_dir / "results" / "smoke" / "core.json").read_bytes()
    assert (slurm_dir / "results" / "smoke" / "core.json").read_bytes() == local_core
    core = json.loads(local_core)
    assert core["tasks_evaluated"] == 18 and core["partial"]
    # the same store keys, so the same work was done
    def store_keys(root):
        return {p.relative_to(root) for p in root.glob("results/store/*/*")}

    assert store_keys(local_dir) == store_keys(slurm_dir)


@pytest.mark.slow
def test_the_multinode_wrapper_starts_torchrun_through_srun_for_real(slurm_cluster, tmp_path):
    """One node, two CPU ranks, through the same srun + c10d command a multi-node row gets, with the node
    list found through scontrol as under the jobstep plugin (SLURM_JOB_NODELIST removed)."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(SLURM_SCRIPTS)]),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    wrapped = (f"env -u SLURM_JOB_NODELIST -u SLURM_NODELIST {sys.executable} -m pipeline.launch multinode "
               f"--nodes=1 --nproc-per-node=2 --cpus-per-node={min(2, slurm_cluster['cpus'])} --port=29533 -m ranks")
    out = subprocess.run(["timeout", "-k", "10", "180", "sbatch", "--wait", "--parsable", "-N1", "-n1",
                          f"--cpus-per-task={min(2, slurm_cluster['cpus'])}", "--mem=2000", "-t", "5",
                          "-o", str(tmp_path / "%j.out"), "-D", str(tmp_path), "--wrap", wrapped],
                         capture_output=True, text=True, env=env)
    job_id = out.stdout.strip().split(";")[0]
    text = (tmp_path / f"{job_id}.out").read_text() if job_id else ""
    assert out.returncode == 0, out.stderr + text
    assert "pipeline.launch: srun --nodes=1 --ntasks=1 --ntasks-per-node=1" in text
    assert f"--rdzv_endpoint=localhost:29533 --rdzv_id={job_id}" in text
    assert sorted(re.findall(r"rank (\d)/2 sum=1 OMP_NUM_THREADS=1", text)) == ["0", "1"], text


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_partition_sinfo_does_not_know_stops_the_run_before_anything_is_submitted(slurm_cluster, tmp_path):
    """The wiring: under the SLURM executor, each job's CPUs go through sinfo before sbatch; a wrong
    slurm_partition (the profile's, or a rule's own), or a set-threads or cpus_per_task no node can hold, ends
    the run with the one line that says what to set, and no job reaches SLURM."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["webtext"]["base_url"] = str(REPO / "tests" / "fixtures" / "webtext")
    write_config(tmp_path, cfg)
    # the shipped profile with its partition line filled in, as a user would
    profile = tmp_path / "profile"
    profile.mkdir()
    shipped = (REPO / "workflow" / "profiles" / "slurm" / "config.v8+.yaml").read_text()
    assert "  # slurm_partition: gpu\n" in shipped
    before = set(squeue_all())

    def stopped_with(profile_text):
        """What Snakemake printed, run on the profile `profile_text`; it must stop with nothing submitted
        (jobs of earlier tests may leave the queue meanwhile, none of this run's may join it)."""
        (profile / "config.v8+.yaml").write_text(profile_text)
        out = subprocess.run(
            ["timeout", "-k", "10", "120", *snakemake_cmd(
                tmp_path, "--profile", str(profile), "--slurm-status-command", "squeue",
                "results/smoke/token_shards.json", cores=None)],
            capture_output=True, text=True, env=ENV)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "submitted with SLURM jobid" not in text and set(squeue_all()) <= before
        return text

    text = stopped_with(shipped.replace("  # slurm_partition: gpu\n", "  slurm_partition: no_such_queue\n"))
    assert "slurm_partition 'no_such_queue' is not a partition sinfo knows" in text, text[-3000:]
    assert "set default-resources: slurm_partition in workflow/profiles/slurm/config.v8+.yaml" in text
    # one rule's own partition (set-resources) is the one fitted, and the fix names that line
    text = stopped_with(shipped + "set-resources:\n  download:\n    slurm_partition: its_own\n")
    assert "rule download: slurm_partition 'its_own' is not a partition sinfo knows" in text, text[-3000:]
    assert "set set-resources: {download: {slurm_partition: ...}}" in text
    # a user's set-threads bypasses the fit: it is checked instead, and the fix names that line
    text = stopped_with(shipped + "set-threads:\n  download: 64\n")
    assert "rule download: set-threads asks for 64 CPUs per node but the nodes of partition" in text, text[-3000:]
    assert "set-threads: {download: " in text
    # and so is a set-resources' cpus_per_task, which is what sbatch gets
    text = stopped_with(shipped + "set-resources:\n  download:\n    cpus_per_task: 64\n")
    assert "rule download: set-resources' cpus_per_task asks for 64 CPUs per node but" in text, text[-3000:]
    assert "set-resources: {download: {cpus_per_task: " in text
