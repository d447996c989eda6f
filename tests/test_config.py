import pytest
import yaml

from tests.conftest import REPO
from virtualcell.config import validate_config
from virtualcell.errors import InputError


def load(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def test_default_config_is_valid_and_complete():
    config = validate_config(load("config.yaml"))
    assert config["datasets"]["synthetic"]["source"] == "synthetic"
    # the file a user edits says what the schema's defaults are: leaving a stage section out changes nothing
    bare = validate_config({"datasets": {"d": {"source": "synthetic"}}})
    for stage in ("qc", "pair", "embed", "align", "simulate", "evaluate"):
        assert config[stage] == bare[stage], stage


def test_defaults_are_filled_for_missing_sections():
    config = validate_config({"datasets": {"d": {"source": "h5ad", "path": "x.h5ad"}}})
    assert config["qc"]["min_genes"] == 50
    assert config["datasets"]["d"]["time_key"] is None
    assert config["mlflow"]["experiment"] == "virtualcell"


def test_unknown_key_is_named():
    config = load("config.yaml")
    config["qc"]["min_gene"] = 10
    with pytest.raises(InputError, match=r"unknown config key qc\.min_gene"):
        validate_config(config, origin="config/config.yaml")


def test_wrong_type_is_named():
    config = load("config.yaml")
    config["embed"]["epochs"] = "many"
    with pytest.raises(InputError, match=r"config key embed\.epochs: 'many' is not of type 'integer'"):
        validate_config(config)


def test_every_schema_key_is_documented_in_config_readme():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (REPO / "config" / "README.md").read_text()
    for section, spec in schema["properties"].items():
        assert f"`{section}" in readme, section
        for key in spec.get("properties", {}):
            assert f"`{key}`" in readme, f"{section}.{key} is not documented in config/README.md"


def test_multiome_config_is_valid_and_aligns_rna_with_its_peaks():
    from virtualcell.plan import partner_modality

    config = validate_config(load("multiome.yaml"))
    spec = config["datasets"]["multiome"]
    assert spec["modalities"] == ["rna", "atac"] and spec["generator"]["n_peaks"] > 0
    assert partner_modality(spec["modalities"]) == "atac"
    # with protein too (TEA-seq), protein is the partner and the peaks are carried; the default has no peaks
    assert partner_modality(["rna", "prot", "atac"]) == "prot"
    assert "n_peaks" not in validate_config(load("config.yaml"))["datasets"]["synthetic"]["generator"]


def test_a_negative_peak_count_is_named():
    with pytest.raises(InputError, match="n_peaks"):
        validate_config({"datasets": {"d": {"source": "synthetic", "generator": {"n_peaks": -5}}}})
