rule evaluate:
    input:
        shared=get_state,
        simulators=lambda wc: list(get_simulators(wc).values()),
    output:
        metrics=f"{RESULTS}/{{dataset}}/evaluate/metrics.json",
        figure=report(
            f"{RESULTS}/{{dataset}}/evaluate/evaluation.png",
            caption="../report/evaluate.rst",
            category="Evaluation",
            labels={"dataset": "{dataset}"},
        ),
    params:
        cfg=as_json(config["evaluate"]),
        simulators=simulator_args,
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
        "virtualcell evaluate --dataset {wildcards.dataset} --shared {input.shared}"
        " {params.simulators} --output {output.metrics} --figure {output.figure}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
