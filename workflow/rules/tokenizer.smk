rule tokenizer:
    """Train the BPE on the first train shards; report compression on the validation shard."""
    input:
        spec_inputs("tokenizer"),
    output:
        directory(f"{STORE}/tokenizer/{{key}}"),
    params:
        spec=spec_json("tokenizer"),
    log:
        f"{LOGS}/tokenizer/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/tokenizer/{{key}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=32000,
        runtime=60,
    shell:
        "RAYON_NUM_THREADS={threads} {PYTHON} -m pipeline.tokenizer " + STAGE_ARGS + " > {log} 2>&1"
