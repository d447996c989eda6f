rule qc:
    input:
        data=rules.ingest.output.data,
    output:
        data=f"{RESULTS}/{{dataset}}/qc.h5mu",
        summary=f"{RESULTS}/{{dataset}}/qc/qc.json",
        figures=report(
            directory(f"{RESULTS}/{{dataset}}/qc/figures"),
            patterns=["{name}.png"],
            caption="../report/qc.rst",
            category="2. Quality control",
            labels={"dataset": "{dataset}", "modality": "{name}"},
        ),
    params:
        cfg=as_json(config["qc"]),
    conda:
        "../../envs/data.yaml"
    log:
        f"{LOGS}/{{dataset}}/qc.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/qc.tsv",
    threads: res("qc", "threads", 1)
    resources:
        mem_mb=res("qc", "mem_mb", 4000),
        runtime=res("qc", "runtime", 30),
    shell:
        "virtualcell qc --dataset {wildcards.dataset} --input {input.data} --output {output.data}"
        " --summary {output.summary} --figures {output.figures}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
