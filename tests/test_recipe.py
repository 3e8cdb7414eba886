"""Recipes by commit: the knobs of every recipe are nanochat's at that commit, and every published row
derives exactly the values its commit's own base_train derives."""

import copy

import pytest

from helpers import REPO
from pipeline import config, plan, report
from pipeline import recipe as recipes

COMMITS = ("348fbb3", "a67eba3", "2c062aa", "324e69c", "6ed7d1d", "a825e63", "92d63d4")

# Each knob across the seven commits, read off nanochat's base_train.py, gpt.py, optim.py and dataset.py
# at each one (pipeline/recipe.py keeps them as a changelog; this is the same facts by column).
KNOBS = {
    #                          348fbb3    a67eba3    2c062aa    324e69c    6ed7d1d    a825e63    92d63d4
    "total_batch_size":       (524288,    524288,    -1,        -1,        -1,        -1,        -1),
    "target_param_data_ratio": (10.5,     10.5,      10.5,      10.5,      10.5,      10.5,      12),
    "unembedding_lr":         (0.004,     0.004,     0.004,     0.004,     0.008,     0.008,     0.008),
    "weight_decay":           (0.2,       0.2,       0.2,       0.2,       0.28,      0.28,      0.28),
    "warmdown_ratio":         (0.5,       0.5,       0.5,       0.5,       0.65,      0.65,      0.65),
    "final_lr_frac":          (0.0,       0.0,       0.0,       0.0,       0.05,      0.05,      0.05),
    "warmup_ratio":           (0.0,       0.0,       0.0,       0.0,       None,      None,      None),
    "warmup_steps":           (None,      None,      None,      None,      40,        40,        40),
    "adam_beta1":             (0.8,       0.8,       0.8,       0.8,       None,      None,      None),
    "adam_beta2":             (0.95,      0.95,      0.95,      0.95,      None,      None,      None),
    "eval_tokens":            (20 * 2**19, 40 * 2**19, 40 * 2**19, 80 * 2**19, 80 * 2**19, 80 * 2**19, 80 * 2**19),
    "softcap":                (15,        15,        15,        20,        15,        15,        15),
    "rope_base":              (10000,     10000,     10000,     10000,     100000,    100000,    100000),
    "rotary_bf16":            (True,      True,      True,      True,      False,     False,     False),
    "short_window_divisor":   (2,         2,         2,         2,         3,         4,         4),
    "short_window_tile":      (0,         0,         0,         0,         128,       128,       128),
    "qk_scale":               (1.0,       1.0,       1.0,       1.0,       1.15,      1.2,       1.2),
    "ve_gate_channels":       (32,        32,        32,        32,        12,        12,        12),
    "ve_gate_scale":          (2,         2,         2,         2,         3,         3,         3),
    "ve_gate_init":           (0,         0,         0,         0,         0.02,      0.02,      0.02),
    "wte_init_std":           (1.0,       1.0,       1.0,       1.0,       0.8,       0.8,       0.8),
    "c_fc_init_scale":        (1.0,       1.0,       1.0,       1.0,       0.5,       0.4,       0.4),
    "resid_lambda_init":      ([1, 0],    [1, 0],    [1, 0],    [1, 0],    [1, 0],      [1.15, 0.1], [1.15, 0.1]),
    "x0_lambda_init":         ([0.1, 0],  [0.1, 0],  [0.1, 0],  [0.1, 0],  [0.1, 0],    [0.2, 0.15], [0.2, 0.15]),
    "smear":                  (False,     False,     False,     False,     False,     True,      True),
    "backout":                (False,     False,     False,     False,     False,     True,      True),
    "smear_gate_init":        (0,         0,         0,         0,         0,         0,         0.02),
    "backout_lambda_init":    (0,         0,         0,         0,         0,         0,         0.2),
    "smear_gate_flops":       (False,) * 6 + (True,),
    "fp8_min_dim":            (0,         16,        16,        128,       128,       128,       128),
    "lm_head_betas":          (None,      None,      None,      None,      [0.8, 0.96], [0.8, 0.96], [0.8, 0.96]),
    "lm_head_weight_decay":   (0,         0,         0,         0,         0.01,      0.01,      0.01),
    "wte_betas":              (None,      None,      None,      None,      [0.8, 0.995], [0.8, 0.995], [0.8, 0.995]),
    "wte_weight_decay":       (0,         0,         0,         0,         0.001,     0.001,     0.001),
    "ve_lr_scale":            (1.0,       1.0,       1.0,       1.0,       0.5,       0.5,       0.5),
    "ve_betas":               (None,      None,      None,      None,      [0.8, 0.995], [0.8, 0.995], [0.8, 0.995]),
    "ve_weight_decay":        (0,         0,         0,         0,         0.01,      0.01,      0.01),
    "resid_betas":            (None,      None,      None,      None,      [0.8, 0.95], [0.8, 0.95], [0.8, 0.95]),
    "resid_weight_decay":     (0,         0,         0,         0,         0.05,      0.05,      0.05),
    "muon_beta2":             (0.95,      0.95,      0.95,      0.95,      0.9,       0.9,       0.9),
    "polar_express_norm":     (1.02,      1.02,      1.02,      1.02,      1.01,      1.01,      1.01),
    "muon_bf16":              ("always",) * 6 + ("compute",),
    "muon_eq":                (False,) * 6 + (True,),
    "muon_plus":              (False,) * 6 + (True,),
    "adamw_fp32_math":        (False,) * 6 + (True,),
    "weight_decay_scaling":   ("depth",) * 3 + ("horizon",) * 4,
    "weight_decay_schedule":  ("linear",) * 4 + ("cosine",) * 3,
    "momentum_warmup_steps":  (300,       300,       300,       300,       400,       400,       400),
    "momentum_peak":          (0.95,      0.95,      0.95,      0.95,      0.97,      0.97,      0.97),
    "momentum_final":         (None,      None,      None,      None,      None,      0.90,      0.90),
    "token_bytes":            ("decoded",) * 6 + ("raw",),
    "val_shard":              ("last_on_disk",) * 3 + ("pinned",) * 4,
}


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_each_knob_is_nanochats_at_each_commit(knob):
    got = tuple(recipes.knobs(c).get(knob) for c in COMMITS)
    assert got == KNOBS[knob]


def test_the_table_covers_every_knob_that_differs_between_commits():
    differing = {name for name in set().union(*(recipes.knobs(c) for c in COMMITS))
                 if len({repr(recipes.knobs(c).get(name)) for c in COMMITS}) > 1}
    assert differing <= set(KNOBS), sorted(differing - set(KNOBS))
    assert recipes.COMMITS == COMMITS and recipes.NEWEST == "92d63d4"


def test_each_knob_says_which_commit_it_comes_from():
    sources = recipes.sources("a825e63")
    assert sources["softcap"] == "6ed7d1d"           # 20 at 324e69c, back to 15 at 6ed7d1d
    assert sources["smear"] == "a825e63" and sources["total_batch_size"] == "2c062aa"
    assert sources["matrix_lr"] == "348fbb3" and "warmup_ratio" not in sources  # dropped at 6ed7d1d


def test_overrides_are_checked():
    assert recipes.knobs("348fbb3", {"softcap": 20})["softcap"] == 20
    for name, value, message in (("softcapp", 1, "unknown knob"), ("softcap", "x", "should be a number"),
                                 ("smear", 1, "true or false"), ("token_bytes", "utf8", "not one of"),
                                 ("weight_decay", 0.1, "base_train flag")):
        with pytest.raises(recipes.RecipeError, match=message):
            recipes.knobs("92d63d4", {name: value})
    with pytest.raises(recipes.RecipeError, match="unknown recipe 'abc1234'"):
        recipes.knobs("abc1234")
    assert recipes.commit_of("a825e63b1d3c1a2b") == "a825e63" and recipes.commit_of(None) == "92d63d4"


# Every published row as its own commit derives it: nanochat's base_train run on CPU with each row's
# flags until it had printed them, its optimizer's param groups dumped (docs/fidelity.md says how).
PUBLISHED = {  # row: (steps, total batch, Muon weight decay, eval tokens, {group: lr})
    "d24_jan29": (16704, 524288, 0.05, 10485760,
                  {"lm_head": 0.0028284271247461905, "wte": 0.21213203435596426, "value_embeds": 0.21213203435596426,
                   "resid_lambdas": 0.005, "x0_lambdas": 0.5, "matrix": 0.02}),
    "d26_fp8": (14889, 524288, 0.042603550295857995, 20971520,
                {"lm_head": 0.00271746488194703, "wte": 0.20380986614602722, "value_embeds": 0.20380986614602722,
                 "resid_lambdas": 0.005, "x0_lambdas": 0.5, "matrix": 0.02}),
    "d26_fp8_1M": (7226, 1048576, 0.042603550295857995, 20971520,
                   {"lm_head": 0.0038430756913220916, "wte": 0.2882306768491568, "value_embeds": 0.2882306768491568,
                    "resid_lambdas": 0.007071067811865476, "x0_lambdas": 0.7071067811865476,
                    "matrix": 0.028284271247461905}),
    "d24_climbmix": (6612, 1048576, 0.042670413841454924, 41943040,
                     {"lm_head": 0.004000000000000001, "wte": 0.30000000000000004, "value_embeds": 0.30000000000000004,
                      "resid_lambdas": 0.007071067811865476, "x0_lambdas": 0.7071067811865476,
                      "matrix": 0.028284271247461905}),
    "d24_mar09": (6055, 1048576, 0.059738424470929946, 41943040,
                  {"lm_head": 0.008000000000000002, "wte": 0.30000000000000004, "value_embeds": 0.15000000000000002,
                   "resid_lambdas": 0.007071067811865476, "x0_lambdas": 0.7071067811865476,
                   "matrix": 0.028284271247461905}),
    "d24_mar14": (5568, 1048576, 0.05973842446340308, 41943040,
                  {"lm_head": 0.008000000000000002, "wte": 0.30000000000000004, "value_embeds": 0.15000000000000002,
                   "resid_lambdas": 0.007071067811865476, "x0_lambdas": 0.7071067811865476, "smear": 0.2,
                   "matrix": 0.028284271247461905}),
    "d24_master": (5568, 1048576, 0.05973842446340308, 41943040,
                   {"lm_head": 0.008000000000000002, "wte": 0.30000000000000004, "value_embeds": 0.15000000000000002,
                    "resid_lambdas": 0.007071067811865476, "x0_lambdas": 0.7071067811865476, "smear": 0.2,
                    "matrix": 0.028284271247461905}),
    "d12": (2520, 524288, 0.28, 41943040,
            {"lm_head": 0.008, "wte": 0.3, "value_embeds": 0.15, "resid_lambdas": 0.005, "x0_lambdas": 0.5,
             "smear": 0.2, "matrix": 0.02}),
}
# nanochat's num_flops_per_token at each row's commit (the same run): what total_training_flops multiplies
FLOPS_PER_TOKEN = {"d24_jan29": 4945112064, "d26_fp8": 6185320128, "d26_fp8_1M": 6185320128,
                   "d24_climbmix": 4945112064, "d24_mar09": 4860160128, "d24_mar14": 4775225472,
                   "d24_master": 4775225616, "d12": 759696048}


@pytest.mark.parametrize("row", sorted(PUBLISHED))
def test_every_published_row_derives_what_its_commit_derives(repo_config, row):
    steps, batch, weight_decay, eval_tokens, lrs = PUBLISHED[row]
    got = plan.resolved_row(config.check(repo_config), row)
    assert (got["num_iterations"], got["total_batch_size"], got["weight_decay"], got["eval_tokens"]) == (
        steps, batch, weight_decay, eval_tokens)  # exactly: the same floats, in nanochat's order of operations
    assert {**{name: group[0] for name, group in got["adamw"].items()}, "matrix": got["matrix_lr"]} == lrs
    assert got["flops_per_token"] == FLOPS_PER_TOKEN[row]


def test_the_published_rows_name_their_commits(repo_config):
    cfg = config.check(repo_config)
    reference = {r["number"]: r["commit"] for r in report.load_reference(REPO / "config" / "reference.yaml")["rows"]
                 if r.get("commit")}
    for name, row in cfg["rows"].items():
        if row.get("reference") in reference:
            assert recipes.commit_of(row.get("recipe")) == reference[row["reference"]], name
    assert {row.get("reference") for row in cfg["rows"].values()} >= {0, 1, 2, 3, 4, 5, 6}


def test_a_recipe_change_rekeys_training_and_nothing_upstream(repo_config):
    before = plan.make_plan(config.check(repo_config))
    for change in ({"recipe": "6ed7d1d"}, {"knobs": {"softcap": 20}}):
        cfg = copy.deepcopy(repo_config)
        cfg["rows"]["d24_mar14"].update(change)
        after = plan.make_plan(config.check(cfg))
        changed = {s for s in plan.STAGES if before.rows["d24_mar14"].get(s) != after.rows["d24_mar14"].get(s)}
        assert changed == {"train", "core"}, change
        assert all(before.rows[r] == after.rows[r] for r in before.rows if r != "d24_mar14")


def test_the_plan_prints_a_rows_recipe_and_derived_values(capsys):
    assert plan.main(["show", "--row", "d24_mar14", "--resolved"]) == 0
    import json
    resolved = json.loads(capsys.readouterr().out)["d24_mar14"]["resolved"]
    assert resolved["recipe"] == "a825e63" and resolved["softcap"] == 15 and resolved["val_shard"] == 6542
    assert resolved["knob_sources"]["qk_scale"] == "a825e63" and resolved["num_iterations"] == 5568
    assert plan.main(["show", "--row", "no_such_row"]) == 2
