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
        spec=spec_json("download"),
        work=WORK,
    shell:
        "python -m pipeline.download --spec {params.spec:q} --out {output:q}"
        " --work {params.work:q} --threads {threads} > {log} 2>&1"
