"""The structured-output request fields: OpenAI's `response_format` and vLLM's `structured_outputs`.

Both become one StructuredOutputsParams; the engine compiles it (tuneserve/structured) and a schema or
grammar it cannot use is a 400 naming the field it came from.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneserve.sampling_params import MAX_CHOICES, ParamError, StructuredOutputsParams

MAX_GRAMMAR_CHARS = 1 << 20  # a schema or grammar is compiled per distinct text: bound the work


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


Grammar = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]


class JSONSchemaFormat(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    json_schema: dict = Field(alias="schema", default_factory=dict)  # {} (no schema): any JSON value
    strict: bool | None = None  # the output always follows the schema here


class ResponseFormatText(StrictModel):
    type: Literal["text"]


class ResponseFormatJSONObject(StrictModel):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(StrictModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]


class StructuredOutputs(StrictModel):
    """vLLM's extra field: exactly one constraint."""

    json_: dict | Grammar | None = Field(None, alias="json")
    json_object: bool = False
    regex: Grammar | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)] | None \
        = None
    grammar: Grammar | None = None


def structured_params(response_format: ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema
                      | None, structured: StructuredOutputs | None) -> StructuredOutputsParams | None:
    """The request's constraint, or None; ParamError when both fields ask for one."""
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and structured is not None:
        raise ParamError("structured_outputs", "give response_format or structured_outputs, not both")
    if structured is not None:
        return StructuredOutputsParams(json=structured.json_, json_object=structured.json_object,
                                       regex=structured.regex, choice=structured.choice, grammar=structured.grammar)
    if not wants_format:
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True, field="response_format")
    return StructuredOutputsParams(json=response_format.json_schema.json_schema, field="response_format")
