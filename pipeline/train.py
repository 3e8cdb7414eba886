"""train: pretrain the GPT on a row's token shards, as nanochat's base_train does.

    python -m pipeline.train --row smoke                       # a row of config/config.yaml
    torchrun --standalone --nproc_per_node=8 -m pipeline.train -- --row d26_fp8
    (Snakemake passes the row's flags, --spec, --inputs, --out and --work)

Every size and hyperparameter follows from --depth (pipeline.dims); the flags are base_train's, by
name and meaning. Checkpoints go to <work>/checkpoints and a rerun resumes from the newest one.
Outputs: model.pt, model.json, metrics.jsonl, train_summary.json, sealed with a manifest.
"""

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoint, cli, dims, download, evaluate, launch, optim, plan, runtime, store, tokenizer
from pipeline import recipe as recipes
from pipeline.device import leave_process_group, setup_device
from pipeline.errors import StageError
from pipeline.loader import DistributedLoader
from pipeline.model import GPT, GPTConfig, use_fa3
from pipeline.optim import MuonAdamW

SMOOTHING = 0.9        # EMA of the logged train loss
UNTIMED_STEPS = 10     # compile and warm-up steps left out of total_training_time, as on the leaderboard
# Dense bf16 peak FLOP/s by device name (lower case substring, first match wins), for MFU.
PEAK_FLOPS = (("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("h800", 989e12),
              ("gh200", 989e12), ("b200", 2.25e15), ("b100", 1.8e15), ("a100", 312e12), ("a800", 312e12),
              ("l40s", 362e12), ("l4", 121e12), ("a10g", 125e12), ("4090", 165.2e12), ("3090", 71e12))


def build_parser():
    ap = cli.parser("train", __doc__.splitlines()[0])
    a = ap.add_argument
    a("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    a("--model-tag", default=None, help="a name for the checkpoint (recorded only)")
    a("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="'' picks cuda when present")
    a("--recipe", default=None, help=f"the nanochat commit whose recipe to train (default: the newest, "
                                     f"{recipes.NEWEST}; pipeline.recipe)")
    a("--knobs", type=json.loads, default={}, help="recipe knobs to override, as JSON ({\"softcap\": 20})")
    shape = recipes.SHAPE_FLAGS
    a("--depth", type=int, default=shape["depth"], help="the one dial: number of layers")
    a("--aspect-ratio", type=int, default=shape["aspect_ratio"], help="model_dim = depth x aspect ratio")
    a("--head-dim", type=int, default=shape["head_dim"])
    a("--max-seq-len", type=int, default=shape["max_seq_len"])
    a("--window-pattern", default=shape["window_pattern"], help="S = the recipe's short window, L = full; the "
                                                                "last layer always L")
    a("--num-iterations", type=int, default=shape["num_iterations"],
      help="explicit number of steps (-1: from the ratio)")
    a("--target-flops", type=float, default=shape["target_flops"], help="train for this many FLOPs (-1: off)")
    a("--device-batch-size", type=int, default=shape["device_batch_size"], help="rows per forward pass per device")
    # defaults from the recipe (None here): the commit's own base_train defaults
    a("--target-param-data-ratio", type=float, help="training tokens = this x scaling params")
    a("--total-batch-size", type=int, help="tokens per step (-1: auto-scaled with the horizon)")
    for name in ("embedding-lr", "unembedding-lr", "matrix-lr", "scalar-lr"):
        a(f"--{name}", type=float)
    a("--weight-decay", type=float, help="Muon weight decay at d12's batch and horizon")
    a("--adam-beta1", type=float, help="until 6ed7d1d; then betas are per group (recipe knobs)")
    a("--adam-beta2", type=float)
    a("--warmup-ratio", type=float, help="lr warmup as a fraction of the steps (until 6ed7d1d)")
    a("--warmup-steps", type=int, help="lr warmup steps (from 6ed7d1d)")
    a("--warmdown-ratio", type=float)
    a("--final-lr-frac", type=float)
    a("--eval-tokens", type=int, help="validation tokens per val_bpb")
    a("--resume-from-step", type=int, default=-1, help="resume this checkpoint (-1: the newest, if any)")
    a("--eval-every", type=int, default=250, help="val bpb every N steps (-1: only at the end)")
    a("--core-metric-every", type=int, default=2000, help="accepted; CORE is the core stage's job")
    a("--core-metric-max-per-task", type=int, default=500, help="accepted; CORE is the core stage's job")
    a("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1: never)")
    a("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    a("--fp8", action="store_true", help="train eligible Linear layers in float8 (torchao, tensorwise)")
    a("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    a("--fp8-fallback", action="store_true", help="train in bf16 where the device has no fp8")
    a("--compile", default="auto", choices=["auto", "yes", "no"],
      help="torch.compile (auto: on CUDA, and on a CPU where the run is long enough to pay it back)")
    a("--seed", type=int, default=42)
    return ap


def parse_args(argv=None):
    return build_parser().parse_args(launch.after_separator(sys.argv[1:] if argv is None else argv))


# ----------------------------------------------------------------------------- depth -> everything

def settle(args):
    """(flags, knobs): the run's flags, those not given at its recipe's defaults, and the recipe's knobs
    with the row's overrides. A flag its commit's base_train does not have is refused."""
    try:
        commit = recipes.commit_of(args.recipe)
        flags = {**vars(args), **recipes.settle(commit, vars(args)), "recipe": commit}
        return flags, recipes.knobs(commit, args.knobs)
    except recipes.RecipeError as e:
        raise StageError(str(e)) from e


def resolve(args, vocab_size, world_size):
    """Every derived size and hyperparameter, from the flags and the recipe (pipeline.dims; no tensors:
    the manifest records it)."""
    flags, knobs = settle(args)
    hp = dims.derive(flags, knobs, vocab_size, world_size)
    problem = dims.batch_split_problem(hp["total_batch_size"], args.device_batch_size, args.max_seq_len, world_size)
    if problem:
        raise StageError(f"--total-batch-size {problem}")
    if hp["num_iterations"] < 1:
        raise StageError(f"the flags give {hp['num_iterations']} training steps; raise --target-param-data-ratio or "
                         "set --num-iterations")
    defaults = recipes.flag_defaults(flags["recipe"])
    hp["recipe"] = {"commit": flags["recipe"], "knobs": knobs, "flags": {name: flags[name] for name in defaults}}
    return hp


def make_optimizer(model, hp, compiled=False):
    """AdamW for the embeddings, lm_head and the scalars, per group as the recipe sets them; Muon for the
    blocks' matrices, one group per shape. `compiled`: the updates through torch.compile (with the model,
    on CUDA)."""
    knobs = hp["recipe"]["knobs"]

    def adamw(params, name):
        lr, betas, weight_decay = hp["adamw"][name]
        return {"kind": "adamw", "params": list(params), "lr": lr, "initial_lr": lr, "betas": tuple(betas),
                "eps": 1e-10, "weight_decay": weight_decay}

    scalars = [getattr(model, n) for n in ("smear_gate", "smear_lambda", "backout_lambda") if hasattr(model, n)]
    groups = [adamw([model.lm_head.weight], "lm_head"), adamw([model.transformer.wte.weight], "wte"),
              adamw(model.value_embeds.parameters(), "value_embeds"), adamw([model.resid_lambdas], "resid_lambdas"),
              adamw([model.x0_lambdas], "x0_lambdas")]
    if scalars:
        groups.append(adamw([p.weight if isinstance(p, torch.nn.Module) else p for p in scalars], "smear"))
    by_shape = {}
    for p in model.transformer.h.parameters():
        by_shape.setdefault(tuple(p.shape), []).append(p)
    for shape in sorted(by_shape):
        groups.append({"kind": "muon", "params": by_shape[shape], "lr": hp["matrix_lr"], "initial_lr": hp["matrix_lr"],
                       "momentum": 0.95, "beta2": knobs["muon_beta2"], "ns_steps": 5,
                       "weight_decay": hp["weight_decay"]})
    return MuonAdamW([g for g in groups if g["params"]], compiled=compiled,
                     muon_options={k: knobs[k] for k in optim.MUON_DEFAULTS}, adamw_fp32_math=knobs["adamw_fp32_math"])


# ----------------------------------------------------------------------------- device, fp8, eval

def fp8_supported(device):
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def convert_fp8(model, recipe, min_dim=0, emulate=False):
    """Swap Linear layers whose dims are multiples of 16 (and, from nanochat 324e69c, both at least
    `min_dim`) for torchao Float8Linear; (converted, skipped).
    `emulate` (the CPU): same fp8 casts and scales, but the matmul in high precision, since PyTorch's CPU
    _scaled_mm is a reference kernel (~40 s for one 2048x128x4096 product on 2 cores)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted, skipped = [], []

    def eligible(module, name):
        if not isinstance(module, torch.nn.Linear):
            return False
        ok = (module.in_features % 16 == 0 and module.out_features % 16 == 0
              and min(module.in_features, module.out_features) >= min_dim)
        (converted if ok else skipped).append(f"{name} ({module.in_features}->{module.out_features})")
        return ok

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=eligible)
    return converted, skipped


@contextlib.contextmanager
def plain_linears(model):
    """Evaluate in bf16: put plain nn.Linear views (sharing the weights) where Float8Linear sits."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Float8Linear":
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            plain.weight = module.weight
            setattr(parent, name.rpartition(".")[2], plain)
            swapped.append((parent, name.rpartition(".")[2], module))
    try:
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_wandb(args, hp, resume_id):
    """Offline unless the user configured wandb (WANDB_MODE or WANDB_API_KEY); None for --run=dummy or
    WANDB_MODE=disabled.
    Offline runs land in $WANDB_DIR (default results/wandb) for a later `wandb sync`."""
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if args.run == "dummy" or mode == "disabled":  # no import either: a GPU image may lack wandb
        return None
    import wandb
    directory = Path(os.environ.get("WANDB_DIR", "results/wandb"))
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "nanochat"), name=args.run, dir=str(directory),
                      mode=mode, id=resume_id, resume="allow", config={**vars(args), "resolved": hp})


# ----------------------------------------------------------------------------- the run

class Trainer:
    def __init__(self, args, spec, inputs, out, work):
        self.args, self.spec, self.out, self.work = args, spec, Path(out), Path(work)
        tok_dir, *self.train_dirs, self.val_dir = map(Path, inputs)
        self.enc = tokenizer.load(tok_dir)
        self.device, self.rank, _, self.world, self.allocator = setup_device(args.device_type)
        self.master = self.rank == 0
        self.hp = resolve(args, self.enc.n_vocab, self.world)
        self.knobs = self.hp["recipe"]["knobs"]
        self.token_bytes = evaluate.token_bytes(self.enc, tok_dir, self.knobs["token_bytes"]).to(self.device)
        self.ckpt_dir, self.metrics_path = self.work / "checkpoints", self.work / "metrics.jsonl"
        self.work.mkdir(parents=True, exist_ok=True)

    def log(self, record):
        if self.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def build(self):
        args, hp = self.args, self.hp
        torch.manual_seed(args.seed)
        torch.set_float32_matmul_precision("high")
        config = GPTConfig(**hp["model"])
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=self.device)
        model.init_weights()
        resume = self._checkpoint_to_resume()
        meta, optim_state = {}, None
        if resume is not None:
            path, model_state, optim_state, meta = resume
            model.load_state_dict(model_state)
            print(f"resuming from {path}", file=sys.stderr)
        self.fp8_layers = {"converted": [], "skipped": []}
        if args.fp8:
            if fp8_supported(self.device):
                cpu = self.device.type == "cpu"
                self.fp8_layers["converted"], self.fp8_layers["skipped"] = convert_fp8(
                    model, args.fp8_recipe, self.knobs["fp8_min_dim"], cpu)
                print(f"fp8: converted {len(self.fp8_layers['converted'])} Linear layers; skipped (dims not "
                      f"divisible by 16, or under {self.knobs['fp8_min_dim']}): "
                      f"{', '.join(self.fp8_layers['skipped']) or 'none'}", file=sys.stderr)
            elif args.fp8_fallback:
                print("fp8: this device has no fp8 support; training in bf16 (--fp8-fallback)", file=sys.stderr)
            else:
                raise StageError(f"--fp8 needs an fp8-capable device (CUDA compute capability 8.9+: Ada, Hopper "
                                 f"or newer); {self.device} is not. Drop --fp8, or add --fp8-fallback to train in "
                                 "bf16 instead")
        if self.device.type == "cuda":
            fa3_missing = use_fa3()  # nanochat's attention kernel on Hopper, where it loads
            print("attention: " + (f"torch's kernels; FlashAttention-3 not used: {fa3_missing}" if fa3_missing
                                   else "FlashAttention-3"), file=sys.stderr)
        self.model = model
        training_flops = hp["flops_per_token"] * hp["total_batch_size"] * hp["num_iterations"]
        use_compile, self.compile_reason = runtime.compile_decision(args.compile, self.device.type, training_flops)
        print(f"compile: {'yes' if use_compile else 'no'} ({self.compile_reason}); allocator: {self.allocator}",
              file=sys.stderr)
        self.compiled = torch.compile(model, dynamic=False) if use_compile else model
        # the optimizer compiles with the model, as nanochat's does on every device: besides fusing, a compiled
        # update keeps bf16 intermediates in fp32 registers, so its floats are nanochat's (tests/test_recipe.py)
        self.optimizer = make_optimizer(model, hp, compiled=use_compile)
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)
        self.step = meta.get("step", 0)
        self.loop = meta.get("loop", {"total_training_time": 0.0, "smooth_loss": 0.0, "min_val_bpb": None,
                                      "val_bpb": None, "wandb_id": None, "timed_steps": 0})
        if "rng" in meta:
            torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
        self.loader = DistributedLoader(self.train_dirs, args.device_batch_size, args.max_seq_len, self.rank,
                                        self.world, state=meta.get("loader"))
        if self.master:
            self._truncate_metrics(self.step)

    def _checkpoint_to_resume(self):
        """(path, model_state, optim_state, meta) to resume from, or None to start at step 0."""
        model = self.hp["model"]
        if self.args.resume_from_step >= 0:
            path = self.ckpt_dir / f"step_{self.args.resume_from_step:06d}"
            if not path.is_dir():
                raise StageError(f"--resume-from-step {self.args.resume_from_step}: no checkpoint {path}")
            try:
                return (path, *checkpoint.load(path, map_location=self.device, model=model))
            except checkpoint.DamagedCheckpoint as e:
                # asked for by name, so no quiet fallback
                raise StageError(f"{e}: pass --resume-from-step with another step, or drop it to resume from the "
                                 "newest checkpoint that reads back whole") from e
        return checkpoint.load_newest(self.ckpt_dir, map_location=self.device, model=model)

    def _truncate_metrics(self, step):
        """After a resume, drop what the killed run logged past its last checkpoint (everything up to
        and including `step` was logged before that checkpoint was written)."""
        if self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            store.atomic_write(self.metrics_path, "".join(ln + "\n" for ln in lines))

    def save(self):
        meta = {"step": self.step, "loader": self.loader.state_dict(), "loop": self.loop,
                "rng": torch.get_rng_state().tolist(), "model": self.hp["model"], "flags": vars(self.args)}
        self.optimizer.gather_state()  # every rank: each holds only its own share of the optimizer's state
        if self.master:
            checkpoint.save(self.ckpt_dir, self.step, self.model.state_dict(), self.optimizer.state_dict(), meta)
        if self.world > 1:
            dist.barrier()

    def evaluate(self):
        args = self.args
        steps = self.hp["eval_steps"]
        loader = DistributedLoader([self.val_dir], args.device_batch_size, args.max_seq_len, self.rank, self.world)
        self.model.eval()
        with plain_linears(self.model):
            bpb = evaluate.evaluate_bpb(self.model, loader, steps, self.token_bytes, self.world)
        self.model.train()
        self.loop["val_bpb"] = bpb
        best = self.loop["min_val_bpb"]
        self.loop["min_val_bpb"] = bpb if best is None else min(best, bpb)
        self.log({"step": self.step, "val_bpb": bpb})
        print(f"step {self.step:05d} | val bpb {bpb:.6f}", file=sys.stderr)
        return bpb

    def train_step(self):
        hp = self.hp
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        for _ in range(hp["grad_accum_steps"]):
            x, y = evaluate.batch_to(next(self.loader), self.device)
            with evaluate.autocast(self.device):
                loss = self.compiled(x, y)
            total += loss.detach()
            (loss / hp["grad_accum_steps"]).backward()
        steps, schedule = hp["num_iterations"], hp["schedule"]
        lrm = dims.lr_multiplier(self.step, steps, schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = dims.muon_momentum(self.step, steps, schedule)
                group["weight_decay"] = dims.muon_weight_decay(self.step, steps, hp["weight_decay"], schedule)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        if self.world > 1:  # log the loss of the whole batch, not just this rank's share
            dist.all_reduce(total)
        loss = float(total) / (hp["grad_accum_steps"] * self.world)
        sync()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            last = checkpoint.latest(self.ckpt_dir)
            raise StageError(f"training loss became {loss} at step {self.step}; stopped. The last good checkpoint "
                             f"({last or 'none yet'}) is kept: lower the learning rates or check the data, then rerun")
        return loss, lrm, dt

    def run(self):
        args, hp = self.args, self.hp
        self.build()
        run = start_wandb(args, hp, self.loop["wandb_id"]) if self.master else None
        if run is not None:
            self.loop["wandb_id"] = run.id
        peak, first_step = peak_flops(self.device), self.step
        iterations = hp["num_iterations"]
        while True:
            last = self.step == iterations
            # a resumed run already evaluated, sampled and saved at the step it resumes from
            due = self.step != first_step or first_step == 0
            if last or (due and args.eval_every > 0 and self.step % args.eval_every == 0):
                bpb = self.evaluate()
                if run is not None:
                    run.log({"val/bpb": bpb}, step=self.step)
            if self.master and args.sample_every > 0 and (last or (due and self.step % args.sample_every == 0)):
                with plain_linears(self.model):
                    self.log({"step": self.step, "samples": evaluate.greedy_samples(self.model, self.enc, self.device)})
            if last or (args.save_every > 0 and self.step % args.save_every == 0 and self.step != first_step):
                self.save()
            if last:
                break
            loss, lrm, dt = self.train_step()
            if self.step == first_step:
                runtime.freeze_gc()  # setup's garbage is gone now; no more collector pauses in the steps
            elif self.step % 5000 == 0:
                gc.collect()  # as nanochat does, for very long runs
            if self.step - first_step > UNTIMED_STEPS:
                self.loop["total_training_time"] += dt
                self.loop["timed_steps"] += 1
            smooth = SMOOTHING * self.loop["smooth_loss"] + (1 - SMOOTHING) * loss
            self.loop["smooth_loss"] = smooth
            tok_per_sec = hp["total_batch_size"] / dt
            mfu = 100 * hp["flops_per_token"] * tok_per_sec / (peak * self.world) if peak else None
            self.step += 1
            record = {"step": self.step, "loss": loss, "smooth_loss": smooth / (1 - SMOOTHING ** self.step),
                      "lrm": lrm, "matrix_lr": hp["matrix_lr"] * lrm, "dt_ms": 1000 * dt,
                      "tok_per_sec": tok_per_sec, "mfu": mfu, "total_training_time": self.loop["total_training_time"]}
            self.log(record)
            if run is not None and self.step % 100 == 0:
                run.log({f"train/{k}": v for k, v in record.items() if v is not None}, step=self.step)
            print(f"step {self.step:05d}/{iterations:05d} | loss {loss:.4f} | lrm {lrm:.2f} | dt {1000 * dt:.0f}ms | "
                  f"tok/s {tok_per_sec:,.0f}" + (f" | mfu {mfu:.1f}%" if mfu else ""), file=sys.stderr)
        runtime.thaw_gc()
        summary = self.summary(run)
        if run is not None:
            run.summary.update({k: summary[k] for k in ("total_training_time", "total_training_flops", "step")})
            run.finish()
        if self.master:
            self.publish(summary)
        return summary

    def summary(self, run):
        hp, loop = self.hp, self.loop
        timed = loop["timed_steps"]
        rate = timed * hp["total_batch_size"] / loop["total_training_time"] if loop["total_training_time"] else None
        peak = peak_flops(self.device)
        return {
            "total_training_time": loop["total_training_time"], "timed_steps": timed,
            "total_training_flops": hp["flops_per_token"] * hp["total_batch_size"] * self.step,
            "step": self.step, "tokens": hp["total_batch_size"] * self.step,
            "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"],
            "final_train_loss": loop["smooth_loss"] / (1 - SMOOTHING ** max(self.step, 1)),
            "tok_per_sec": rate, "mfu": 100 * hp["flops_per_token"] * rate / (peak * self.world)
            if rate and peak else None,
            "peak_memory_bytes": peak_memory_bytes(self.device), "world_size": self.world,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type,
            "fp8_layers": self.fp8_layers, "compiled": self.compiled is not self.model,
            "compile_reason": self.compile_reason, "allocator": self.allocator,
            "window_attention": self.model.window_kernel(self.device),
            "wandb_run_id": run.id if run is not None else None, "run": self.args.run, "model_tag": self.args.model_tag,
        }

    def publish(self, summary):
        final = self.work / "final"
        final.mkdir(parents=True, exist_ok=True)
        # the final step's weights, by step: a stray newer checkpoint (another run's) must not be published
        store.link_or_copy(self.ckpt_dir / f"step_{self.step:06d}" / "model.pt", final / "model.pt")
        shutil.copyfile(self.metrics_path, final / "metrics.jsonl")
        store.write_json(final / "model.json", {"config": self.hp["model"], "step": self.step,
                                                "tokenizer": self.spec["inputs"][0] if self.spec else None,
                                                "recipe": self.hp["recipe"]})
        store.write_json(final / "train_summary.json", summary)
        files = ["model.pt", "model.json", "metrics.jsonl", "train_summary.json"]
        store.seal(self.spec, files, final, self.out, resolved={k: v for k, v in self.hp.items()},
                   extra={"summary": summary})
        shutil.rmtree(self.work, ignore_errors=True)  # checkpoints were only for resuming this run


# ----------------------------------------------------------------------------- command line

# Flags outside the key: where things go, names, and which of the run's own checkpoints to resume from.
STORE_FLAGS = {"spec", "row", "config", "store", "work", "threads", "inputs", "out", "resume_from_step",
               *plan.TRAIN_NAME_FLAGS}


def check_flags_match_spec(args, spec):
    """The flags a launcher passed must be exactly the spec's (others at their defaults): the key
    says what was trained."""
    defaults = vars(build_parser().parse_args([]))
    for key, got in vars(args).items():
        if key in STORE_FLAGS:
            continue
        want = spec["params"].get(key, defaults[key])
        if got != want:
            raise StageError(f"--{key.replace('_', '-')}={got} differs from the spec's {want}; pass exactly the "
                             "flags of the spec (`python -m pipeline.plan spec <key>` prints it)")


def train_target(args, spec, inputs, out, work, threads):
    """One target's training: train and validation blocks of one dataset commit (the tokenizer checked its
    own), then the Trainer."""
    download.one_commit([store.read_manifest(d) for d in inputs[1:]], f"train {spec['key']}")
    Trainer(args, spec, inputs, out, work).run()


@cli.user_errors
def main(argv=None):
    args = parse_args(argv)
    if not (args.spec or args.row):
        raise StageError("say what to train on: --row <row of config/config.yaml> (e.g. --row d26_fp8, whose "
                         "token shards `snakemake results/<row>/token_shards.json` builds), or --spec as "
                         "Snakemake passes it")
    given = args
    for target in cli.targets("train", given):  # a seeded row trains each seed in turn, as core evaluates them
        if given.spec:
            check_flags_match_spec(given, target.spec)
            args = given
        else:  # the row's flags, as its spec has them; which checkpoint to resume stays the caller's
            args = parse_args(launch.flag_args(target.spec["params"], launch.run_names(target.spec)))
            args.resume_from_step = given.resume_from_step
        cli.run_target(target, functools.partial(train_target, args))
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
