rule simulate:
    input:
        shared=get_state,
    output:
        model=f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/simulator.pt",
        figure=report(
            f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/trajectories.png",
            caption="../report/simulate.rst",
            category="Simulation",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "held-out time": "{holdout}"},
        ),
    params:
        cfg=as_json(config["simulate"]),
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/simulate/{{holdout}}.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/simulate/{{holdout}}.tsv",
    threads: res("simulate", "threads", 1)
    resources:
        mem_mb=res("simulate", "mem_mb", 8000),
        runtime=res("simulate", "runtime", 60),
        gpu=res("simulate", "gpu", 0),
    shell:
        "virtualcell simulate --dataset {wildcards.dataset} --holdout {wildcards.holdout}"
        " --input {input.shared} --output {output.model} --figure {output.figure}"
        " --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
