rule report:
    """The leaderboard from whatever rows have results; never trains or evaluates anything itself."""
    input:
        reference=local(f"{workflow.basedir}/config/reference.yaml"),  # in the checkout, never in storage
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
    params:
        config=workflow.configfiles[-1] if workflow.configfiles else "config/config.yaml",
        # where this job sees results/ and reports/ (under .snakemake/storage/ with a storage provider)
        results=lambda w, output: os.path.join(os.path.dirname(os.path.dirname(output.md)), "results"),
        out=lambda w, output: os.path.dirname(output.md),
    log:
        f"{LOGS}/report.log",
    conda:
        CONDA_ENV
    shell:
        "python -m pipeline.report build --config {params.config:q} --reference {input.reference:q}"
        " --results {params.results:q} --out {params.out:q} > {log} 2>&1"
