"""JSON Schemas and the Markdown reference, generated from the config models.

`finetune.schema.json` validates one concrete run; `finetune-sweep.schema.json` also
allows a knob (`$list`, `$range`) wherever a value is, and `groups` of overlays.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from finetune.config.knobs import RangeKnob
from finetune.config.models import CONFIG_ADAPTER
from finetune.config.scheduling import PER_RUN_EXPERIMENT_KEYS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
NOT_KNOBBABLE_TOP = {"method", "experiment", "sweep"}
METHOD_DEFS = ("SFTFinetuneConfig", "DPOFinetuneConfig", "GRPOFinetuneConfig")
# Sections of the experiment as a whole: no knobs inside them, but for the per-run keys of `experiment`.
WHOLE_EXPERIMENT_DEFS = ("ExperimentConfig", "GridSweep", "RandomSweep", "SuccessiveHalvingSweep", "OptunaSweep",
                         "PopulationBasedSweep")


def concrete_schema() -> dict[str, Any]:
    schema = CONFIG_ADAPTER.json_schema()
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "finetune config (one run)",
        "description": "One fine-tuning run: SFT, DPO or GRPO, chosen by `method` (default sft).",
        **schema,
    }


def _is_numeric(schema: dict[str, Any]) -> bool:
    if schema.get("type") in ("integer", "number"):
        return True
    return any(_is_numeric(option) for option in schema.get("anyOf", []) if isinstance(option, dict))


def _knobbable(schema: dict[str, Any]) -> dict[str, Any]:
    keep = {key: schema[key] for key in ("title", "description", "default") if key in schema}
    value = {key: val for key, val in schema.items() if key not in keep}
    as_list = {
        "type": "object",
        "properties": {"$list": {"type": "array", "minItems": 1, "items": value}},
        "required": ["$list"],
        "additionalProperties": False,
    }
    options = [value, as_list]
    if _is_numeric(value):
        options.append({"$ref": "#/$defs/RangeKnob"})
    return {**keep, "anyOf": options}


def _range_knob_schema() -> dict[str, Any]:
    body = RangeKnob.model_json_schema()
    body.pop("title", None)
    return {
        "title": "RangeKnob",
        "description": "An interval sampled by random search: {start, end, dtype?, log?}",
        "type": "object",
        "properties": {"$range": body},
        "required": ["$range"],
        "additionalProperties": False,
    }


def sweep_schema() -> dict[str, Any]:
    schema = copy.deepcopy(concrete_schema())
    schema["title"] = "finetune config (sweep)"
    schema["description"] = (
        "A config whose values may be knobs: {\"$list\": [...]} or {\"$range\": {...}}, "
        "and `groups`, a list of overlays each expanded with its own sweep."
    )
    definitions = schema["$defs"]
    for name, definition in definitions.items():
        top_level = name in METHOD_DEFS
        for key, prop in definition.get("properties", {}).items():
            if top_level and key in NOT_KNOBBABLE_TOP:
                continue
            if name in WHOLE_EXPERIMENT_DEFS and key not in PER_RUN_EXPERIMENT_KEYS:
                continue
            definition["properties"][key] = _knobbable(prop)
    for name in METHOD_DEFS:
        definition = definitions[name]
        definition["properties"]["groups"] = {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object"},
            "description": "Overlays deep-merged over the rest of the file; each is expanded with its own sweep",
        }
        required = definition.pop("required", [])
        if required:
            definition["anyOf"] = [{"required": required}, {"required": ["groups"]}]
    definitions["RangeKnob"] = _range_knob_schema()
    return schema


def render_json(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


HELM_CONFIG_KEY = "finetuning"
HELM_DEFAULTS_KEY = "finetuningDefaults"
# Sections that come in kinds (a discriminated union), by the key of the model that holds them.
UNION_SECTIONS = {"validation_data": "training_data", "peft_conf": "method", "quant_conf": "method"}


def _union_sections_optional(definitions: dict[str, Any]) -> dict[str, Any]:
    """In the chart, the union sections may be left out of `finetuning` (the chart's defaults fill
    them in); returns each one's schema, for `finetuningDefaults`."""
    sections: dict[str, Any] = {}
    for definition in definitions.values():
        properties = definition.get("properties", {})
        for section, sibling in UNION_SECTIONS.items():
            if section in properties and sibling in properties:
                sections.setdefault(section, properties[section])
                for requirement in [definition, *definition.get("anyOf", [])]:
                    if "required" in requirement:
                        requirement["required"] = [key for key in requirement["required"] if key != section]
    return sections


def helm_values_schema() -> dict[str, Any]:
    """The chart's values.schema.json: the sweep config under `finetuning`, plus the chart's own keys.

    Written for draft-07, which Helm's validator reads; references stay JSON pointers into `$defs`.
    """
    sweep = sweep_schema()
    definitions = sweep.pop("$defs")
    definitions["FinetuneConfig"] = {key: value for key, value in sweep.items() if key not in ("$schema",)}
    union_sections = _union_sections_optional(definitions)
    string = {"type": "string"}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "finetune Helm chart values",
        "type": "object",
        "required": [HELM_CONFIG_KEY],
        "properties": {
            HELM_CONFIG_KEY: {"$ref": "#/$defs/FinetuneConfig"},
            HELM_DEFAULTS_KEY: {
                "type": "object",
                "additionalProperties": False,
                "description": f"Sections that come in kinds, used only where {HELM_CONFIG_KEY} has none",
                "properties": union_sections,
            },
            "image": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"repository": string, "tag": string, "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
                "required": ["repository", "tag"],
            },
            "gpus": {"type": "integer", "minimum": 0, "description": "nvidia.com/gpu count requested by the Job"},
            "resources": {"type": "object", "description": "Extra container resources (cpu, memory)"},
            "nodeSelector": {"type": "object", "additionalProperties": string},
            "tolerations": {"type": "array", "items": {"type": "object"}},
            "validateConfig": {"type": "boolean", "description": "Run `finetune validate` in an init container first"},
            "backoffLimit": {"type": "integer", "minimum": 0},
            "output": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "existingClaim": {"type": ["string", "null"], "description": "PVC for outputs; emptyDir when null"},
                    "mountPath": string,
                },
            },
            "mlflow": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "serverUri": {"type": ["string", "null"]},
                    "existingSecret": {
                        "type": ["object", "null"],
                        "properties": {"name": string, "key": string},
                        "required": ["name", "key"],
                    },
                },
            },
            "extraEnv": {"type": "array", "items": {"type": "object"}},
            "ray": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "address": {"type": ["string", "null"], "description": "Join this Ray cluster; the Job is the driver only"},
                },
            },
        },
        "$defs": definitions,
    }
