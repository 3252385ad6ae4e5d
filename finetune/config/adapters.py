"""Models of the generic PEFT adapter configs, one per PeftType, from the PEFT snapshot."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from finetune.config.snapshot_models import load_snapshot, model_from_snapshot

TaskType = Literal["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]


def _generic_peft_model(peft_type: str, adapter: dict[str, Any]) -> type[BaseModel]:
    kwargs_model = model_from_snapshot(
        f"{adapter['class']}Kwargs",
        adapter["fields"],
        doc=f"Keyword arguments of PEFT's `{adapter['class']}` (peft_type {peft_type}).",
    )
    return create_model(
        f"{adapter['class']}Section",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"A newly initialised {peft_type} adapter (PEFT `{adapter['class']}`).",
        peft_type=(Literal[peft_type], Field(description="The PEFT adapter type")),
        task_type=(TaskType, Field(default="CAUSAL_LM")),
        peft_kwargs=(kwargs_model, Field(default_factory=kwargs_model)),
    )


def _build_generic_union() -> Any:
    adapters = load_snapshot("peft")["adapters"]
    members = tuple(_generic_peft_model(peft_type, adapters[peft_type]) for peft_type in sorted(adapters))
    return Union[members]


PEFT_TYPES: tuple[str, ...] = tuple(sorted(load_snapshot("peft")["adapters"]))
GenericPeftConfig = _build_generic_union()
