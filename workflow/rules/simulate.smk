rule simulate:
    input:
        shared=get_state,
    output:
        model=f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}/simulator.pt",
        figure=report(
            f"{RESULTS}/{{dataset}}/simulate/{{holdout}}/seed{{seed}}/trajectories.png",
            caption="../report/simulate.rst",
            category="5. Simulation",
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
        " --input {input.shared} --output {output.model}"
        " --figure {output.figure} --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"


rule decode:
    # The decoder of the simulator's states to log-normalised expression, once per dataset: only for
    # simulate.space embedding (a simulator in pca5 needs none). Only its own settings are params.
    input:
        shared=get_state,
        expression=rules.pair.output.data,
    output:
        decoder=f"{RESULTS}/{{dataset}}/simulate/decoder.pt",
    params:
        cfg=lambda wc: as_json({k: config["simulate"][k] for k in DECODER_PARAMS}),
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/decode.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/decode.tsv",
    threads: res("decode", "threads", 1)
    resources:
        mem_mb=res("decode", "mem_mb", 8000),
        runtime=res("decode", "runtime", 60),
        gpu=res("decode", "gpu", 0),
    shell:
        "virtualcell decode --dataset {wildcards.dataset} --input {input.shared} --expression {input.expression}"
        " --output {output.decoder} --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
