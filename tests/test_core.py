import json
import shutil
import zipfile

import pytest
import torch

from helpers import CORE_MINI
from pipeline import bundle, core, core_tasks, hf, plan, store
from pipeline.core_tasks import Task
from pipeline.errors import StageError
from pipeline.model import GPT, GPTConfig


def encode(text):  # one token per character: spans can be read off the strings
    return [ord(c) for c in text]


BOS = 0


def task(kind, shots=0, delimiter=" ", path=None):
    return Task("t", kind, path, shots, delimiter, 25.0)


class Prefers:
    """A stub model: every position predicts the character `favourite` with high confidence."""

    def __init__(self, favourite, vocab=256):
        self.favourite, self.vocab = ord(favourite), vocab

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., self.favourite] = 10.0
        return logits


def decide(model, kind, item, shots=(), delimiter=" "):
    example = core_tasks.tokenize(task(kind, delimiter=delimiter), item, list(shots), encode, BOS, 10_000)
    return core.Scorer(model, BOS, torch.device("cpu"), 10_000).correct([example])[0]


def test_rendering_matches_nanochat():
    shot = {"query": "S", "choices": ["wrong", "right"], "gold": 1}
    assert core_tasks.render(task("multiple_choice", delimiter="\nAnswer: "), {"query": "Q1", "choices": ["a", "b"]},
                             [shot]) == ["S\nAnswer: right\n\nQ1\nAnswer: a", "S\nAnswer: right\n\nQ1\nAnswer: b"]
    s_shot = {"context_options": ["c0", "c1"], "continuation": "cont", "gold": 0}
    assert core_tasks.render(task("schema"), {"context_options": ["A because X", "B"], "continuation": "z."},
                             [s_shot]) == ["c0 cont\n\nA because X z.", "c0 cont\n\nB z."]
    lm_shot = {"context": "  padded ctx ", "continuation": "yes"}
    assert core_tasks.render(task("language_modeling", delimiter="\nA: "),
                             {"context": "Q: two plus two", "continuation": " four"}, [lm_shot]) == \
        ["padded ctx\nA: yes\n\nQ: two plus two\nA:", "padded ctx\nA: yes\n\nQ: two plus two\nA:  four"]


def test_spans_cover_only_what_differs():
    mc = core_tasks.tokenize(task("multiple_choice"), {"query": "Q", "choices": ["cat", "cow"], "gold": 0}, [],
                             encode, BOS, 100)
    assert mc.spans == [(4, 6), (4, 6)]          # "Q c" is shared: only "at" / "ow" are scored
    schema = core_tasks.tokenize(task("schema"), {"context_options": ["ab", "xyz"], "continuation": "end",
                                                  "gold": 1}, [], encode, BOS, 100)
    assert [r[s:e] for r, (s, e) in zip(schema.rows, schema.spans, strict=True)] == [encode(" end")] * 2
    lm = core_tasks.tokenize(task("language_modeling"), {"context": "ctx ", "continuation": "go"}, [], encode, BOS,
                             100)
    (s, e), row = lm.spans[0], lm.rows[0]
    assert row[0] == BOS and row[s:e] == encode(" go")  # the delimiter's space joins the continuation


def test_multiple_choice_picks_the_lowest_mean_loss():
    item = {"query": "Q", "choices": ["xx", "aa", "ab"], "gold": 1}
    assert decide(Prefers("a"), "multiple_choice", item)
    assert not decide(Prefers("x"), "multiple_choice", item)
    # mean, not sum: "aaaa" (all favoured) beats "a" only because every token is favoured
    assert decide(Prefers("a"), "multiple_choice", {"query": "Q", "choices": ["ab", "aaaa"], "gold": 1})


def test_schema_scores_the_shared_continuation():
    item = {"context_options": ["one", "two"], "continuation": "zz", "gold": 0}
    # the stub ignores context, so both options score alike and the first minimum wins: gold 0
    assert decide(Prefers("z"), "schema", item)
    assert not decide(Prefers("z"), "schema", {**item, "gold": 1})


def test_language_modeling_needs_every_token_greedy():
    assert decide(Prefers("a"), "language_modeling", {"context": "c", "continuation": "aaa"}, delimiter="a")
    assert not decide(Prefers("a"), "language_modeling", {"context": "c", "continuation": "aab"}, delimiter="a")


def test_fewshot_never_includes_the_item_and_is_seeded():
    items = [{"query": str(i)} for i in range(12)]
    for idx in range(12):
        shots = core_tasks.fewshot(items, idx, 10)
        assert items[idx] not in shots and len(shots) == 10
        assert shots == core_tasks.fewshot(items, idx, 10)
    assert core_tasks.fewshot(items, 0, 10) != core_tasks.fewshot(items, 1, 10)
    with pytest.raises(StageError, match="10-shot needs at least 11 items"):
        core_tasks.fewshot(items[:5], 0, 10)


def test_long_prompts_lose_tokens_on_the_left():
    ex = core_tasks.tokenize(task("language_modeling"), {"context": "x" * 50, "continuation": "yy"}, [], encode, BOS,
                             max_len=10)
    row, (s, e) = ex.rows[0], ex.spans[0]
    assert len(row) == 10 and row[-2:] == encode("yy") and row[s:e] == encode(" yy")
    tiny = core_tasks.tokenize(task("language_modeling"), {"context": "c", "continuation": "abcdef"}, [], encode, BOS,
                               max_len=4)
    assert tiny.spans[0][0] == 1  # the span keeps a token before it to be scored from


def test_our_model_sees_long_prompts_whole_as_nanochats_does():
    """nanochat crops CORE prompts only for a model with a position limit (its GPT-2 wrapper), never for
    its own GPT, whose rotary tables run 10x past the context: past the context every layer, the full
    ones too, sees a sliding window of sequence_len positions."""
    ex = core_tasks.tokenize(task("language_modeling"), {"context": "x" * 50, "continuation": "yy"}, [], encode, BOS,
                             max_len=None)
    assert len(ex.rows[0]) == len([BOS] + encode("x" * 50 + " yy"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, window_pattern="L"))
    model.init_weights()
    for block in model.transformer.h:  # non-zero output projections, so attention shows in the logits
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    x = torch.randint(0, 64, (1, 200))  # past even the 10x tables (160): made for the call
    moved = x.clone()
    moved[0, 0] = (moved[0, 0] + 1) % 64
    a, b = model(x), model(moved)
    assert torch.equal(a[0, 33:], b[0, 33:])  # two windows of 16 reach 32 back, no further
    assert not torch.allclose(a[0, 1:17], b[0, 1:17])
    assert torch.allclose(model(x[:, :16]), a[:, :16], atol=1e-6)  # within the context, as in training


def test_centered_accuracy():
    assert core_tasks.centered(0.25, 25) == 0.0
    assert core_tasks.centered(1.0, 25) == 1.0
    assert core_tasks.centered(0.5, 62) == pytest.approx((0.5 - 0.62) / 0.38)


@pytest.fixture
def mini(tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(CORE_MINI, dest)
    return dest


def test_the_mini_bundle_has_18_of_22_tasks(mini):
    tasks = core_tasks.load_tasks(mini)
    assert len(tasks) == 22
    missing = sorted(t.label for t in tasks if not t.path.is_file())
    assert missing == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    boolq = next(t for t in tasks if t.label == "boolq")
    assert (boolq.type, boolq.num_fewshot, boolq.delimiter, boolq.random_baseline) == \
        ("multiple_choice", 10, "\nAnswer: ", 62.0)


@pytest.mark.bad_input
@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a"], "gold": 3}', "gold 3 is not an index into its 1 options"),
    ('{"query": "q", "choices": ["a", "b"]', "not valid JSON"),
    ('{"query": "q", "gold": 0}', "a multiple_choice item needs choices"),
])
def test_bad_task_lines_name_the_file_and_line(mini, line, message):
    path = mini / "eval_data" / "world_knowledge" / "arc_easy.jsonl"
    path.write_text(path.read_text() + line + "\n")
    arc = next(t for t in core_tasks.load_tasks(mini) if t.label == "arc_easy")
    with pytest.raises(StageError, match=f"arc_easy.jsonl:41: {message}"):
        core_tasks.load_items(arc)


@pytest.mark.bad_input
def test_unknown_task_type_names_core_yaml(mini):
    text = (mini / "core.yaml").read_text().replace("icl_task_type: schema", "icl_task_type: essay", 1)
    (mini / "core.yaml").write_text(text)
    with pytest.raises(StageError, match="core.yaml: task 'winograd' has unknown icl_task_type 'essay'"):
        core_tasks.load_tasks(mini)


def scorer_for(smoke_data, batch_tokens):
    from pipeline import tokenizer
    enc = tokenizer.load(smoke_data["tokenizer"])
    torch.manual_seed(0)
    model = core.GPT(core.GPTConfig(sequence_len=256, vocab_size=enc.n_vocab, n_layer=2, n_head=1, n_embd=128))
    model.init_weights()
    for block in model.transformer.h:  # a random but non-trivial model
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    bos = enc.encode_single_token("<|bos|>")
    return core.Scorer(model.eval(), bos, torch.device("cpu"), batch_tokens), enc, bos


@pytest.mark.bad_input
def test_a_missing_task_file_is_an_error_unless_allowed(smoke_data, mini):
    scorer, enc, bos = scorer_for(smoke_data, 4096)
    tasks = core_tasks.load_tasks(mini)
    with pytest.raises(StageError, match="hellaswag.jsonl: task file of 'hellaswag_zeroshot' is missing"):
        core.evaluate_core(scorer, tasks, enc.encode_ordinary, bos, 256, 4, False, log=lambda m: None)
    result = core.evaluate_core(scorer, tasks, enc.encode_ordinary, bos, 256, 4, True, log=lambda m: None)
    assert result["partial"] and result["tasks_evaluated"] == 18
    assert result["core_metric"] == pytest.approx(sum(t["centered"] for t in result["tasks"].values()) / 18)
    assert core.gpt2_verdict(result) == {"gpt2_core": 0.256525, "comparable_to_gpt2": False, "beats_gpt2": None}


def test_batched_scoring_gives_the_same_answers_as_one_item_at_a_time(smoke_data, mini):
    batched, enc, bos = scorer_for(smoke_data, 1 << 20)
    single, _, _ = scorer_for(smoke_data, 1)
    for t in core_tasks.load_tasks(mini):
        if not t.path.is_file():
            continue
        pool = core_tasks.shuffled(core_tasks.load_items(t))[:6]
        examples = [core_tasks.tokenize(t, it, core_tasks.fewshot(pool, i, min(t.num_fewshot, 3)),
                                        enc.encode_ordinary, bos, 256) for i, it in enumerate(pool)]
        assert batched.correct(examples) == single.correct(examples), t.label


def test_by_hand_on_a_store_checkpoint_gives_the_pipelines_core(smoke_run, mini, tmp_path):
    """`python -m pipeline.core --checkpoint <train dir> --bundle <dir> --out core.json`, no --tokenizer:
    the checkpoint's manifest leads to it, and numbers, checkpoint key and bundle sha256 are those of
    the pipeline's results/smoke/core.json."""
    published = json.loads((smoke_run["dir"] / "results" / "smoke" / "core.json").read_text())
    ckpt = smoke_run["dir"] / smoke_run["cfg"]["store_dir"] / "train" / published["checkpoint_key"]
    settings = smoke_run["cfg"]["rows"]["smoke"]["core"]
    out = tmp_path / "core.json"
    assert core.main(["--checkpoint", str(ckpt), "--bundle", str(mini), "--max-per-task", str(settings["max_per_task"]),
                      "--allow-missing-tasks", "--batch-tokens", str(settings["batch_tokens"]), "--out", str(out)]) == 0
    mine = json.loads(out.read_text())
    assert mine["tasks"] == published["tasks"]
    for field in ("core_metric", "checkpoint_key", "bundle_sha256", "partial", "missing_tasks"):
        assert mine[field] == published[field], field


@pytest.mark.bad_input
def test_by_hand_without_a_tokenizer_to_find_asks_for_one(smoke_data, tmp_path, capsys):
    ckpt = tmp_path / "hand-made"  # model files, but no store manifest to follow to a tokenizer
    ckpt.mkdir()
    rc = core.main(["--checkpoint", str(ckpt), "--bundle", str(CORE_MINI), "--out", str(tmp_path / "core.json")])
    assert rc == 2 and "give --tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "core.json").exists()


def test_scored_spans_get_the_losses_of_the_full_logits():
    """The lm_head runs on the scored positions only: each span's losses and argmax must be those read
    off the whole logits of its row, run alone, as a straightforward scorer computes them."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=200, n_layer=2, n_head=2, n_embd=64, window_pattern="SL"))
    model.init_weights()
    with torch.no_grad():  # away from init, where zeroed projections would hide the blocks
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [torch.randint(1, 200, (n,)).tolist() for n in (40, 7, 64, 23)]
    spans = [(30, 40), (1, 7), (63, 64), (5, 5)]  # the last one empty: nothing scored
    losses, predictions = core.Scorer(model, BOS, torch.device("cpu"), 1 << 20).score(rows, spans)
    assert [len(x) for x in losses] == [len(x) for x in predictions] == [10, 6, 1, 0]
    for row, (s, e), got_losses, got_predictions in zip(rows, spans, losses, predictions, strict=True):
        ids = torch.tensor([row])
        with torch.no_grad():
            logits = model(ids)[0]
        want = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")[s - 1:e - 1]
        assert got_losses == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
        assert got_predictions == logits.argmax(-1)[s - 1:e - 1].tolist()


def make_zip(src, dest):
    with zipfile.ZipFile(dest, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, "eval_bundle/" + str(p.relative_to(src)))
    return dest


def test_bundle_stage_unpacks_a_zip_and_records_its_sha256(mini, tmp_path):
    zipped = make_zip(mini, tmp_path / "eval_bundle.zip")
    spec = plan.make_spec("bundle", {"url": zipped.as_uri()})
    out = tmp_path / "out"
    bundle.run(spec, [], out, tmp_path / "work", 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["sha256"] == store.sha256_file(zipped)
    assert (out / "core.yaml").is_file() and (out / "eval_data" / "world_knowledge" / "arc_easy.jsonl").is_file()
    assert store.verify(out) == []
    wrong = plan.make_spec("bundle", {"url": zipped.as_uri(), "sha256": "0" * 64})
    wrong["settings"] = {"attempts": 1}
    with pytest.raises(StageError, match="is not the configured 0000"):
        bundle.run(wrong, [], tmp_path / "out2", tmp_path / "work2", 1)
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    bad = plan.make_spec("bundle", {"url": str(not_zip)})
    bad["settings"] = {"attempts": 1}
    with pytest.raises(StageError, match="not a zip file"):
        bundle.run(bad, [], tmp_path / "out3", tmp_path / "work3", 1)


def test_bundle_stage_copies_a_folder_and_leaves_it_alone(mini, tmp_path):
    spec = plan.make_spec("bundle", {"url": str(mini)})
    before = sorted(p.name for p in mini.rglob("*"))
    bundle.run(spec, [], tmp_path / "out", tmp_path / "work", 1)
    assert sorted(p.name for p in mini.rglob("*")) == before
    digest = json.loads((tmp_path / "out" / "manifest.json").read_text())["resolved"]["sha256"]
    assert digest == bundle.tree_digest(mini)
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["outputs"]) == len(
        [p for p in mini.rglob("*") if p.is_file()])


def test_two_ranks_give_the_same_core_as_one(smoke_data, mini, tmp_path):
    import os
    import subprocess
    import sys

    from helpers import REPO
    scorer, _, _ = scorer_for(smoke_data, 4096)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(scorer.model.state_dict(), ckpt / "model.pt")
    store.write_json(ckpt / "model.json", {"config": scorer.model.config.to_dict()})
    args = ["--checkpoint", str(ckpt), "--tokenizer", str(smoke_data["tokenizer"]), "--bundle", str(mini),
            "--max-per-task", "6", "--allow-missing-tasks"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "pipeline.core", *args, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "pipeline.core", "--", *args, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert {k: v["correct"] for k, v in a["tasks"].items()} == {k: v["correct"] for k, v in b["tasks"].items()}
    assert a["core_metric"] == pytest.approx(b["core_metric"])
    assert a["missing_tasks"] == ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]


def test_a_huggingface_gpt2_goes_through_the_same_harness(smoke_data, mini, tmp_path):
    """A tiny random GPT-2 saved locally (no hub): 64 positions, so most prompts are cropped."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    out = tmp_path / "core.json"
    zipped = make_zip(mini, tmp_path / "eval_bundle.zip")  # the CLI takes the zip as it is downloaded
    rc = core.main(["--hf-model", str(tmp_path / "tiny-gpt2"), "--tokenizer", str(smoke_data["tokenizer"]),
                    "--bundle", str(zipped), "--max-per-task", "4", "--allow-missing-tasks", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["tasks_evaluated"] == 18 and result["partial"]
    assert all(t["items"] == 4 for t in result["tasks"].values())
    wrapped = hf.HFCausalLM(tmp_path / "tiny-gpt2", torch.device("cpu"))
    assert wrapped.sequence_len == 64
    assert wrapped(torch.zeros(2, 10, dtype=torch.long)).shape == (2, 10, 4096)
