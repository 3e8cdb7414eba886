"""Initial weights and first gradients side by side: our GPT with recipe C against nanochat's GPT at commit C,
both built at depth 4 (seq 512, head dim 64, window pattern L, vocab 32768) from seed 42, in this process.

    .venv/bin/python bench/nanochat_init.py --nanochat /tmp/nanochat-6ed7d1d --recipe 6ed7d1d

nanochat's model module is imported from the checkout (it needs only torch). Every tensor of both state
dicts must be equal (`torch.equal`, none missing on either side), and so must the loss and every
parameter's gradient on one random batch: the strongest check that a recipe builds nanochat's model.
At a825e63, whose init_weights leaves the smear gate and the smear/backout scalars as to_empty left them,
both sides start those at zero (most likely what fresh GPU memory gave run 6; docs/fidelity.md section 5).
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fidelity import RUN  # noqa: E402  (the d4 run that bench/fidelity.py trains)

from pipeline import launch, recipe, train  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402


def built(make, seed=42):
    """A model made on the meta device, then materialised and initialised, as both train scripts do."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = make()
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def theirs(checkout, commit, ours):
    """nanochat's GPT at `commit` in the shape of our config `ours` (one kv head per head, as ours)."""
    sys.path.insert(0, str(checkout))
    gpt = importlib.import_module("nanochat.gpt")
    fields = {k: ours[k] for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_embd")}
    fields["n_kv_head"] = ours["n_head"]
    if "window_pattern" in gpt.GPTConfig.__dataclass_fields__:
        fields["window_pattern"] = ours["window_pattern"]
    model = built(lambda: gpt.GPT(gpt.GPTConfig(**fields)))
    if commit == "a825e63":
        with torch.no_grad():
            for p in (model.smear_gate.weight, model.smear_lambda, model.backout_lambda):
                p.zero_()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanochat", type=Path, required=True, help="a nanochat checkout at the recipe's commit")
    ap.add_argument("--recipe", required=True, choices=recipe.COMMITS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same reduction order on both sides
    hp = train.resolve(train.parse_args([*launch.flag_args(RUN), f"--recipe={args.recipe}"]), 32768, 1)
    ours, nano = built(lambda: GPT(GPTConfig(**hp["model"]))), theirs(args.nanochat, args.recipe, hp["model"])
    ours.chunked_loss = False  # nanochat's loss as it writes it: the chunked one differs in summation order
    a, b = ours.state_dict(), nano.state_dict()
    unequal = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
    missing = sorted(a.keys() ^ b.keys())
    x = torch.randint(0, 32768, (2, 129), generator=torch.Generator().manual_seed(0))
    loss_ours, loss_nano = ours(x[:, :-1], x[:, 1:]), nano(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    loss_ours.backward()
    loss_nano.backward()
    grads = dict(nano.named_parameters())
    grad_unequal = sorted(k for k, p in ours.named_parameters()
                          if k not in grads or not torch.equal(p.grad, grads[k].grad))
    print(f"recipe {args.recipe} ({recipe.DESCRIPTIONS[args.recipe]})")
    print(f"  state dict: {len(a)} tensors; unequal {unequal or 'none'}; on one side only {missing or 'none'}")
    print(f"  loss on one batch: ours {loss_ours.item():.7f} nanochat {loss_nano.item():.7f}")
    print(f"  gradients unequal: {grad_unequal or 'none'}")
    same = not (unequal or missing or grad_unequal) and torch.equal(loss_ours, loss_nano)
    print(f"goal: the same initial weights and first gradients, bit for bit -> {'MET' if same else 'NOT MET'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
