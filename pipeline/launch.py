"""The command line that runs a train spec: the seed's flags, under torchrun when it uses >1 process.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=8 -m pipeline.train -- \\
        --depth=26 --device-batch-size=16 --target-param-data-ratio=8.5 --fp8 ... --spec '...'
"""

import json
import shlex


def flag_args(params, names=None):
    """Spec parameters (plus the run/model-tag names) as base_train-style `--flag=value` arguments."""
    args = []
    for key, value in {**(names or {}), **params}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args.append(f"{flag}={value}")
    return args


def train_argv(spec, inputs, out, work):
    """argv for `pipeline.train` (after the launcher)."""
    settings = spec["settings"]
    names = {k: settings[k] for k in ("run", "model_tag") if k in settings}
    return [*flag_args(spec["params"], names), "--spec", json.dumps(spec, sort_keys=True, separators=(",", ":")),
            "--inputs", *map(str, inputs), "--out", str(out), "--work", str(work)]


def device_type(spec):
    return spec["params"].get("device_type") or spec["settings"].get("device_type")


def launcher(spec, module="pipeline.train"):
    """One CPU process runs plainly; anything else goes through torchrun (one node, for now)."""
    nproc = spec["settings"]["launch"]["nproc_per_node"]
    if nproc == 1 and device_type(spec) == "cpu":
        return ["python", "-m", module]
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", module, "--"]


def gpus(spec):
    """GPUs a train or core job occupies (0 on CPU): what a profile's `resources: gpu=N` budgets."""
    if device_type(spec) == "cpu":
        return 0
    launch = spec["settings"]["launch"]
    return launch["nproc_per_node"] * launch["nodes"]


def train_command(spec, inputs, out, work):
    """The whole shell command for a train spec (OMP_NUM_THREADS=1 as nanochat runs it under torchrun)."""
    return _shell(launcher(spec) + train_argv(spec, inputs, out, work))


def core_command(spec, inputs, out, work):
    """The core stage's command: its items are split over the same processes as training."""
    argv = ["--spec", json.dumps(spec, sort_keys=True, separators=(",", ":")), "--inputs", *map(str, inputs),
            "--out", str(out), "--work", str(work)]
    return _shell(launcher(spec, "pipeline.core") + argv)


def _shell(cmd):
    prefix = "OMP_NUM_THREADS=1 " if cmd[0] == "torchrun" else ""
    return prefix + " ".join(shlex.quote(c) for c in cmd)
