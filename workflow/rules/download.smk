rule download:
    """A block of parquet shards, fetched in parallel, verified, resumable."""
    output:
        directory(f"{STORE}/download/{{key}}"),
    params:
        spec=spec_json("download"),
    log:
        f"{LOGS}/download/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/download/{{key}}.tsv"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=120,
    shell:
        "{PYTHON} -m pipeline.download " + STAGE_ARGS + " > {log} 2>&1"
