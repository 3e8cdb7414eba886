import copy
import subprocess
import sys

import pytest
import yaml

from helpers import REPO
from pipeline import config, plan
from pipeline.config import ConfigError


def bad(cfg, edit):
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        config.check(cfg, source="my.yaml")
    return str(err.value)


def test_repo_config_is_valid_and_gets_defaults(repo_config):
    cfg = config.check(repo_config)
    assert cfg["datasets"]["climbmix"]["block_size"] == 10           # schema default
    assert cfg["rows"]["d12"]["train_shards"] == "auto"
    assert cfg["rows"]["d26_fp8"]["launch"] == {"nproc_per_node": 8, "nodes": 1}
    assert "block_size" not in repo_config["datasets"]["climbmix"]  # the input is not modified


def test_seed_rows_carry_the_leaderboard_flags(repo_config):
    rows = config.check(repo_config)["rows"]
    assert rows["d24_jan29"]["train"].items() >= {"depth": 24, "device_batch_size": 16,
                                                  "target_param_data_ratio": 12, "core_metric_every": 3000}.items()
    assert rows["d26_fp8"]["train"]["fp8"] and rows["d26_fp8"]["train"]["target_param_data_ratio"] == 8.5
    assert rows["d26_fp8_1M"]["train"]["total_batch_size"] == 1048576
    assert rows["d24_climbmix"]["dataset"] == "climbmix"
    assert rows["d24_climbmix"]["train"]["target_param_data_ratio"] == 9.5
    assert {"d12", "smoke"} <= set(rows)


@pytest.mark.bad_input
@pytest.mark.parametrize("edit, where, what", [
    (lambda c: c["rows"]["d26_fp8"].update(dataset="fineweb"), "rows.d26_fp8.dataset", "unknown dataset 'fineweb'"),
    (lambda c: c["rows"]["smoke"]["train"].update(depth=3), "rows.smoke.train.depth", "multiple of 2"),
    (lambda c: c["rows"]["smoke"]["train"].update(depth=0), "rows.smoke.train.depth", "less than the minimum"),
    (lambda c: c["rows"]["smoke"]["train"].update(depth=-4), "rows.smoke.train.depth", "less than the minimum"),
    (lambda c: c["tokenizers"]["webtext_4k"].update(vocab_size=260), "tokenizers.webtext_4k.vocab_size",
     "special tokens"),
    (lambda c: c["rows"]["d12"]["train"].update(target_param_data_ratio=-1),
     "rows.d12.train.target_param_data_ratio", "less than or equal to the minimum"),
    (lambda c: c["rows"]["d12"]["train"].update(deph=12), "rows.d12.train", "'deph' was unexpected"),
    (lambda c: c["rows"]["d12"].update(tokenizer="gpt2"), "rows.d12.tokenizer", "unknown tokenizer 'gpt2'"),
    (lambda c: c["rows"]["d12"].update(train_shards=7000), "rows.d12.train_shards", "past the end"),
    (lambda c: c["rows"]["d12"].update(train_shards="lots"), "rows.d12.train_shards", "'lots' is not allowed"),
    (lambda c: c["rows"]["d12"]["core"].update(bundle="nope"), "rows.d12.core.bundle", "unknown CORE bundle"),
    (lambda c: c["rows"]["d12"]["train"].update(device_batch_size="16"), "rows.d12.train.device_batch_size",
     "not of type 'integer'"),
    (lambda c: c["rows"]["d26_fp8_1M"]["train"].update(device_batch_size=24), "rows.d26_fp8_1M.train.total_batch_size",
     "not a multiple"),
    (lambda c: c["rows"]["d12"].pop("train"), "rows.d12", "'train' is a required property"),
    (lambda c: c["datasets"]["climbmix"].pop("val_shard"), "datasets.climbmix", "'val_shard' is a required"),
    (lambda c: c["rows"]["gpt2_xl"].update(dataset="climbmix"), "rows.gpt2_xl", "'train' is a required"),
    (lambda c: c["rows"]["gpt2_xl"].update(core={"max_per_task": 5}), "rows.gpt2_xl.core.bundle",
     "needs a CORE bundle"),
])
def test_bad_config_is_refused_naming_row_and_field(repo_config, edit, where, what):
    msg = bad(repo_config, edit)
    assert msg.startswith("my.yaml is not valid")
    line = next(line for line in msg.splitlines() if line.strip().startswith(where + ":"))
    assert what in line


@pytest.mark.bad_input
@pytest.mark.parametrize("edit, where, what", [
    (lambda c: c["rows"]["d12"].update(recipe="abc1234"), "rows.d12.recipe", "unknown recipe 'abc1234'; recipes"),
    (lambda c: c["rows"]["d12"].update(recipe="latest"), "rows.d12.recipe", "does not match"),
    (lambda c: c["rows"]["d12"].update(knobs={"softcapp": 20}), "rows.d12.knobs.softcapp", "unknown knob"),
    (lambda c: c["rows"]["d12"].update(knobs={"softcap": "20"}), "rows.d12.knobs.softcap", "should be a number"),
    (lambda c: c["rows"]["d12"].update(knobs={"weight_decay": 0.1}), "rows.d12.knobs.weight_decay",
     "set it under the row's train:"),
    (lambda c: c["rows"]["d12"]["train"].update(warmup_ratio=0.1), "rows.d12.train.warmup_ratio",
     "not a base_train flag at nanochat 92d63d4 (it is at 348fbb3, a67eba3, 2c062aa, 324e69c); use warmup_steps"),
    (lambda c: c["rows"]["d24_jan29"]["train"].update(fp8=True), "rows.d24_jan29.train.fp8", "it came in a67eba3"),
    (lambda c: c["rows"]["d24_jan29"].update(val_shard=100), "rows.d24_jan29.val_shard",
     "one of the training shards (0..368)"),
    (lambda c: c["rows"]["d24_jan29"].update(val_shard=5000), "rows.d24_jan29.val_shard", "past the end"),
])
def test_a_bad_recipe_is_refused_naming_row_and_field(repo_config, edit, where, what):
    line = next(line for line in bad(repo_config, edit).splitlines() if line.strip().startswith(where + ":"))
    assert what in line


def test_a_row_may_validate_on_another_shard(repo_config):
    """The documented option: a FineWeb row validates on the dataset's own last shard instead of 369."""
    cfg = copy.deepcopy(repo_config)
    cfg["rows"]["d24_jan29"]["val_shard"] = 1822
    assert plan.make_plan(config.check(cfg)).rows["d24_jan29"]["val_shard"] == 1822


@pytest.mark.bad_input
def test_every_problem_is_listed_not_just_the_first(repo_config):
    def two(c):
        c["rows"]["smoke"]["train"]["depth"] = 5
        c["rows"]["d12"]["train"]["depth"] = -2
    msg = bad(repo_config, two)
    assert "rows.smoke.train.depth" in msg and "rows.d12.train.depth" in msg


@pytest.mark.bad_input
def test_load_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rows: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        config.load(broken)


def test_a_bare_yes_or_no_for_compile_means_the_word(repo_config):
    """YAML reads `compile: yes` as true; the row means the flag's value `yes`, not an error."""
    cfg = copy.deepcopy(repo_config)
    for word in ("yes", "no", "auto"):
        cfg["rows"]["smoke"]["train"]["compile"] = yaml.safe_load(f"compile: {word}")["compile"]
        assert config.check(cfg)["rows"]["smoke"]["train"]["compile"] == word


@pytest.mark.parametrize(("launch", "world"), [(None, 8), ({"nproc_per_node": 2}, 2), ({"nodes": 2}, 16)])
def test_a_batch_the_devices_cannot_split_is_refused_with_the_launchs_world(repo_config, launch, world):
    """The world size counts the schema's launch defaults (8 processes on 1 node) for what the row leaves out."""
    cfg = copy.deepcopy(repo_config)
    row = cfg["rows"]["smoke"]
    row.pop("launch")
    if launch:
        row["launch"] = launch
    row["train"].update(device_batch_size=3, max_seq_len=256, total_batch_size=4096)
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    assert (f"rows.smoke.train.total_batch_size: 4096 tokens is not a multiple of device_batch_size x max_seq_len "
            f"x world size = {3 * 256 * world}; pick a device_batch_size (a power of 2) that divides it"
            ) in str(err.value)
    row["train"].update(device_batch_size=2, total_batch_size=2 * 256 * world * 4)
    config.check(cfg)


def test_checking_a_config_imports_nothing_heavy():
    """The Snakefile checks the config at every parse: that must not pull numpy (or torch) in."""
    probe = "import sys, pipeline.config, pipeline.plan; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
