rule series:
    """A miniseries and its A/B (the config's series:): the members' published results, their power-law
    fits and GPT-2 crossing, and the A/B verdict."""
    input:
        config=rules.run_config.output.json,
        rows=series_rows,
    output:
        "results/series/{series}/series.json",
    log:
        f"{LOGS}/series/{{series}}.log",
    conda:
        CONDA_ENV
    params:
        # results/series/<name>/series.json -> results (under .snakemake/storage/ with a storage provider)
        results=lambda w, output: os.path.dirname(os.path.dirname(os.path.dirname(output[0]))),
    shell:
        "python -m pipeline.series build --name {wildcards.series} --config {input.config:q}"
        " --results {params.results:q} --out {output:q} > {log} 2>&1"
