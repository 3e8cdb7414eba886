"""MuonAdamW split over processes (gloo): each rank updates its own chunk of Muon's matrices and its
own rows of AdamW's big parameters, and the result is what one process computes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import tiny_hp
from pipeline import dims, train
from pipeline.model import GPT, GPTConfig

BATCH_ROWS = 6  # split evenly over 1, 2 and 3 ranks, so every world size averages the same gradient
SPLIT_FROM = 4096  # AdamW splits parameters this big by rows: here the embeddings and lm_head (128 x 64)
HP = tiny_hp(128, weight_decay=0.1)


def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_embd=64))
    model.init_weights()
    return model


def train_tiny(rank, world, out, steps=4):
    """A few optimizer steps of a 2-layer GPT, the batch's rows shared out over `world` ranks; each rank
    saves its weights and its (gathered) optimizer state."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    model = tiny_gpt()
    with torch.no_grad():  # off the init's zeros, whose near-zero gradients Adam would turn into noise
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    opt = train.make_optimizer(model, HP)
    opt.split_from = SPLIT_FROM
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, 128, (BATCH_ROWS, 17), generator=data)
        rows = batch[rank * BATCH_ROWS // world:(rank + 1) * BATCH_ROWS // world]
        model(rows[:, :-1], rows[:, 1:]).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    refused = None
    if world > 1:
        try:
            opt.state_dict()
            refused = False
        except RuntimeError:
            refused = True
        opt.gather_state()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "refused": refused,
                "split_rows": opt._split_rows(model.lm_head.weight, world)},
               out / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def run(world, out):
    out.mkdir()
    if world == 1:
        train_tiny(0, 1, out)
    else:
        mp.spawn(train_tiny, args=(world, out), nprocs=world)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def tensors(state):
    """Every tensor of a model or optimizer state dict, by a stable name."""
    if isinstance(state, torch.Tensor):
        return {"": state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    return {f"{k}/{name}".rstrip("/"): t for k, v in items for name, t in tensors(v).items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(1, tmp_path_factory.mktemp("world") / "1")[0]


@pytest.mark.parametrize("world", [2, 3])
def test_split_optimizer_steps_as_one_process_does(one_process, world, tmp_path):
    ranks = run(world, tmp_path / str(world))
    reference = tensors({"model": one_process["model"], "optim": one_process["optim"]["state"]})
    muon_state = [k for k in reference if "momentum_buffer" in k]
    # a group of one matrix (the value-embedding gate) leaves a rank without any at both world sizes
    assert len(muon_state) == 2 * 4 and any(reference[k].size(0) < world for k in muon_state)
    for saved in ranks:
        assert saved["split_rows"] == (world == 2)  # 128 rows split over 2 ranks; over 3, updated whole
        assert saved["refused"]  # a split state is not checkpointed by accident
        got = tensors({"model": saved["model"], "optim": saved["optim"]["state"]})
        assert got.keys() == reference.keys()
        for name, want in reference.items():  # gradients summed in another order: Adam makes 1e-7 noise on a
            # near-zero gradient (a token seen once) up to ~5e-4 of an embedding weight; a bug moves whole rows
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-3, msg=name)
    # gathered, every rank holds the same whole state: any rank's checkpoint resumes anywhere
    first = tensors(ranks[0]["optim"]["state"])
    for saved in ranks[1:]:
        assert all(torch.equal(first[k], t) for k, t in tensors(saved["optim"]["state"]).items())


def test_compiled_updates_compute_what_eager_does():
    """On CUDA the updates run through torch.compile (nanochat compiles its optimizer too): same weights
    and state as eager over steps whose learning rate, momentum and weight decay change, and a changed
    value is not a new graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = tiny_gpt()
        opt = train.make_optimizer(model, HP, compiled=compiled)
        grads = torch.Generator().manual_seed(1)
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=grads) * 1e-2
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1 - step / 4)
                if group["kind"] == "muon":
                    group["momentum"] = dims.muon_momentum(step * 100, 400, HP["schedule"])
                    group["weight_decay"] = 0.1 * (1 - step / 4)
            opt.step()
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
        runs.append(tensors({"model": model.state_dict(), "optim": opt.state_dict()["state"]}))
    assert counters["stats"]["unique_graphs"] == graphs > 0  # steps 2 and 3 reused step 1's graphs
    eager, compiled = runs
    for name, want in eager.items():
        torch.testing.assert_close(compiled[name], want, rtol=1e-5, atol=1e-6, msg=name)
