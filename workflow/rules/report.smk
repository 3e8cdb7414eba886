rule run_config:
    """The config this run holds, checked: config/config.yaml with --configfile and --config applied."""
    output:
        # named by its digest: another config (an override included) is another input of the report,
        # which Snakemake's input trigger redraws, while the params trigger stays off (workflow/profiles/default)
        json=f"results/configs/{CFG_DIGEST}.json",
    log:
        f"{LOGS}/run_config/{CFG_DIGEST}.log",
    params:
        config=CFG_JSON,
    run:
        pathlib.Path(output.json).write_text(params.config)


rule report:
    """The leaderboard from the rows that have results (or those of report.rows); it never trains anything."""
    input:
        reference=local(f"{workflow.basedir}/config/reference.yaml"),  # in the checkout, never in storage
        config=rules.run_config.output.json,
        rows=report_rows,
    output:
        md=report("reports/leaderboard.md", caption="../report/leaderboard.rst", category="Leaderboard"),
        csv=report("reports/leaderboard.csv", caption="../report/leaderboard.rst", category="Leaderboard"),
        html="reports/leaderboard.html",
        figures=report(
            directory("reports/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        f"{LOGS}/report.log",
    conda:
        CONDA_ENV
    params:
        # where this job sees results/ and reports/ (under .snakemake/storage/ with a storage provider)
        results=lambda w, output: os.path.join(os.path.dirname(os.path.dirname(output.md)), "results"),
        out=lambda w, output: os.path.dirname(output.md),
    shell:
        "python -m pipeline.report build --config {input.config:q} --reference {input.reference:q}"
        " --results {params.results:q} --out {params.out:q} > {log} 2>&1"
