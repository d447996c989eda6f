rule ingest:
    input:
        get_raw_input,
    output:
        data=f"{RESULTS}/{{dataset}}/ingest.h5mu",
    params:
        cfg=dataset_spec,
    conda:
        "../../envs/data.yaml"
    log:
        f"{LOGS}/{{dataset}}/ingest.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/ingest.tsv",
    threads: res("ingest", "threads", 1)
    resources:
        mem_mb=res("ingest", "mem_mb", 4000),
        runtime=res("ingest", "runtime", 30),
    shell:
        "virtualcell ingest --dataset {wildcards.dataset} --output {output.data}"
        " --params {params.cfg:q} --jobid {jobid} --threads {threads} > {log} 2>&1"
