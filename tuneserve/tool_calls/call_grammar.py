"""The grammar of valid calls: the call object's JSON schema (its name, its arguments valid against the
function's schema) inside whatever a format writes around and between calls."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tuneserve.structured.llguidance_backend import JSON_OPTIONS
from tuneserve.tool_calls.parser import FunctionSpec

# the keywords whose values are schemas (the rest are data, names or numbers, never references)
_SCHEMA = {"items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
           "propertyNames", "unevaluatedItems", "unevaluatedProperties"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}


def calls_grammar(call: str, separator: str, functions: Sequence[FunctionSpec], parallel: bool,
                  args_key: str = "arguments") -> str:
    """Lark: one `call` (a rule around `body`, the call's JSON object) or several joined by `separator` when
    `parallel`; body calls one of `functions`, its arguments (under `args_key`) valid against the function's
    schema, written without free whitespace."""
    rules = [f"start: call ({json.dumps(separator)} call)*" if parallel else "start: call", f"call: {call}",
             "body: " + " | ".join(f"fn_{i}" for i in range(len(functions)))]
    for i, f in enumerate(functions):
        rules.append(f"fn_{i}: %json {json.dumps(call_schema(f, args_key), ensure_ascii=False)}")
    return "\n".join(rules) + "\n"


def call_schema(f: FunctionSpec, args_key: str = "arguments") -> dict:
    """The schema of {"name": f, args_key: {...}}. The arguments are an object whatever the schema leaves
    open (a call's arguments always are one), and their local references still point into their own
    schema, now one level down."""
    params = {**(f.parameters or {}), "type": "object"}
    return {"type": "object", "properties": {"name": {"const": f.name},
                                             args_key: rebase_refs(params, f"#/properties/{args_key}")},
            "required": ["name", args_key], "additionalProperties": False, "x-guidance": JSON_OPTIONS}


def rebase_refs(schema: object, base: str) -> object:
    """`schema` as a part of a larger document, at `base` (a fragment such as "#/properties/arguments"): its
    local references ("#" and "#/...", which meant its own root) point to the same places there."""
    if not isinstance(schema, dict):
        return schema  # true / false
    out = dict(schema)
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    for key, value in schema.items():
        if key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [rebase_refs(v, base) for v in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: rebase_refs(v, base) for name, v in value.items()}
        elif key in _SCHEMA:
            out[key] = rebase_refs(value, base)
    return out
