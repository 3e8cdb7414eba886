"""What a training process does for speed besides the model: whether to compile, the allocators, the
garbage collector. Each choice says why; train logs it and train_summary.json keeps it.
Figures: bench/README.md ("Training throughput: side by side with nanochat").
"""

import gc
import os

# On a CPU torch.compile costs about 40 s (model and optimizer, d2 to d6 on 2 cores) and saves about
# 40% of an eager step (d4: 5.1 s eager, 3.0 s compiled), so it pays back after about 16 d4 steps.
# Decided on the run's training FLOPs, not on a timing, so the same flags always train the same way.
COMPILE_PAYBACK_FLOPS = 1e13


def compile_decision(setting, device_type, training_flops):
    """(compile?, why) for --compile `setting` ("auto", "yes", "no") on `device_type`."""
    if setting != "auto":
        return setting == "yes", f"--compile={setting}"
    if device_type == "cuda":
        return True, "auto: CUDA, where compiling always pays back (as nanochat compiles)"
    if device_type == "cpu":
        verdict = ("compiling (~40 s here) pays back" if training_flops >= COMPILE_PAYBACK_FLOPS
                   else f"under the {COMPILE_PAYBACK_FLOPS:.0e} at which compiling (~40 s here) pays back: eager")
        return training_flops >= COMPILE_PAYBACK_FLOPS, f"auto: CPU, {training_flops:.2e} training FLOPs, {verdict}"
    return False, f"auto: eager on {device_type}"


def tune_allocators(device_type):
    """What is done to the device's allocator, as a line for the log. Call before the first tensor on it.
    - CUDA: expandable segments (as nanochat sets), so varying sizes do not fragment the cache.
    - CPU: nothing. glibc hands big freed blocks back and page-faults them in again (writing 512 MB of
      logits at d4: 0.61 s fresh, 0.43 s reused), but keeping them (mallopt M_MMAP_MAX=0 and no trim)
      made the heap grow by the block on each alloc-free of one aligned size (256 MB a round: 0.27 ->
      1.8 GB in 8), so a long run could grow without bound; the chunked loss keeps blocks small instead
      (bench/README.md)."""
    if device_type == "cuda":
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
        return f"PYTORCH_ALLOC_CONF={os.environ['PYTORCH_ALLOC_CONF']}"
    return "default allocator"


def freeze_gc():
    """After the first step: what survived setup (modules, compiled graphs) is frozen out of the
    collector's scans, and the collector is switched off, as nanochat does since a67eba3 (its scans of
    that heap paused steps by ~0.5 s); train collects by hand every 5000 steps, as nanochat does."""
    gc.collect()
    gc.freeze()
    gc.disable()


def thaw_gc():
    """The collector back on, for what runs after training in the same process (tests, the report)."""
    gc.unfreeze()
    gc.enable()
