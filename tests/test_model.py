import math
import re
import shlex
import subprocess
import sys

import pytest
import torch

from helpers import REPO, tiny_hp
from pipeline import chunked_loss, dims, train
from pipeline import model as model_module
from pipeline import recipe as recipes
from pipeline.model import GPT, GPTConfig, has_value_embedding, window_mask, window_sizes
from pipeline.optim import MuonAdamW, orthogonalize

SEED_TEXT = REPO / "tests" / "fixtures" / "leaderboard" / "leaderboard-seed.txt"


def seed_commands():
    """Every base_train command on the leaderboard page."""
    text = SEED_TEXT.read_text()
    blocks = re.findall(r"torchrun --standalone --nproc_per_node=8 -m scripts\.base_train -- \\\n((?:.*\\\n)*.*)",
                        text)
    return [shlex.split(b.replace("\\\n", " ")) for b in blocks]


def test_every_seed_command_parses():
    commands = seed_commands()
    assert len(commands) >= 4
    for argv in commands:
        args = train.parse_args(["--", *argv])
        assert args.depth in (12, 24, 26)
    run3 = train.parse_args(["--", *next(c for c in commands if "--total-batch-size=1048576" in c)])
    assert (run3.total_batch_size, run3.target_param_data_ratio, run3.fp8, run3.device_batch_size) == \
        (1048576, 8.25, True, 16)
    assert run3.run == "d26_feb4_double_batch_ratio8.25" and run3.core_metric_every == 999999


def resolve(*flags, world=8):
    return train.resolve(train.parse_args([*flags, "--device-batch-size=16"]), 32768, world)


def test_every_published_row_derives_its_leaderboard_step_count():
    # runs 1-3: the steps of their wandb summaries / dev/LEADERBOARD.md; each run's flags at its commit
    assert resolve("--recipe=348fbb3", "--depth=24", "--target-param-data-ratio=12")["num_iterations"] == 16704
    assert resolve("--recipe=a67eba3", "--depth=26", "--target-param-data-ratio=8.5",
                   "--fp8")["num_iterations"] == 14889
    assert resolve("--recipe=2c062aa", "--depth=26", "--target-param-data-ratio=8.25", "--total-batch-size=1048576",
                   "--fp8")["num_iterations"] == 7226


def test_run_1_flops_match_the_published_total():
    hp = resolve("--recipe=348fbb3", "--depth=24", "--target-param-data-ratio=12")
    assert hp["total_flops"] == 4.330784131228946e19  # the wandb summary of run 1, to the last digit


def test_hyperparameters_scale_with_batch_and_width():
    small, big = resolve("--depth=12", world=1), resolve("--depth=26", world=1)
    assert small["total_batch_size"] == 2**19 and big["total_batch_size"] == 2**20
    assert small["matrix_lr"] == pytest.approx(0.02)                  # d12, 2^19: the reference point
    assert small["adamw"]["wte"][0] == pytest.approx(0.3)
    assert big["matrix_lr"] == pytest.approx(0.02 * math.sqrt(2))
    assert big["adamw"]["wte"][0] == pytest.approx(0.3 * (1664 / 768) ** -0.5 * math.sqrt(2))
    assert big["adamw"]["value_embeds"][0] == pytest.approx(big["adamw"]["wte"][0] / 2)  # 6ed7d1d on
    assert small["weight_decay"] == pytest.approx(0.28)
    assert big["weight_decay"] < small["weight_decay"]
    # until 324e69c Muon's decay fell as 1/depth^2, whatever the batch and horizon
    assert resolve("--recipe=2c062aa", "--depth=24")["weight_decay"] == pytest.approx(0.2 / 4)


def test_a_batch_the_devices_cannot_split_is_refused():
    with pytest.raises(train.StageError, match="not a multiple"):
        resolve("--depth=12", "--total-batch-size=100000")


def test_a_flag_the_commit_did_not_have_is_refused():
    with pytest.raises(train.StageError, match="--warmup-ratio is not a base_train flag at nanochat 92d63d4"):
        resolve("--depth=12", "--warmup-ratio=0.1")
    with pytest.raises(train.StageError, match="--fp8 is not a base_train flag at nanochat 348fbb3"):
        resolve("--recipe=348fbb3", "--depth=12", "--fp8")
    with pytest.raises(train.StageError, match="unknown knob 'softcapp'"):
        resolve("--depth=12", '--knobs={"softcapp": 20}')
    assert resolve("--depth=12", '--knobs={"softcap": 20}')["model"]["softcap"] == 20


def schedule_of(*flags, steps=1000):
    hp = resolve("--depth=12", f"--num-iterations={steps}", *flags)
    return hp["num_iterations"], hp["schedule"]


def test_schedules_of_each_recipe():
    steps, old = schedule_of("--recipe=348fbb3")  # no warmup, warmdown over the second half to 0
    assert [dims.lr_multiplier(s, steps, old) for s in (0, 500, 750, 1000)] == [1.0, 1.0, 0.5, 0.0]
    assert [dims.muon_momentum(s, steps, old) for s in (0, 150, 300, 999)] == [0.85, pytest.approx(0.9), 0.95, 0.95]
    assert dims.muon_weight_decay(500, steps, 0.2, old) == pytest.approx(0.1)  # linear
    # 40 warmup steps; warmdown over the last 65% to 5%; momentum 0.85 -> 0.97, back to 0.90 in the warmdown
    steps, new = schedule_of("--recipe=a825e63", steps=2000)
    assert dims.lr_multiplier(0, steps, new) == pytest.approx(1 / 40) and dims.lr_multiplier(40, steps, new) == 1
    assert dims.lr_multiplier(700, steps, new) == 1 and dims.lr_multiplier(2000, steps, new) == pytest.approx(0.05)
    assert dims.muon_momentum(200, steps, new) == pytest.approx(0.91)
    assert dims.muon_momentum(400, steps, new) == 0.97 and dims.muon_momentum(699, steps, new) == 0.97
    assert dims.muon_momentum(1999, steps, new) == pytest.approx(0.90, abs=1e-4)
    assert dims.muon_weight_decay(1000, steps, 0.2, new) == pytest.approx(0.1)  # cosine: half at half-way
    assert dims.muon_weight_decay(500, steps, 0.2, new) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    steps, run5 = schedule_of("--recipe=6ed7d1d", steps=2000)
    assert dims.muon_momentum(1999, steps, run5) == 0.97  # before a825e63 it stays at its peak


@pytest.mark.parametrize("recipe", recipes.COMMITS)
@pytest.mark.parametrize("depth", [2, 12, 24, 26])
def test_model_counts_agree_with_dims(depth, recipe):
    config = GPTConfig.from_depth(depth, 32768, recipe=recipe)
    with torch.device("meta"):
        model = GPT(config)
    knobs = recipes.knobs(recipe)
    assert model.num_scaling_params() == dims.param_counts(depth, 32768, ve_gate_channels=knobs["ve_gate_channels"],
                                                           smear=knobs["smear"], backout=knobs["backout"])
    assert model.estimate_flops() == dims.flops_per_token(depth, 32768, 2048, "SSSL", knobs)


def test_flops_per_token_match_nanochat():
    with torch.device("meta"):
        d24 = GPT(GPTConfig.from_depth(24, 32768, recipe="348fbb3"))
    assert d24.estimate_flops() == pytest.approx(4.9451e9, rel=1e-4)


def test_architecture_details():
    config = GPTConfig.from_depth(24, 32768, recipe="348fbb3")
    assert (config.n_embd, config.n_head) == (1536, 12)
    sizes = window_sizes(config)
    assert sizes.count(2048) == 6 and sizes.count(1024) == 18 and sizes[-1] == 2048  # S: half the context
    assert window_sizes(GPTConfig.from_depth(24, 32768, recipe="6ed7d1d")).count(768) == 18  # a third, in tiles
    assert window_sizes(GPTConfig.from_depth(24, 32768, recipe="a825e63")).count(512) == 18  # a quarter
    assert window_sizes(GPTConfig.from_depth(4, 32768, 512, recipe="a825e63"))[0] == 128
    assert [i for i in range(12) if has_value_embedding(i, 12)] == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="window_pattern"):
        window_sizes(GPTConfig(window_pattern="SXL"))
    assert GPTConfig.from_depth(2, 4093).vocab_size == 4093
    with torch.device("meta"):
        assert GPT(GPTConfig.from_depth(2, 4093)).lm_head.weight.shape[0] == 4096  # padded to 64


@pytest.mark.parametrize("recipe, resid, x0", [
    ("6ed7d1d", [1.0] * 4, [0.1] * 4),  # one value in every layer until a825e63
    ("a825e63", [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], [0.2, 0.2 - 0.05, 0.2 - 0.1, 0.05]),
])
def test_the_residual_scalars_start_as_each_commit_starts_them(recipe, resid, x0):
    model = GPT(GPTConfig.from_depth(4, 256, 32, recipe=recipe))
    model.init_weights()
    assert model.resid_lambdas.tolist() == pytest.approx(resid) and model.x0_lambdas.tolist() == pytest.approx(x0)


def tiny(vocab=256, seq=32, pattern="SSSL", depth=4):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=2, n_embd=64,
                          window_pattern=pattern))
    model.init_weights()
    return model


def test_forward_is_causal_and_capped():
    model = tiny()
    x = torch.randint(0, 256, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, 256) and logits.abs().max() <= 15
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % 256  # the future must not change the past
    assert torch.allclose(model(x2)[:, :20], logits[:, :20], atol=1e-5)
    loss = model(x, x)
    assert abs(loss.item() - math.log(256)) < 0.5  # near-uniform at init


# torch's first CPU vector-math call of a process, split over two threads: the rotary tables of a model
# built from scratch (as every train and core stage builds one), then softcap's tanh
FIRST_VECTOR_MATH = """
import hashlib, torch
from pipeline.model import rotary_tables
cos, sin = rotary_tables(256, 128)
capped = torch.tanh(torch.linspace(-3, 3, 16384))
print(*(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in (cos, sin, capped)))
"""


def test_a_fresh_process_computes_the_same_bits():
    """A stage's bytes are a function of its inputs, so vector math gives the same bits in every new
    process (MKL's first vector-math call, split over threads, once made a thread's share differ)."""
    outs = {subprocess.run([sys.executable, "-c", FIRST_VECTOR_MATH], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout for _ in range(8)}
    assert len(outs) == 1, outs


def test_the_chunked_loss_is_the_plain_one(monkeypatch):
    """The CPU training loss, a chunk of rows at a time with its gradients made on the way, gives the loss and
    gradients of logits -> soft-cap -> F.cross_entropy: ignored (-1) targets and an uneven last chunk too."""
    monkeypatch.setattr(chunked_loss.softcapped_cross_entropy, "__defaults__", ("mean", 48))  # 128 rows: 48, 48, 32
    model = tiny(vocab=250, seq=32, depth=2)  # 250 -> padded to 256: the padding rows get no gradient
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randint(0, 250, (4, 32)), torch.randint(0, 250, (4, 32))
    y[1, 5:] = -1

    def loss_and_grads(chunked):
        model.chunked_loss = chunked
        model.zero_grad()
        loss = model(x, y)
        (3 * loss).backward()  # an upstream gradient that is not 1 (train divides by the accumulation steps)
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}

    (plain, plain_grads), (chunked, chunked_grads) = loss_and_grads(False), loss_and_grads(True)
    assert chunked == pytest.approx(plain, rel=1e-6)
    for name, g in plain_grads.items():
        assert (chunked_grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-12, name
    assert chunked_grads["lm_head.weight"][250:].abs().max() == 0
    with torch.no_grad():  # evaluation's paths: the loss alone, and each token's (0 where ignored)
        assert model(x, y).item() == pytest.approx(plain, rel=1e-6)
        per_token = model(x, y, loss_reduction="none")
        model.chunked_loss = False
        assert torch.allclose(per_token, model(x, y, loss_reduction="none"), rtol=1e-6, atol=1e-6)
    assert per_token.shape == (128,) and (per_token.view(4, 32)[1, 5:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("fp8", [False, True])
def test_compile_computes_what_eager_does(fp8):
    """torch.compile (what CUDA runs use) around the model, and around torchao's fp8 layers (emulated on
    CPU), gives eager's loss and gradients: it may fuse, not compute something else."""
    model = tiny(seq=64, pattern="SL", depth=2)  # a short window: the masked attention path too
    with torch.no_grad():  # away from init, where zeroed projections would hide the blocks
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if fp8:
        assert train.convert_fp8(model, "tensorwise", emulate=True)[0]
    x, y = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))

    def loss_and_grads(f):
        model.zero_grad()
        loss = f(x, y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, dynamic=False))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    for e, c in zip(eager_grads, compiled_grads, strict=True):
        assert (c - e).norm() <= 1e-4 * e.norm() + 1e-12


def test_short_windows_limit_what_a_query_sees():
    model = tiny(pattern="SL", depth=2)
    assert model.windows == [16, 32]   # S is half the context; the last layer is always full
    for block in model.transformer.h:  # non-zero output projections, so attention shows in the logits
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    model.windows = [4, 4]             # two layers that each look 4 tokens back reach 8 back in all
    model.register_buffer("mask_4", window_mask(32, 4), persistent=False)
    x = torch.randint(0, 256, (1, 32))
    x2 = x.clone()
    x2[0, 0] = (x2[0, 0] + 1) % 256
    a, b = model(x), model(x2)
    assert torch.allclose(a[0, 9:], b[0, 9:], atol=1e-6)
    assert not torch.allclose(a[0, :9], b[0, :9])


def flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size):
    """FlashAttention's varlen contract, as torch documents it: packed (total, H, D) half-precision
    tensors, sequence i spans cu[i]:cu[i+1], and a query at i sees keys i - left .. i + right (-1: no
    limit). Each sequence computed on its own, in fp32."""
    assert q.dtype in (torch.bfloat16, torch.float16) and q.dim() == 3 and torch.equal(cu_q, cu_k)
    assert cu_q.dtype == torch.int32 and int(cu_q[-1]) == q.size(0) and max_q == max_k
    left, right = window_size
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        i = torch.arange(e - s)
        seen = ((i[None, :] >= i[:, None] - left) | (left < 0)) & ((i[None, :] <= i[:, None] + right) | (right < 0))
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k[s:e].float()) / math.sqrt(q.size(-1))
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v[s:e].float()).to(q.dtype)
    return out


def test_flash_windows_get_what_the_mask_means(monkeypatch):
    """On CUDA the short windows go to FlashAttention's varlen kernel: the batch packed as B sequences of
    T and the window as (size, 0) must give what the masked SDPA path gives (a stand-in kernel here;
    tests/test_gpu.py compares the real one)."""
    monkeypatch.setattr(model_module, "varlen_attn", flash_varlen_reference)
    B, T, H, D, size = 3, 24, 2, 16, 5
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.bfloat16) for _ in range(3))
    window = (size, window_mask(T, size))
    flash = model_module.attention(q, k, v, window, "flash")
    masked = model_module.attention(q, k, v, window, "masked")
    assert flash.shape == (B, T, H, D)
    assert (flash.float() - masked.float()).abs().max() < 2e-2
    # and the window matters: a key size + 1 back is out of sight, one size back is not
    k2 = k.clone()
    k2[:, 0] += 5
    moved = model_module.attention(q, k2, v, window, "flash")
    assert torch.equal(moved[:, size + 1:], flash[:, size + 1:]) and not torch.equal(moved[:, size], flash[:, size])


class FA3StandIn:
    """FlashAttention-3's flash_attn_func contract: (B, T, H, D) half-precision tensors, causal, and a
    query at i sees keys i - left .. i + right; this build also returns the log-sum-exp, as some do."""

    def __init__(self):
        self.window_sizes = []

    def flash_attn_func(self, q, k, v, causal=False, window_size=(-1, -1)):
        assert causal and q.dim() == 4 and q.dtype in model_module.HALF
        self.window_sizes.append(window_size)
        B, T, H, D = q.shape
        starts = torch.arange(0, (B + 1) * T, T, dtype=torch.int32)
        packed = (t.reshape(B * T, H, D) for t in (q, k, v))
        return flash_varlen_reference(*packed, starts, starts, T, T, window_size=window_size).view(B, T, H, D), None


def test_fa3_runs_every_layer_as_the_masked_path_does(monkeypatch):
    """With FlashAttention-3 loaded (nanochat's kernel on Hopper), full and short-window layers alike
    go through it, and the model computes what SDPA computes (a stand-in kernel here, in bf16)."""
    monkeypatch.setattr(model_module, "FA3", fa3 := FA3StandIn())
    model = tiny(pattern="SL", depth=2).to(torch.bfloat16)
    for block in model.transformer.h:  # non-zero output projections, so attention shows in the logits
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    x = torch.randint(0, 256, (2, 32))
    masked = model(x)
    monkeypatch.setattr(GPT, "window_kernel", lambda self, device: "fa3")
    through_fa3 = model(x)
    assert fa3.window_sizes == [(16, 0), (-1, 0)]  # the short window of layer 0, then full context
    assert (through_fa3 - masked).abs().max() < 0.01 * masked.abs().max()
    assert not torch.equal(through_fa3, masked)  # it did run the other kernel


def test_the_summary_can_say_which_kernel_ran_the_windows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, kernel in (((9, 0), "flash"), ((8, 0), "flash"), ((7, 5), "masked")):  # H100, A100, T4
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        model = tiny(pattern="SL", depth=2)
        assert model.window_kernel(torch.device("cpu")) == "masked"
        assert model.window_kernel(torch.device("cuda")) == (kernel if model_module.FLASH_WINDOWS else "masked")
    model.flash_windows = False  # what bench/train_throughput.py --masked-windows does
    assert model.window_kernel(torch.device("cuda")) == "masked"
    assert tiny(pattern="L", depth=2).window_kernel(torch.device("cpu")) == "none"
    monkeypatch.setattr(model_module, "FA3", FA3StandIn())  # loaded: it runs every layer on the GPU
    assert tiny(pattern="L", depth=2).window_kernel(torch.device("cuda")) == "fa3"
    assert model.window_kernel(torch.device("cpu")) == "masked"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(model_module, "FA3", None)
    assert "not a Hopper GPU" in model_module.use_fa3() and model_module.FA3 is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "kernels", None)  # not installed
    assert "pip install kernels" in model_module.use_fa3() and model_module.FA3 is None


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(3, 64, 32)
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.5 and s.max() < 1.3


@pytest.mark.parametrize("recipe", ["348fbb3", "92d63d4"])
def test_optimizer_trains_a_tiny_model(recipe):
    model = tiny()
    opt = train.make_optimizer(model, tiny_hp(256, recipe, weight_decay=0.0))
    kinds = [g["kind"] for g in opt.param_groups]
    assert kinds.count("adamw") == 5 and kinds.count("muon") >= 3
    x = torch.randint(0, 256, (4, 33))
    first = None
    for _ in range(30):
        loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < first - 1.0  # memorises the batch
    with pytest.raises(ValueError, match="same shape"):
        MuonAdamW([{"kind": "muon", "params": [torch.nn.Parameter(torch.zeros(2, 2)),
                                               torch.nn.Parameter(torch.zeros(3, 2))]}])


def test_config_schema_allows_exactly_the_train_flags():
    import yaml

    from pipeline.config import SCHEMA_PATH
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    allowed = set(schema["properties"]["rows"]["additionalProperties"]["properties"]["train"]["properties"])
    # resume_from_step is a row flag too; STORE_FLAGS lists it so that it may also be given by hand beside --spec
    # the recipe and its knob overrides are flags that the plan fills from fields of the row itself
    flags = set(vars(train.build_parser().parse_args([]))) - train.STORE_FLAGS - {"recipe", "knobs"} | {
        "run", "model_tag", "resume_from_step"}
    assert allowed == flags
