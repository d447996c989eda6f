rule perturb:
    # One job per condition held out whole (datasets.<name>.holdout_conditions): the perturbation model
    # trained on the control and the other conditions predicts it, beside its baselines.
    input:
        data=rules.qc.output.data,
    output:
        metrics=f"{RESULTS}/{{dataset}}/perturb/{{condition}}/metrics.json",
        model=f"{RESULTS}/{{dataset}}/perturb/{{condition}}/model.pt",
        cells=f"{RESULTS}/{{dataset}}/perturb/{{condition}}/predicted.h5ad",
        figure=report(
            f"{RESULTS}/{{dataset}}/perturb/{{condition}}/response.png",
            caption="../report/perturb.rst",
            category="7. Perturbation",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "held-out condition": "{condition}"},
        ),
    params:
        cfg=as_json(config["perturb"]),
        condition=lambda wc: get_condition_holdouts(wc.dataset)[wc.condition],
        control=lambda wc: config["datasets"][wc.dataset]["control"],
        min_cells=lambda wc: config["datasets"][wc.dataset]["min_cells_per_condition"],
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/perturb/{{condition}}.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/perturb/{{condition}}.tsv",
    threads: res("perturb", "threads", 1)
    resources:
        mem_mb=res("perturb", "mem_mb", 8000),
        runtime=res("perturb", "runtime", 60),
        gpu=res("perturb", "gpu", 0),
    shell:
        "virtualcell perturb --dataset {wildcards.dataset} --input {input.data} --condition {params.condition:q}"
        " --control {params.control:q} --min-cells {params.min_cells} --output {output.metrics}"
        " --model {output.model} --cells {output.cells} --figure {output.figure} --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"


rule perturb_model:
    # The perturbation model on the control and every condition, for the virtual cell's "what if"
    # (the condition param of the registered model).
    input:
        data=rules.qc.output.data,
    output:
        model=f"{RESULTS}/{{dataset}}/perturb/model.pt",
        map=f"{RESULTS}/{{dataset}}/perturb/map.npz",
        # the dynamic model (perturb.dynamic): cells simulated forward under a condition's landscape
        **({"dynamics": f"{RESULTS}/{{dataset}}/perturb/dynamics.pt"} if config["perturb"]["dynamic"] else {}),
    params:
        dynamics=lambda wc, output: f"--dynamics {output.dynamics}" if "dynamics" in output.keys() else "",
        cfg=as_json(config["perturb"]),
        control=lambda wc: config["datasets"][wc.dataset]["control"],
        min_cells=lambda wc: config["datasets"][wc.dataset]["min_cells_per_condition"],
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/perturb_model.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/perturb_model.tsv",
    threads: res("perturb", "threads", 1)
    resources:
        mem_mb=res("perturb", "mem_mb", 8000),
        runtime=res("perturb", "runtime", 60),
        gpu=res("perturb", "gpu", 0),
    shell:
        "virtualcell perturb --dataset {wildcards.dataset} --input {input.data} --control {params.control:q}"
        " --min-cells {params.min_cells} --model {output.model} --map {output.map} {params.dynamics}"
        " --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
