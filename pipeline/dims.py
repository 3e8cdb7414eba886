"""Everything that follows from `--depth`, as plain arithmetic (no torch), so the plan can use it.

nanochat's one dial: width = depth x aspect ratio (rounded up to whole heads of `head_dim`), heads
from the head dim, training tokens = ratio x scaling params, and the total batch size auto-scaled
with depth. The model module must agree with `scaling_params` (a test holds them together).
"""

import math

ASPECT_RATIO = 64
HEAD_DIM = 128
DEFAULT_TARGET_PARAM_DATA_RATIO = 10.5  # compute-optimal per nanochat dev/LOG.md (Jan 27 2026)
REFERENCE_DEPTH = 12                    # the auto batch size is 2^19 tokens at d12 ...
REFERENCE_BATCH = 2**19
BATCH_EXPONENT = 0.383                  # ... and grows as (tokens / d12's tokens)^0.383


def pad_vocab(vocab_size, multiple=64):
    """The embedding and lm_head are padded to a multiple of 64 rows for efficient matmuls."""
    return -(-vocab_size // multiple) * multiple


def model_dim(depth, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM):
    return -(-depth * aspect_ratio // head_dim) * head_dim


def num_heads(depth, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM):
    return model_dim(depth, aspect_ratio, head_dim) // head_dim


def scaling_params(depth, vocab_size, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM):
    """Transformer matrices (4 d^2 attention + 8 d^2 ReLU^2 MLP per layer, plus a 32 x heads gate on
    each of the ceil(depth/2) layers with value embeddings) + lm_head.

    d24 with a 32768 vocab gives 729,813,504, which times ratio 12 is the 16,704 steps of 2^19
    tokens that leaderboard run 1 took.
    """
    d = model_dim(depth, aspect_ratio, head_dim)
    gates = -(-depth // 2) * 32 * num_heads(depth, aspect_ratio, head_dim)
    return 12 * d * d * depth + gates + pad_vocab(vocab_size) * d


def target_tokens(depth, vocab_size, ratio=DEFAULT_TARGET_PARAM_DATA_RATIO, **shape):
    return int(ratio * scaling_params(depth, vocab_size, **shape))


def auto_total_batch_size(depth, vocab_size, ratio=DEFAULT_TARGET_PARAM_DATA_RATIO, **shape):
    """B = 2^round(log2(2^19 * (D / D_ref)^0.383)), D_ref = the tokens d12 trains on at the same ratio."""
    tokens = target_tokens(depth, vocab_size, ratio, **shape)
    ref = target_tokens(REFERENCE_DEPTH, vocab_size, ratio, **shape)
    return 2 ** round(math.log2(REFERENCE_BATCH * (tokens / ref) ** BATCH_EXPONENT))


def training_tokens(train, vocab_size):
    """Tokens a row trains on, from its declared flags (num_iterations wins over the ratio)."""
    depth = train["depth"]
    ratio = train.get("target_param_data_ratio", DEFAULT_TARGET_PARAM_DATA_RATIO)
    batch = train.get("total_batch_size", -1)
    if batch == -1:
        batch = auto_total_batch_size(depth, vocab_size, ratio)
    iterations = train.get("num_iterations", -1)
    if iterations > 0:
        return iterations * batch
    return target_tokens(depth, vocab_size, ratio) // batch * batch
