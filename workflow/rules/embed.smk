rule embed:
    input:
        data=rules.pair.output.data,
    output:
        embeddings=f"{RESULTS}/{{dataset}}/embed/embeddings.h5ad",
        rna_model=f"{RESULTS}/{{dataset}}/embed/rna_encoder.pt",
        joint_model=f"{RESULTS}/{{dataset}}/embed/joint_encoder.pt",
        figure=report(
            f"{RESULTS}/{{dataset}}/embed/loss.png",
            caption="../report/embed.rst",
            category="3. Embedding",
            labels={"dataset": "{dataset}"},
        ),
    params:
        cfg=as_json(config["embed"]),
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/embed.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/embed.tsv",
    threads: res("embed", "threads", 1)
    resources:
        mem_mb=res("embed", "mem_mb", 8000),
        runtime=res("embed", "runtime", 60),
        gpu=res("embed", "gpu", 0),
    shell:
        "virtualcell embed --dataset {wildcards.dataset} --input {input.data}"
        " --output {output.embeddings} --rna-model {output.rna_model}"
        " --joint-model {output.joint_model} --figure {output.figure} --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
