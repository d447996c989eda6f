rule simulate:
    input:
        shared=get_state,
        expression=rules.pair.output.data,
    output:
        model=f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}/simulator.pt",
        decoder=f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}/decoder.pt",
        figure=report(
            f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}/trajectories.png",
            caption="../report/simulate.rst",
            category="Simulation",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "held-out time": "{holdout}", "seed": "{seed}"},
        ),
    params:
        cfg=as_json(config["simulate"]),
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}.tsv",
    threads: res("simulate", "threads", 1)
    resources:
        mem_mb=res("simulate", "mem_mb", 8000),
        runtime=res("simulate", "runtime", 60),
        gpu=res("simulate", "gpu", 0),
    shell:
        "virtualcell simulate --dataset {wildcards.dataset} --holdout {wildcards.holdout} --seed {wildcards.seed}"
        " --input {input.shared} --expression {input.expression} --output {output.model}"
        " --decoder {output.decoder} --figure {output.figure} --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
