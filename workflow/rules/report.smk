rule report:
    input:
        simulator=f"{RESULTS}/{{dataset}}/simulate/{NO_HOLDOUT}/seed{config['simulate']['seed']}/simulator.pt",
        shared=get_state,
        metrics=rules.evaluate.output.metrics,
    output:
        model=f"{RESULTS}/{{dataset}}/report/model.json",
        summary=report(
            f"{RESULTS}/{{dataset}}/report/summary.tsv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"dataset": "{dataset}"},
        ),
    params:
        cfg=as_json({"register": config["mlflow"]["register"], "space": config["simulate"]["space"]}),
    conda:
        "../../envs/evaluate.yaml"
    log:
        f"{LOGS}/{{dataset}}/report.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/report.tsv",
    threads: res("report", "threads", 1)
    resources:
        mem_mb=res("report", "mem_mb", 4000),
        runtime=res("report", "runtime", 30),
    shell:
        "virtualcell report --dataset {wildcards.dataset} --simulator {input.simulator}"
        " --shared {input.shared} --metrics {input.metrics} --output {output.model}"
        " --summary {output.summary}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
