# nanochat's time-to-GPT-2 leaderboard, one hash-addressed artifact per stage.
#
#   snakemake --cores all                                      # the smoke row, on a CPU
#   snakemake --cores all results/d24_climbmix/train_summary.json
#
# Store paths come from pipeline.plan (`python -m pipeline.plan show` lists them); rules only
# choose paths and resources and call `python -m pipeline.<stage>`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# `snakemake` with no target: the smoke row, end to end, and the leaderboard that shows it. Its toy
# miniseries and A/B: `snakemake --cores all results/series/smoke/series.json reports/leaderboard.md`.
DEFAULT_TARGETS = [
    "results/smoke/token_shards.json",
    "results/smoke/train_summary.json",
    "results/smoke/core.json",
    "reports/leaderboard.md",
]


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/pretokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/core.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/series.smk"


localrules:
    all,
    token_shards,
    train_summary,
    publish_row,
    series,
    run_config,
    report,


rule all:
    input:
        DEFAULT_TARGETS,
