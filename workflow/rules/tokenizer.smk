rule tokenizer:
    """Train the BPE on the first train shards; report compression on the validation shard."""
    input:
        spec_inputs("tokenizer"),
    output:
        directory(f"{STORE}/tokenizer/{{key}}"),
    log:
        f"{LOGS}/tokenizer/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/tokenizer/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads("tokenizer")
    resources:
        **job_resources("tokenizer"),
    params:
        command=stage_command("tokenizer"),
    shell:
        "{params.command} > {log} 2>&1"
