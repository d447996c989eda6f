rule evaluate:
    input:
        shared=get_state,
        simulators=lambda wc: [p for paths in get_simulators(wc).values() for p in paths],
        decoder=get_decoder,
        perturbations=get_perturbations,
    output:
        metrics=f"{RESULTS}/{{dataset}}/evaluate/metrics.json",
        fates=f"{RESULTS}/{{dataset}}/evaluate/fates.h5ad",
        figure=report(
            f"{RESULTS}/{{dataset}}/evaluate/evaluation.png",
            caption="../report/evaluate.rst",
            category="6. Evaluation",
            labels={"dataset": "{dataset}"},
        ),
        fate_figure=report(
            f"{RESULTS}/{{dataset}}/evaluate/fates.png",
            caption="../report/fates.rst",
            category="6. Evaluation",
            labels={"dataset": "{dataset}", "figure": "fates"},
        ),
        alignment_figure=report(
            f"{RESULTS}/{{dataset}}/evaluate/alignment.png",
            caption="../report/alignment.rst",
            category="4. Alignment",
            labels={"dataset": "{dataset}", "figure": "retrieval"},
        ),
        prediction_figure=report(
            f"{RESULTS}/{{dataset}}/evaluate/prediction.png",
            caption="../report/prediction.rst",
            category="4. Alignment",
            labels={"dataset": "{dataset}", "figure": "protein from RNA"},
        ),
        embedding_figure=report(
            f"{RESULTS}/{{dataset}}/evaluate/embeddings.png",
            caption="../report/embeddings.rst",
            category="3. Embedding",
            labels={"dataset": "{dataset}", "figure": "UMAPs"},
        ),
    params:
        cfg=as_json(config["evaluate"]),
        space=config["simulate"]["space"],
        simulators=simulator_args,
        decoder=lambda wc, input: f"--decoder {input.decoder[0]}" if input.decoder else "",
        perturbations=lambda wc, input: " ".join(f"--perturbation {p}" for p in input.perturbations),
    conda:
        "../../envs/evaluate.yaml"
    log:
        f"{LOGS}/{{dataset}}/evaluate.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/evaluate.tsv",
    threads: res("evaluate", "threads", 1)
    resources:
        mem_mb=res("evaluate", "mem_mb", 8000),
        runtime=res("evaluate", "runtime", 30),
    shell:
        "virtualcell evaluate --dataset {wildcards.dataset} --shared {input.shared} --space {params.space}"
        " {params.simulators} {params.decoder} {params.perturbations} --output {output.metrics} --fates {output.fates} --figure {output.figure}"
        " --fate-figure {output.fate_figure} --embedding-figure {output.embedding_figure}"
        " --alignment-figure {output.alignment_figure} --prediction-figure {output.prediction_figure}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
