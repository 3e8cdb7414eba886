rule bundle:
    """The CORE eval bundle: fetched (checksum recorded), unpacked, sealed."""
    output:
        directory(f"{STORE}/bundle/{{key}}"),
    log:
        f"{LOGS}/bundle/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/bundle/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads("bundle")
    resources:
        **job_resources("bundle"),
    params:
        command=stage_command("bundle"),
    shell:
        "{params.command} > {log} 2>&1"


rule core:
    """The CORE metric of a trained model, with train/val bits per byte and samples."""
    input:
        spec_inputs("core"),
    output:
        directory(f"{STORE}/core/{{key}}"),
    log:
        f"{LOGS}/core/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/core/{{key}}.tsv"
    conda:
        lambda w: CONDA_ENV_HF if "hf_model" in PLAN.spec("core", w.key)["params"] else CONDA_ENV
    threads: job_threads("core")
    resources:
        **job_resources("core"),
    params:
        command=lambda w, input, output, threads: pipeline_launch.core_command(
            PLAN.spec("core", w.key), input, output, WORK, threads
        ),
    shell:
        "{params.command} > {log} 2>&1"


rule publish_row:
    """The row's public face: core.json, and manifest.json with every stage manifest of its chain."""
    input:
        lambda w: [d for _, d in row_chain(w.row)],
    output:
        core="results/{row}/core.json",
        manifest="results/{row}/manifest.json",
    log:
        f"{LOGS}/publish_row/{{row}}.log",
    conda:
        CONDA_ENV
    params:
        # the paths this job sees (under .snakemake/storage/ with a storage provider), tagged with their stage
        stages=lambda w, input: " ".join(
            f"{stage}={path}" for (stage, _), path in zip(row_chain(w.row), input, strict=True)
        ),
        out=lambda w, output: os.path.dirname(output.core),
        command=lambda w: f"snakemake --cores all results/{w.row}/core.json",
    shell:
        "python -m pipeline.publish row --row {wildcards.row} --out {params.out:q}"
        " --command {params.command:q} {params.stages} > {log} 2>&1"
