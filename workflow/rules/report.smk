rule report:
    input:
        simulator=f"{RESULTS}/{{dataset}}/simulate/{NO_HOLDOUT}/seed{config['simulate']['seed']}/simulator.pt",
        shared=get_state,
        expression=rules.pair.output.data,
        metrics=rules.evaluate.output.metrics,
        # what takes expression to the simulator's states and back (as its space needs)
        encoder=get_encoder,
        aligner=get_aligner,
        predictor=get_predictor,
        decoder=get_decoder,
        perturbation=get_perturbation_model,
    output:
        model=f"{RESULTS}/{{dataset}}/report/model.json",
        summary=report(
            f"{RESULTS}/{{dataset}}/report/summary.tsv",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"dataset": "{dataset}", "what": "every headline number"},
        ),
        page=report(
            f"{RESULTS}/{{dataset}}/report/summary.html",
            caption="../report/summary_page.rst",
            category="1. Summary",
            labels={"dataset": "{dataset}", "what": "what won"},
        ),
    params:
        cfg=as_json(report_params(config)),
        models=lambda wildcards, input: " ".join(
            f"--{k} {input[k]}" for k in ("encoder", "aligner", "predictor", "decoder") if input.get(k))
        + (" --perturbation " + " ".join(input.perturbation) if input.perturbation else ""),
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
        " --shared {input.shared} --expression {input.expression} --metrics {input.metrics} {params.models}"
        " --output {output.model}"
        " --summary {output.summary} --page {output.page}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
