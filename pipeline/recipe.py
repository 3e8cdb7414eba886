"""recipe: how nanochat trained at each leaderboard commit, as data (no torch, so the plan can read it).

A recipe is named by the nanochat commit it reproduces. HISTORY lists nanochat's commits in order:
the first entry sets every knob, each later one only what that commit changed, so every knob's value
and the commit it comes from sit in one place. The model, optimizer, schedules and evaluation read the
knobs; nothing else in the pipeline knows about commits. A row names its recipe (the newest if it names
none) and may override single knobs: its base_train flags under `train:` (their defaults are knobs of
the recipe), anything else under `knobs:`. That is how a new record is tried.

Facts are read off nanochat's scripts/base_train.py, nanochat/gpt.py, nanochat/optim.py,
nanochat/dataset.py and scripts/tok_train.py at each commit; docs/fidelity.md has the side-by-side runs.
"""

import copy

DROPPED = object()  # a flag the commit removed from base_train

# (commit, what it is, the knobs it set)
HISTORY = (
    ("348fbb3", "Jan 29 2026, leaderboard run 1 (d24 baseline)", {
        # base_train flag defaults
        "total_batch_size": 524288,        # tokens per step; -1 (auto) from 2c062aa
        "target_param_data_ratio": 10.5,
        "embedding_lr": 0.3,
        "unembedding_lr": 0.004,
        "matrix_lr": 0.02,
        "scalar_lr": 0.5,
        "weight_decay": 0.2,                # Muon's, at d12
        "adam_beta1": 0.8,                  # lm_head, wte, value embeddings, resid_lambdas
        "adam_beta2": 0.95,
        "warmup_ratio": 0.0,
        "warmdown_ratio": 0.5,
        "final_lr_frac": 0.0,
        "eval_tokens": 20 * 524288,         # validation tokens per val_bpb
        # the model (gpt.py)
        "softcap": 15.0,                    # logits soft-capped to +-softcap
        "rope_base": 10000,
        "rotary_bf16": True,                # rotary tables rounded to bf16 on every device (CPU too)
        "short_window_divisor": 2,          # an S layer sees sequence_len / divisor positions ...
        "short_window_tile": 0,             # ... rounded up to a multiple of this (0: rounded down, no tile)
        "qk_scale": 1.0,                    # q and k multiplied by this after the QK norm
        "ve_gate_channels": 32,             # value-embedding gate input channels
        "ve_gate_scale": 2.0,               # gate = scale * sigmoid(...)
        "ve_gate_init": 0.0,                # gate weights uniform(0, x); 0: zeros
        "wte_init_std": 1.0,
        "c_fc_init_scale": 1.0,             # of the uniform bound sqrt(3/d)
        "resid_lambda_init": [1.0, 0.0],    # layer i: a - b * i / (n_layer - 1)
        "x0_lambda_init": [0.1, 0.0],
        "smear": False,                     # mix the previous token's embedding in (a825e63)
        "backout": False,                   # subtract the mid-depth residual before the final norm
        "smear_gate_init": 0.0,             # smear gate weights uniform(0, x); 0: zeros, no draw
        "backout_lambda_init": 0.0,
        "smear_gate_flops": False,          # FLOPs/token count the smear gate's weights (master counts every Linear)
        "fp8_min_dim": 0,                   # fp8 only for Linear layers with both dims >= this
        # the optimizer (optim.py, setup_optimizer)
        "lm_head_betas": None,              # None: (adam_beta1, adam_beta2)
        "lm_head_weight_decay": 0.0,
        "wte_betas": None,
        "wte_weight_decay": 0.0,
        "ve_lr_scale": 1.0,                 # of the embedding lr
        "ve_betas": None,
        "ve_weight_decay": 0.0,
        "resid_betas": None,
        "resid_weight_decay": 0.0,
        "muon_beta2": 0.95,                 # NorMuon's second moment
        "polar_express_norm": 1.02,         # X / (|X| * this) before the iterations
        "muon_bf16": "always",              # "always": bf16 from the iterations to the update, on any
                                            # device; "compute": bf16 iterations on CUDA only, then fp32
        "muon_eq": False,                   # MuonEq row equilibration before the iterations
        "muon_plus": False,                 # Muon+: Frobenius norm snapped to sqrt(min(m, n)) after
        "adamw_fp32_math": False,           # AdamW computes bf16 parameters (CUDA embeddings) in fp32
        # schedules (base_train.py)
        "weight_decay_scaling": "depth",    # "depth": wd (12/depth)^2; "horizon": wd sqrt(B/B_ref) D_ref/D
        "weight_decay_schedule": "linear",  # Muon's decay over the run: linear or cosine to zero
        "momentum_warmup_steps": 300,       # Muon momentum 0.85 -> momentum_peak over these steps
        "momentum_peak": 0.95,
        "momentum_final": None,             # if set: peak -> this over the lr warmdown
        # evaluation
        "token_bytes": "decoded",           # bytes per token for bpb: "decoded" (tok_train's
                                            # decode/encode round trip) or "raw" (the token's own bytes)
        "val_shard": "last_on_disk",        # "last_on_disk": the shard after the training ones (-n N
                                            # validates on shard N-1); "pinned": the dataset's val_shard
    }),
    ("a67eba3", "Feb 2 2026, run 2 (d26, fp8)", {
        "eval_tokens": 40 * 524288,
        "fp8_min_dim": 16,                  # --fp8 arrives; Linear dims must be multiples of 16
    }),
    ("2c062aa", "Feb 5 2026, run 3 (1M-token batch)", {
        "total_batch_size": -1,             # auto: 2^19 (D / D_d12)^0.383, rounded to a power of 2
    }),
    ("324e69c", "Mar 4 2026, run 4 (ClimbMix)", {
        "softcap": 20.0,
        "eval_tokens": 80 * 524288,
        "fp8_min_dim": 128,
        "weight_decay_scaling": "horizon",  # Feb 6: the T_epoch rule (arXiv 2405.13698)
        "val_shard": "pinned",              # dataset.py always fetches and validates on the last shard
    }),
    ("6ed7d1d", "Mar 9 2026, run 5 (autoresearch round 1)", {
        "unembedding_lr": 0.008,
        "weight_decay": 0.28,
        "adam_beta1": DROPPED, "adam_beta2": DROPPED,  # betas are per group from here on
        "warmup_ratio": DROPPED, "warmup_steps": 40,
        "warmdown_ratio": 0.65,
        "final_lr_frac": 0.05,
        "softcap": 15.0,
        "rope_base": 100000,
        "rotary_bf16": False,               # tables in the compute dtype (bf16 on CUDA, fp32 on CPU)
        "short_window_divisor": 3, "short_window_tile": 128,
        "qk_scale": 1.15,
        "ve_gate_channels": 12,
        "ve_gate_scale": 3.0,
        "ve_gate_init": 0.02,
        "wte_init_std": 0.8,
        "c_fc_init_scale": 0.5,
        "lm_head_betas": [0.8, 0.96], "lm_head_weight_decay": 0.01,
        "wte_betas": [0.8, 0.995], "wte_weight_decay": 0.001,
        "ve_lr_scale": 0.5, "ve_betas": [0.8, 0.995], "ve_weight_decay": 0.01,
        "resid_betas": [0.8, 0.95], "resid_weight_decay": 0.05,
        "muon_beta2": 0.9,
        "polar_express_norm": 1.01,
        "weight_decay_schedule": "cosine",
        "momentum_warmup_steps": 400,
        "momentum_peak": 0.97,
    }),
    ("a825e63", "Mar 14 2026, run 6 (autoresearch round 2: smear, backout)", {
        "short_window_divisor": 4,
        "qk_scale": 1.2,
        "c_fc_init_scale": 0.4,
        "resid_lambda_init": [1.15, 0.10],  # from 1.0 and 0.1 in every layer
        "x0_lambda_init": [0.20, 0.15],
        # init_weights leaves the smear gate and the smear/backout scalars as to_empty made them: garbage on
        # a CPU (nanochat's own CPU run at this commit never trains), most likely zeros in the fresh GPU
        # memory run 6 trained from (presumed; docs/fidelity.md); master initialises them (94b73ad, 9822cc7)
        "smear": True,
        "backout": True,
        "momentum_final": 0.90,
    }),
    ("92d63d4", "Jul 3 2026, master", {
        "target_param_data_ratio": 12,      # 1cd94d7
        "smear_gate_init": 0.02,            # 9822cc7
        "backout_lambda_init": 0.2,         # 94b73ad: the value a825e63's __init__ meant
        "smear_gate_flops": True,           # 92d63d4: estimate_flops counts every Linear
        "muon_bf16": "compute",             # c0dbf1f
        "muon_eq": True, "muon_plus": True,  # 4e014d3
        "adamw_fp32_math": True,            # e02b339
        "token_bytes": "raw",               # 2ce972a
    }),
)

COMMITS = tuple(commit for commit, _, _ in HISTORY)
NEWEST = COMMITS[-1]
DESCRIPTIONS = {commit: what for commit, what, _ in HISTORY}
# base_train flags whose defaults the recipe sets; a row sets them under `train:`, not `knobs:`
FLAGS = ("total_batch_size", "target_param_data_ratio", "embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr",
         "weight_decay", "adam_beta1", "adam_beta2", "warmup_ratio", "warmup_steps", "warmdown_ratio",
         "final_lr_frac", "eval_tokens")
# base_train flags that only some commits have (beyond the FLAGS above): the commit that added them
ADDED_FLAGS = {"fp8": "a67eba3"}
CHOICES = {"muon_bf16": ("always", "compute"), "weight_decay_scaling": ("depth", "horizon"),
           "weight_decay_schedule": ("linear", "cosine"), "token_bytes": ("decoded", "raw"),
           "val_shard": ("last_on_disk", "pinned")}


# base_train flags that shape a run, at their defaults (the same at every commit above)
SHAPE_FLAGS = {"depth": 20, "aspect_ratio": 64, "head_dim": 128, "max_seq_len": 2048, "window_pattern": "SSSL",
               "num_iterations": -1, "target_flops": -1.0, "device_batch_size": 32}


class RecipeError(ValueError):
    pass


def settle(commit, given):
    """The flags a run of `commit` derives its sizes and hyperparameters from: `given` (a row's `train:`
    flags; None means not given) over the commit's defaults. A flag that base_train did not have at that
    commit raises RecipeError."""
    commit = commit_of(commit)
    for name, value in given.items():
        if value not in (None, False) and (problem := flag_problem(commit, name)):
            raise RecipeError(problem)
    flags = {**SHAPE_FLAGS, **flag_defaults(commit)}
    flags.update((k, v) for k, v in given.items() if v is not None)
    return flags


def commit_of(name):
    """The recipe a row names: one of COMMITS (a longer hash of one is accepted), None for the newest."""
    if name is None:
        return NEWEST
    found = [c for c in COMMITS if str(name)[:7] == c]
    if not found:
        raise RecipeError(f"unknown recipe {name!r}; recipes are nanochat commits: {', '.join(COMMITS)} "
                          f"(newest: {NEWEST})")
    return found[0]


def _fold(commit):
    """{knob: (value, the commit that last set it)}: HISTORY up to `commit`, dropped flags left out."""
    commit = commit_of(commit)
    out = {}
    for c, _, changes in HISTORY[:COMMITS.index(commit) + 1]:
        for name, value in changes.items():
            if value is DROPPED:
                out.pop(name, None)
            else:
                out[name] = (value, c)
    return out


def sources(commit):
    """{knob: the commit that last set it} for the recipe of `commit`."""
    return {name: c for name, (_, c) in _fold(commit).items()}


def knobs(commit, overrides=None):
    """Every knob of the recipe of `commit`, with a row's `knobs:` overrides applied (checked)."""
    values = {name: copy.deepcopy(value) for name, (value, _) in _fold(commit).items()}
    for name, value in (overrides or {}).items():
        if problem := override_problem(commit, name, value):
            raise RecipeError(problem)
        values[name] = value
    return values


def all_knob_names():
    return sorted({name for _, _, changes in HISTORY for name in changes} - set(FLAGS))


def override_problem(commit, name, value):
    """Why a `knobs:` entry cannot apply to this recipe, or None."""
    commit = commit_of(commit)
    if name in FLAGS:
        return f"{name} is a base_train flag (--{name.replace('_', '-')}): set it under the row's train:"
    current = knobs(commit)
    if name not in current:
        return f"unknown knob {name!r}; the knobs are: {', '.join(all_knob_names())}"
    if name in CHOICES and value not in CHOICES[name]:
        return f"{name}: {value!r} is not one of {', '.join(map(repr, CHOICES[name]))}"
    return _type_problem(name, current[name], value)


def _type_problem(name, default, value):
    kinds = {bool: "true or false", list: "a list of two numbers", str: "a string"}
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, list) or (default is None and isinstance(value, list)):
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
    elif isinstance(default, int | float) or default is None:
        ok = isinstance(value, int | float) or (default is None and value is None)
    else:
        ok = isinstance(value, type(default))
    if ok:
        return None
    want = kinds.get(type(default), "a number")
    return f"{name}: {value!r} should be {want}, like the recipe's {default!r}"


def flag_problem(commit, flag):
    """Why base_train at `commit` has no such flag, or None (only the flags that came and went)."""
    commit = commit_of(commit)
    if flag in FLAGS and flag not in knobs(commit):
        have = [c for c in COMMITS if flag in knobs(c)]
        return (f"--{flag.replace('_', '-')} is not a base_train flag at nanochat {commit} (it is at "
                f"{', '.join(have)}){_successor(flag)}")
    if flag in ADDED_FLAGS and COMMITS.index(commit) < COMMITS.index(ADDED_FLAGS[flag]):
        return (f"--{flag.replace('_', '-')} is not a base_train flag at nanochat {commit} (it came in "
                f"{ADDED_FLAGS[flag]})")
    return None


def _successor(flag):
    return {"warmup_ratio": "; use warmup_steps", "warmup_steps": "; use warmup_ratio",
            "adam_beta1": "; betas are per group from 6ed7d1d on (knobs: lm_head_betas, wte_betas, ...)",
            "adam_beta2": "; betas are per group from 6ed7d1d on (knobs: lm_head_betas, wte_betas, ...)"}.get(flag, "")


def flag_defaults(commit):
    """{flag: default} of the base_train flags whose defaults depend on the commit."""
    values = knobs(commit)
    return {flag: values[flag] for flag in FLAGS if flag in values}


def short_window(sequence_len, divisor, tile):
    """Positions an S layer sees: nanochat's `seq // 2` at first, then `-(-seq // n // 128) * 128`."""
    if not tile:
        return sequence_len // divisor
    return -(-sequence_len // divisor // tile) * tile
