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


rule core_json:
    """The row's CORE result, copied out of the store."""
    input:
        lambda w: store_dirs("core", PLAN.rows[w.row]["core"]),
    output:
        "results/{row}/core.json",
    log:
        f"{LOGS}/core_json/{{row}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m pipeline.publish copy {input}/core.json {output} > {log} 2>&1"
