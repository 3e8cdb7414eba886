rule train:
    """Pretrain a row's model; the seed's flags, under torchrun; resumes from its checkpoints after a kill."""
    input:
        spec_inputs("train"),
    output:
        directory(f"{STORE}/train/{{key}}"),
    log:
        f"{LOGS}/train/{{key}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: job_threads("train")
    resources:
        **job_resources("train"),
    params:
        command=lambda w, input, output, threads: pipeline_launch.train_command(
            PLAN.spec("train", w.key), input, output, WORK, threads
        ),
    shell:
        "{params.command} > {log} 2>&1"


rule train_summary:
    """The row's training summary (the mean over seeds, if several) and per-step metrics, out of the store."""
    input:
        row_dirs("train"),
    output:
        summary="results/{row}/train_summary.json",
        metrics="results/{row}/metrics.jsonl",
    log:
        f"{LOGS}/train_summary/{{row}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m pipeline.publish train-summary --summary {output.summary} --metrics {output.metrics}"
        " {input:q} > {log} 2>&1"
