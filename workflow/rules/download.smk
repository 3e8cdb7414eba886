rule download:
    """A block of parquet shards, fetched in parallel, verified, resumable."""
    output:
        directory(f"{STORE}/download/{{key}}"),
    log:
        f"{LOGS}/download/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/download/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads("download")
    resources:
        **job_resources("download"),
    params:
        command=stage_command("download"),
    shell:
        "{params.command} > {log} 2>&1"
