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
        command=lambda w, input, output, threads: pipeline_launch.stage_command(
            PLAN.spec("download", w.key), input, output, WORK, threads
        ),
    shell:
        "{params.command} > {log} 2>&1"
