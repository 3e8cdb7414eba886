"""What a training process does for speed besides the model: compile or not, the allocators, the collector."""

import gc
import os

from helpers import REPO
from pipeline import launch, plan, runtime, train


def training_flops(flags, vocab_size):
    hp = train.resolve(train.parse_args(launch.flag_args(flags)), vocab_size, 1)
    return hp["flops_per_token"] * hp["total_batch_size"] * hp["num_iterations"]


def test_auto_compiles_on_a_cpu_only_where_it_pays_back():
    cfg = plan.load_config(REPO / "config" / "config.yaml")
    smoke = cfg["rows"]["smoke"]["train"]
    vocab = cfg["tokenizers"][cfg["rows"]["smoke"]["tokenizer"]]["vocab_size"]
    flops = training_flops(smoke, vocab)  # 20 d2 steps: a compile would never pay back
    assert flops < runtime.COMPILE_PAYBACK_FLOPS / 10
    use, why = runtime.compile_decision("auto", "cpu", flops)
    assert not use and f"{flops:.2e} training FLOPs" in why and why.endswith("eager")
    d4 = {"depth": 4, "max_seq_len": 512, "device_batch_size": 8, "total_batch_size": 4096, "num_iterations": 70}
    use, why = runtime.compile_decision("auto", "cpu", training_flops(d4, 32768))  # bench's side-by-side run
    assert use and "pays back" in why
    assert runtime.compile_decision("auto", "cuda", 1.0)[0]  # nanochat compiles every CUDA run
    assert not runtime.compile_decision("auto", "mps", 1e20)[0]
    assert runtime.compile_decision("yes", "cpu", 1.0) == (True, "--compile=yes")
    assert runtime.compile_decision("no", "cuda", 1e20) == (False, "--compile=no")


def test_cuda_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert runtime.tune_allocators("cuda") == "PYTORCH_ALLOC_CONF=expandable_segments:True"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    assert runtime.tune_allocators("cuda") == "PYTORCH_ALLOC_CONF=max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    assert runtime.tune_allocators("cpu") == "default allocator" and "PYTORCH_ALLOC_CONF" not in os.environ


def test_the_collector_is_frozen_for_the_steps_and_back_after():
    try:
        runtime.freeze_gc()
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        runtime.thaw_gc()
    assert gc.isenabled() and gc.get_freeze_count() == 0
