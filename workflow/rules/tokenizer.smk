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
        spec=spec_json("tokenizer"),
        work=WORK,
    shell:
        "RAYON_NUM_THREADS={threads} python -m pipeline.tokenizer --spec {params.spec:q} --out {output:q}"
        " --inputs {input:q} --work {params.work:q} --threads {threads} > {log} 2>&1"
