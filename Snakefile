# virtualcell: ingest -> qc -> pair -> embed -> align -> simulate -> evaluate -> report; qc -> perturb -> evaluate.
# The logic lives in src/virtualcell; rules are thin. See README.md and config/README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/pair.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/perturb.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True
