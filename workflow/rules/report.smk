rule report:
    """The leaderboard from whatever rows have results; never trains or evaluates anything itself."""
    input:
        reference=f"{workflow.basedir}/config/reference.yaml",
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
    log:
        f"{LOGS}/report.log",
    conda:
        CONDA_ENV
    shell:
        "python -m pipeline.report build --config {params.config:q} --reference {input.reference:q}"
        " --results results --out reports > {log} 2>&1"
