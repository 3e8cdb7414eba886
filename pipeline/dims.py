"""Everything that follows from `--depth` and the recipe, as plain arithmetic (no torch), so the plan can
print a row's derived values without training (`python -m pipeline.plan show --row X --resolved`).

nanochat's one dial: width = depth x aspect ratio (rounded up to whole heads of `head_dim`), heads
from the head dim, training tokens = ratio x scaling params, the total batch size auto-scaled with
the horizon, learning rates scaled by batch and width, Muon's weight decay by the recipe's rule. The
expressions keep nanochat's order of operations, so each value is the float nanochat computes (the
model module must agree on the parameter counts; a test holds them together).
"""

import math

from pipeline import recipe as recipes

ASPECT_RATIO = recipes.SHAPE_FLAGS["aspect_ratio"]
HEAD_DIM = recipes.SHAPE_FLAGS["head_dim"]
REFERENCE_DEPTH = 12                    # hyperparameters were tuned at d12 ...
REFERENCE_BATCH = 2**19                 # ... whose best batch is 2^19 tokens; it grows as (D / D_d12)^0.383
BATCH_EXPONENT = 0.383
WIDTH_REFERENCE = 768                   # AdamW learning rates were tuned at width 768
SMEAR_CHANNELS = 24                     # the smear gate reads this many channels (a825e63)
SMEAR_LR = 0.2                          # the smear/backout scalars' AdamW lr, unscaled (a825e63)


def pad_vocab(vocab_size, multiple=64):
    """The embedding and lm_head are padded to a multiple of 64 rows for efficient matmuls."""
    return -(-vocab_size // multiple) * multiple


def model_dim(depth, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM):
    return -(-depth * aspect_ratio // head_dim) * head_dim


def num_heads(depth, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM):
    return model_dim(depth, aspect_ratio, head_dim) // head_dim


def param_counts(depth, vocab_size, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM, ve_gate_channels=32,
                 smear=False, backout=False):
    """Parameters by kind, as GPT.num_scaling_params counts them. Scaling params (what the data:param
    ratio multiplies) = the transformer's matrices (4 d^2 attention + 8 d^2 MLP per layer, plus a
    channels x heads gate on each of the ceil(depth/2) layers with value embeddings) + the lm_head.
    d24 with a 32768 vocab (run 1's recipe) gives 729,813,504 scaling params, which times ratio 12 is
    the 16,704 steps of 2^19 tokens that leaderboard run 1 took."""
    d, vocab, ve_layers = model_dim(depth, aspect_ratio, head_dim), pad_vocab(vocab_size), -(-depth // 2)
    counts = {"wte": vocab * d, "value_embeds": ve_layers * vocab * d, "lm_head": vocab * d,
              "transformer_matrices": 12 * d * d * depth + ve_layers * ve_gate_channels * num_heads(
                  depth, aspect_ratio, head_dim),
              "scalars": 2 * depth + (SMEAR_CHANNELS + 1 if smear else 0) + (1 if backout else 0)}
    counts["total"] = sum(counts.values())
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    return counts


def flops_per_token(depth, vocab_size, sequence_len, window_pattern, knobs, aspect_ratio=ASPECT_RATIO,
                    head_dim=HEAD_DIM):
    """Training FLOPs per token: 6 per weight that multiplies (embeddings are lookups and the scalars are
    left out; the smear gate too until nanochat master) plus attention's 12 x heads x head_dim x the
    positions each layer attends to."""
    counts = param_counts(depth, vocab_size, aspect_ratio, head_dim, knobs["ve_gate_channels"])
    heads, hd = num_heads(depth, aspect_ratio, head_dim), model_dim(depth, aspect_ratio, head_dim) // num_heads(
        depth, aspect_ratio, head_dim)
    attn = sum(12 * heads * hd * min(w, sequence_len) for w in window_sizes(sequence_len, depth, window_pattern,
                                                                             knobs))
    smear_gate = SMEAR_CHANNELS if knobs["smear"] and knobs["smear_gate_flops"] else 0
    return 6 * (counts["scaling"] + smear_gate) + attn


def window_sizes(sequence_len, n_layer, pattern, knobs):
    """Per layer: how many earlier positions a query may see. 'L' is the whole context, 'S' the recipe's
    short window; the pattern tiles over the layers and the last layer is always 'L'."""
    pattern = pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern {pattern!r} must be made of S and L")
    short = recipes.short_window(sequence_len, knobs["short_window_divisor"], knobs["short_window_tile"])
    sizes = [sequence_len if pattern[i % len(pattern)] == "L" else short for i in range(n_layer)]
    sizes[-1] = sequence_len
    return sizes


def model_config(flags, knobs, vocab_size):
    """The GPTConfig fields (pipeline.model) of a run: shape from the flags, the rest from the recipe."""
    depth = flags["depth"]
    return {"sequence_len": flags["max_seq_len"], "vocab_size": vocab_size, "n_layer": depth,
            "n_head": num_heads(depth, flags["aspect_ratio"], flags["head_dim"]),
            "n_embd": model_dim(depth, flags["aspect_ratio"], flags["head_dim"]),
            "window_pattern": flags["window_pattern"],
            **{name: knobs[name] for name in MODEL_KNOBS}}


MODEL_KNOBS = ("softcap", "rope_base", "rotary_bf16", "short_window_divisor", "short_window_tile", "qk_scale",
               "ve_gate_channels", "ve_gate_scale", "ve_gate_init", "wte_init_std", "c_fc_init_scale",
               "resid_lambda_init", "x0_lambda_init", "smear", "backout", "smear_gate_init", "backout_lambda_init",
               "smear_gate_flops")


def _scaling_params(depth, vocab_size, flags, knobs):
    return param_counts(depth, vocab_size, flags["aspect_ratio"], flags["head_dim"],
                        knobs["ve_gate_channels"])["scaling"]


def horizon(flags, knobs, vocab_size):
    """(target tokens, D_ref: the d12 tokens at the same ratio, total batch size): nanochat's scaling laws."""
    ratio = flags["target_param_data_ratio"]
    target = int(ratio * _scaling_params(flags["depth"], vocab_size, flags, knobs))
    d_ref = ratio * _scaling_params(REFERENCE_DEPTH, vocab_size, flags, knobs)
    batch = flags["total_batch_size"]
    if batch == -1:  # Power Lines (arXiv 2505.13738): B_opt ~ D^0.383, clamped to a power of 2
        batch = 2 ** round(math.log2(REFERENCE_BATCH * (target / d_ref) ** BATCH_EXPONENT))
    return target, d_ref, batch


def iterations(flags, target, batch, flops):
    """Steps: --num-iterations, else from --target-flops, else from the data:param ratio."""
    if flags["num_iterations"] > 0:
        return flags["num_iterations"]
    if flags["target_flops"] > 0:
        return round(flags["target_flops"] / (flops * batch))
    return target // batch


def batch_split_problem(total_batch_size, device_batch_size, max_seq_len, world_size):
    """Why `total_batch_size` tokens cannot be split into whole micro-batches over the devices (None if it can):
    checked by the config for a set batch, and by train for an auto-sized one."""
    per_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % per_step == 0:
        return None
    return (f"{total_batch_size} tokens is not a multiple of device_batch_size x max_seq_len x world size = "
            f"{per_step}; pick a device_batch_size (a power of 2) that divides it")


def derive(flags, knobs, vocab_size, world_size):
    """Every derived size and hyperparameter of a run from its settled flags (recipe defaults filled in)
    and its recipe's knobs; what nanochat prints when a run starts, and what the manifest records."""
    target, d_ref, batch = horizon(flags, knobs, vocab_size)
    flops = flops_per_token(flags["depth"], vocab_size, flags["max_seq_len"], flags["window_pattern"], knobs,
                            flags["aspect_ratio"], flags["head_dim"])
    steps = iterations(flags, target, batch, flops)
    per_step = flags["device_batch_size"] * flags["max_seq_len"] * world_size
    width = (model_dim(flags["depth"], flags["aspect_ratio"], flags["head_dim"]) / WIDTH_REFERENCE) ** -0.5
    batch_lr = (batch / REFERENCE_BATCH) ** 0.5 if batch != REFERENCE_BATCH else 1.0
    if knobs["weight_decay_scaling"] == "depth":  # ~ 1/width^2, i.e. 1/depth^2 at a fixed aspect ratio
        weight_decay = flags["weight_decay"] * (REFERENCE_DEPTH / flags["depth"]) ** 2
    else:  # keep T_epoch = B / (lr wd D) constant (arXiv 2405.13698) with lr ~ sqrt(B)
        weight_decay = flags["weight_decay"] * math.sqrt(batch / REFERENCE_BATCH) * (d_ref / target)
    flag_betas = [flags.get("adam_beta1"), flags.get("adam_beta2")]
    warmup = flags["warmup_steps"] if "warmup_steps" in knobs else round(flags["warmup_ratio"] * steps)
    return {
        "model": model_config(flags, knobs, vocab_size),
        "param_counts": param_counts(flags["depth"], vocab_size, flags["aspect_ratio"], flags["head_dim"],
                                     knobs["ve_gate_channels"], knobs["smear"], knobs["backout"]),
        "flops_per_token": flops, "target_tokens": target, "total_batch_size": batch, "num_iterations": steps,
        "grad_accum_steps": batch // per_step if batch % per_step == 0 else None, "world_size": world_size,
        "tokens": steps * batch, "total_flops": flops * steps * batch,
        "lr_scale": {"batch": batch_lr, "width": width},
        # AdamW groups (lr, betas, weight decay) in nanochat's order of operations; Muon's matrix lr
        "adamw": {
            "lm_head": [flags["unembedding_lr"] * batch_lr * width, knobs["lm_head_betas"] or flag_betas,
                        knobs["lm_head_weight_decay"]],
            "wte": [flags["embedding_lr"] * batch_lr * width, knobs["wte_betas"] or flag_betas,
                    knobs["wte_weight_decay"]],
            "value_embeds": [flags["embedding_lr"] * batch_lr * width * knobs["ve_lr_scale"],
                             knobs["ve_betas"] or flag_betas, knobs["ve_weight_decay"]],
            "resid_lambdas": [flags["scalar_lr"] * batch_lr * 0.01, knobs["resid_betas"] or flag_betas,
                              knobs["resid_weight_decay"]],
            "x0_lambdas": [flags["scalar_lr"] * batch_lr, [0.96, 0.95], 0.0],
            **({"smear": [SMEAR_LR, [0.8, 0.95], 0.0]} if knobs["smear"] or knobs["backout"] else {}),
        },
        "matrix_lr": flags["matrix_lr"] * batch_lr,
        "weight_decay": weight_decay,
        "schedule": {"warmup_steps": warmup, "warmdown_steps": round(flags["warmdown_ratio"] * steps),
                     "final_lr_frac": flags["final_lr_frac"], "weight_decay": knobs["weight_decay_schedule"],
                     "momentum": [0.85, knobs["momentum_peak"], knobs["momentum_warmup_steps"],
                                  knobs["momentum_final"]]},
        "eval_tokens": flags["eval_tokens"],
        "eval_steps": max(1, flags["eval_tokens"] // per_step),
    }


def lr_multiplier(step, iterations, schedule):
    """Linear warmup, constant, linear warmdown to final_lr_frac (base_train's get_lr_multiplier)."""
    warmup, warmdown = schedule["warmup_steps"], schedule["warmdown_steps"]
    if step < warmup:
        return (step + 1) / warmup
    if step <= iterations - warmdown:
        return 1.0
    progress = (iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * schedule["final_lr_frac"]


def muon_momentum(step, iterations, schedule):
    """0.85 -> peak over the warmup steps; with a final value, peak -> final over the lr warmdown."""
    start, peak, warmup, final = schedule["momentum"]
    warmdown = schedule["warmdown_steps"]
    if final is not None and step >= warmup:
        if step >= iterations - warmdown:
            progress = (step - (iterations - warmdown)) / warmdown
            return peak * (1 - progress) + final * progress
        return peak
    frac = min(step / warmup, 1)
    return (1 - frac) * start + frac * peak


def muon_weight_decay(step, iterations, weight_decay, schedule):
    """Muon's decay at `step`: linearly or along a half cosine to zero at the end of the run."""
    if schedule["weight_decay"] == "cosine":
        return weight_decay * 0.5 * (1 + math.cos(math.pi * step / iterations))
    return weight_decay * (1 - step / iterations)


def training_tokens(flags, knobs, vocab_size):
    """Tokens a row trains on, from its settled flags (what `train_shards: auto` has to cover)."""
    target, _, batch = horizon(flags, knobs, vocab_size)
    if flags["num_iterations"] > 0:
        return flags["num_iterations"] * batch
    return target // batch * batch
