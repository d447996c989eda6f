rule align:
    input:
        data=rules.pair.output.data,
        embeddings=rules.embed.output.embeddings,
    output:
        shared=f"{RESULTS}/{{dataset}}/align/shared.h5ad",
        model=f"{RESULTS}/{{dataset}}/align/aligner.pt",
        predictor=f"{RESULTS}/{{dataset}}/align/predictor.pt",
        rna_predictor=f"{RESULTS}/{{dataset}}/align/predictor_rna.pt",
        figure=report(
            f"{RESULTS}/{{dataset}}/align/loss.png",
            caption="../report/align.rst",
            category="4. Alignment",
            labels={"dataset": "{dataset}"},
        ),
    params:
        cfg=as_json(config["align"]),
        device=config["device"],
    conda:
        "../../envs/train.yaml"
    log:
        f"{LOGS}/{{dataset}}/align.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/align.tsv",
    threads: res("align", "threads", 1)
    resources:
        mem_mb=res("align", "mem_mb", 8000),
        runtime=res("align", "runtime", 60),
        gpu=res("align", "gpu", 0),
    shell:
        "virtualcell align --dataset {wildcards.dataset} --input {input.data}"
        " --embeddings {input.embeddings} --output {output.shared} --model {output.model}"
        " --predictor {output.predictor} --rna-predictor {output.rna_predictor}"
        " --figure {output.figure} --device {params.device}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
