rule pretokenize:
    """One memory-mappable token shard per parquet shard of a block."""
    input:
        spec_inputs("pretokenize"),
    output:
        directory(f"{STORE}/pretokenize/{{key}}"),
    log:
        f"{LOGS}/pretokenize/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/pretokenize/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads("pretokenize")
    resources:
        **job_resources("pretokenize"),
    params:
        command=stage_command("pretokenize"),
    shell:
        "{params.command} > {log} 2>&1"


rule token_shards:
    """The row's data, ready to train on: tokenizer and token shard blocks, with counts."""
    input:
        tokenizer=row_dirs("tokenizer"),
        blocks=row_dirs("pretokenize"),
    output:
        "results/{row}/token_shards.json",
    log:
        f"{LOGS}/token_shards/{{row}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m pipeline.publish token-shards --row {wildcards.row} --tokenizer {input.tokenizer}"
        " --blocks {input.blocks} --out {output} > {log} 2>&1"
