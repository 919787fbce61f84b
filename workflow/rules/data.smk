# Stage 1: raw mLAMA -> per-language tables -> corrupted facts -> discovery/evaluation split.


rule download_mlama:
    output:
        "results/data/download/mlama1.1.zip",
    log:
        "logs/data/download_mlama.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        science={
            "url": config["mlama"]["source"],
            "sha256": config["mlama"]["sha256"],
            # the shipped SHA-256 of every en/zh file, where they cover the run's languages
            "checksums": mlama_checksums(),
            "languages": LANGUAGES,
        },
    script:
        "../../scripts/download_mlama.py"


rule prepare_mlama:
    input:
        mlama_input,
    output:
        table="results/data/mlama/{lang}.parquet",
        report="results/data/mlama/{lang}.report.json",
    log:
        "logs/data/prepare_mlama/{lang}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        science={
            "source": mlama_source_path(),
            "relations": config["mlama"]["relations"],
            "max_facts_per_relation": config["mlama"]["max_facts_per_relation"],
            "cap_seed": (
                config["seed"] if config["mlama"]["max_facts_per_relation"] else None
            ),
            "to_simplified": config["mlama"]["to_simplified"],
            "strict": config["mlama"]["strict"],
            "version": VERSIONS["data"],
        },
    script:
        "../../scripts/prepare_mlama.py"


rule corrupt_facts:
    input:
        expand("results/data/mlama/{lang}.parquet", lang=LANGUAGES),
    output:
        tables=expand("results/data/corrupted/{lang}.parquet", lang=LANGUAGES),
        report="results/data/corrupted/report.json",
    log:
        "logs/data/corrupt_facts.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        science={
            "languages": LANGUAGES,
            "seed": config["seed"],
            "version": VERSIONS["data"],
        },
    script:
        "../../scripts/corrupt_facts.py"


rule split_facts:
    input:
        expand("results/data/corrupted/{lang}.parquet", lang=LANGUAGES),
    output:
        tables=expand(
            "results/data/facts/{lang}/{part}.parquet", lang=LANGUAGES, part=PARTS
        ),
        report="results/data/facts/report.json",
    log:
        "logs/data/split_facts.log",
    # ahead of the toy training when both are ready, so that a split error comes first
    priority: 10
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        science={
            "languages": LANGUAGES,
            "discovery_fraction": config["split"]["discovery_fraction"],
            "calibration_fraction": config["split"]["calibration_fraction"],
            "sizes": config["split"]["sizes"],
            "seed": config["seed"],
            "version": VERSIONS["data"],
        },
    script:
        "../../scripts/split_facts.py"
