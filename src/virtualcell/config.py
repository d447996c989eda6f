"""Config validation shared by the Snakefile and the ``virtualcell`` command.

The schema (workflow/schemas/config.schema.yaml) types, describes and gives
the default of every key, and forbids unknown keys, so a misspelt key is an
error rather than silently ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from virtualcell.errors import InputError

SCHEMA_RELPATH = Path("workflow") / "schemas" / "config.schema.yaml"


def schema_path() -> Path:
    """The schema of the checkout this package is installed from (editable install), else of the cwd."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / SCHEMA_RELPATH).exists():
            return root / SCHEMA_RELPATH
    raise InputError(
        f"{SCHEMA_RELPATH}: not found; install virtualcell from its checkout (pip install -e .) "
        "or run from the workflow's folder"
    )


def _with_defaults(validator_class):
    """A validator that fills in each property's ``default`` before validating it (jsonschema FAQ)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


DefaultFillingValidator = _with_defaults(jsonschema.Draft7Validator)


def validate_config(config: Mapping[str, Any], *, origin: str = "config", schema: Path | None = None) -> dict:
    """Return a copy of ``config`` with defaults filled in; raise one clear line on the first error."""
    with open(schema or schema_path()) as handle:
        spec = yaml.safe_load(handle)
    filled = copy.deepcopy(dict(config))
    errors = sorted(DefaultFillingValidator(spec).iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        if error.validator == "additionalProperties":
            # jsonschema's message lists the unexpected keys; name them in the key path.
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            prefix = f"{key}." if error.absolute_path else ""
            raise InputError(
                f"{origin}: unknown config key {', '.join(prefix + u for u in unknown)}; check its spelling "
                "against config/README.md"
            )
        raise InputError(f"{origin}: config key {key}: {error.message}; see config/README.md")
    for name, spec in filled["datasets"].items():
        if spec["source"] == "synthetic" and spec.get("values", "counts") != "counts":
            raise InputError(
                f"{origin}: config key datasets.{name}.values: the synthetic generator measures counts; "
                "remove values (or set it to counts)"
            )
    return filled


def report_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the report step reads from a validated config: the rule passes it, and so does ``--configfile``."""
    return {"register": config["mlflow"]["register"], "space": config["simulate"]["space"],
            "n_steps": config["evaluate"]["n_steps"], "fate_rollouts": config["evaluate"]["fate_rollouts"],
            "fate_neighbours": config["evaluate"]["fate_neighbours"], "seed": config["evaluate"]["seed"]}
