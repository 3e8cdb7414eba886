"""Derived values side by side: what nanochat's own base_train derives for a row (at the row's recipe
commit, with the row's flags) against `python -m pipeline.plan show --row X --resolved`.

    .venv/bin/python bench/nanochat_derived.py --nanochat /tmp/nanochat-348fbb3 --row d24_jan29 \\
        --nanochat-python /path/to/venv/bin/python --base-dir results/fidelity/348fbb3/nanochat_base

nanochat runs unmodified on the CPU (--device-type=cpu; it ignores --fp8 there) until its training loop
asks for the validation loader at step 0; there a wrapper reads its variables (steps, total batch,
Muon's weight decay, eval tokens) and its optimizer's param groups (each lr, betas, weight decay), and
stops it. It builds the model at full size first (d26: ~7 GB of RAM, a minute). The base dir must hold a
tokenizer of the row's vocab size (bench/fidelity.py's nanochat_base has a 32768 one) and some shards.
Every value must be equal, as floats, not approximately.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline import launch, plan, recipe  # noqa: E402

# base_train flags of a row that nanochat takes as they are (the rest are the pipeline's own)
NANOCHAT_FLAGS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "num_iterations",
                  "target_flops", "target_param_data_ratio", "device_batch_size", "total_batch_size", "embedding_lr",
                  "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "adam_beta1", "adam_beta2",
                  "warmup_ratio", "warmup_steps", "warmdown_ratio", "final_lr_frac", "eval_tokens", "fp8")

# Runs inside nanochat's python: stops base_train at its first validation loader, dumping what it derived.
WRAPPER = r'''
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import nanochat.dataloader as dl
def stop(*args, **kwargs):
    g = sys._getframe(1).f_globals  # base_train's module globals: what it derived, under its own names
    batch = g.get("total_batch_size", g["args"].total_batch_size)
    groups = [{"kind": p["kind"], "lr": p["initial_lr"], "betas": list(p.get("betas") or []),
               "weight_decay": p["weight_decay"], "beta2": p.get("beta2"),
               "names": [n for n, q in g["orig_model"].named_parameters() if any(q is x for x in p["params"])]}
              for p in g["optimizer"].param_groups]
    json.dump({"num_iterations": g["num_iterations"], "total_batch_size": batch,
               "weight_decay": g["weight_decay_scaled"], "eval_tokens": g["args"].eval_tokens,
               "flops_per_token": g["num_flops_per_token"], "groups": groups}, open(os.environ["DERIVED_OUT"], "w"))
    sys.exit(0)
dl.tokenizing_distributed_data_loader_bos_bestfit = stop
sys.argv = ["scripts/base_train.py", *sys.argv[1:]]
runpy.run_module("scripts.base_train", run_name="__main__")
'''
GROUPS = {"lm_head.weight": "lm_head", "transformer.wte.weight": "wte", "value_embeds": "value_embeds",
          "resid_lambdas": "resid_lambdas", "x0_lambdas": "x0_lambdas", "smear_gate.weight": "smear"}


def nanochat_derives(args, row):
    flags = launch.flag_args({k: v for k, v in row["train"].items() if k in NANOCHAT_FLAGS})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "derived.json"
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(args.base_dir.resolve()), "WANDB_MODE": "disabled",
               "DERIVED_OUT": str(out), "PYTHONPATH": str(args.nanochat)}
        proc = subprocess.run([args.nanochat_python, "-c", WRAPPER, *flags, "--device-type=cpu", "--run=dummy",
                               "--core-metric-every=-1", "--sample-every=-1"], cwd=args.nanochat, env=env,
                              capture_output=True, text=True)
        if not out.exists():
            sys.exit(f"nanochat's base_train stopped before deriving its values:\n{proc.stdout[-3000:]}"
                     f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def ours_vs(theirs, ours):
    """[(value, nanochat's, ours, equal)] for every value both derive."""
    lrs = {next(GROUPS[k] for k in GROUPS if any(n.startswith(k) for n in g["names"])): g for g in theirs["groups"]
           if g["kind"] == "adamw"}  # named by any of its parameters (their order is the model's, not the group's)
    muon = [g for g in theirs["groups"] if g["kind"] == "muon"]
    pairs = [(name, theirs[name], ours[name]) for name in ("num_iterations", "total_batch_size", "weight_decay",
                                                           "eval_tokens", "flops_per_token")]
    for name, g in sorted(lrs.items()):
        lr, betas, wd = ours["adamw"][name]
        pairs += [(f"{name} lr", g["lr"], lr), (f"{name} betas", g["betas"], list(betas)),
                  (f"{name} weight decay", g["weight_decay"], wd)]
    pairs += [("matrix lr", muon[0]["lr"], ours["matrix_lr"]),
              ("NorMuon beta2", muon[0]["beta2"], ours["knobs"]["muon_beta2"])]
    return [(name, a, b, a == b) for name, a, b in pairs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanochat", type=Path, required=True, help="a nanochat checkout at the row's recipe commit")
    ap.add_argument("--row", required=True, help="a row of the config")
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--nanochat-python", default=sys.executable)
    ap.add_argument("--base-dir", type=Path, required=True, help="NANOCHAT_BASE_DIR: a tokenizer and some shards")
    args = ap.parse_args()
    cfg = plan.load_config(args.config)
    ours = plan.resolved_row(cfg, args.row)
    theirs = nanochat_derives(args, cfg["rows"][args.row])
    rows = ours_vs(theirs, ours)
    print(f"row {args.row}, recipe {ours['recipe']} ({recipe.DESCRIPTIONS[ours['recipe']]})")
    for name, a, b, same in rows:
        print(f"  {name:28} nanochat {a!r:24} ours {b!r:24} {'equal' if same else 'DIFFERENT'}")
    print(f"goal: every derived value equal -> {'MET' if all(r[3] for r in rows) else 'NOT MET'}")


if __name__ == "__main__":
    main()
