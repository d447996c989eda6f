rule pair:
    input:
        data=rules.qc.output.data,
    output:
        data=f"{RESULTS}/{{dataset}}/pairs/paired.h5mu",
        split=f"{RESULTS}/{{dataset}}/pairs/split.tsv",
    params:
        cfg=as_json(config["pair"]),
        control=lambda wc: config["datasets"][wc.dataset]["control"],
    conda:
        "../../envs/data.yaml"
    log:
        f"{LOGS}/{{dataset}}/pair.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/pair.tsv",
    threads: res("pair", "threads", 1)
    resources:
        mem_mb=res("pair", "mem_mb", 4000),
        runtime=res("pair", "runtime", 30),
    shell:
        "virtualcell pair --dataset {wildcards.dataset} --input {input.data} --output {output.data}"
        " --split {output.split} --control {params.control:q}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
