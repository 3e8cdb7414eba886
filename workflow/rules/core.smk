rule bundle:
    """The CORE eval bundle: fetched (checksum recorded), unpacked, sealed."""
    output:
        directory(f"{STORE}/bundle/{{key}}"),
    params:
        spec=spec_json("bundle"),
        work=WORK,
    log:
        f"{LOGS}/bundle/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/bundle/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m pipeline.bundle --spec {params.spec:q} --out {output:q} --work {params.work:q} > {log} 2>&1"


rule core:
    """The CORE metric of a trained model, with train/val bits per byte and samples."""
    input:
        spec_inputs("core"),
    output:
        directory(f"{STORE}/core/{{key}}"),
    params:
        command=lambda w, input, output: pipeline_launch.core_command(PLAN.spec("core", w.key), input, output, WORK),
    log:
        f"{LOGS}/core/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/core/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: workflow.cores
    resources:
        gpu=lambda w: pipeline_launch.gpus(PLAN.spec("core", w.key)),
        mem_mb=32000,
        runtime=4 * 60,
    shell:
        "{params.command} > {log} 2>&1"


rule publish_row:
    """The row's public face: core.json, and manifest.json with every stage manifest of its chain."""
    input:
        lambda w: [d for stage in pipeline_plan.STAGES for d in store_dirs(stage, PLAN.rows[w.row].get(stage, []))],
    output:
        core="results/{row}/core.json",
        manifest="results/{row}/manifest.json",
    params:
        stages=lambda w: " ".join(
            f"{stage}={d}" for stage in pipeline_plan.STAGES for d in store_dirs(stage, PLAN.rows[w.row].get(stage, []))
        ),
        command=lambda w: f"snakemake --cores all results/{w.row}/core.json",
    log:
        f"{LOGS}/publish_row/{{row}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m pipeline.publish row --row {wildcards.row} --out results/{wildcards.row}"
        " --command {params.command:q} {params.stages} > {log} 2>&1"
