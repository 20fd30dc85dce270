"""Rendering a chat template that a request supplied: Jinja's immutable sandbox, with time and size limits.

A model's own template is the operator's choice and renders through transformers. A template sent in a
request is code from a client: it is refused unless the operator allows it (--trust-request-chat-template),
and then renders here, where the sandbox blocks access to Python internals, and a budget bounds what the
sandbox alone does not: every call, attribute or item access and loop step checks a deadline, `range` is
capped, `*` and `**` cannot build huge values, and the output stops at a size limit.
"""

from __future__ import annotations

import json
import operator
import time
from contextvars import ContextVar

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

_DEADLINE: ContextVar[float] = ContextVar("chat_template_deadline", default=float("inf"))
MAX_TEMPLATE_CHARS = 64 << 10
_MAX_RANGE = 10_000
_MAX_PRODUCT = 1 << 20  # elements of a repeated string or list


class TemplateLimitError(TemplateError):
    """The template ran past its time or size budget, or built an oversized value."""


def _tick() -> None:
    if time.monotonic() > _DEADLINE.get():
        raise TemplateLimitError("the chat template ran past its time limit")


def _range(*args: int):  # noqa: ANN202 - a generator
    r = range(*args)
    if len(r) > _MAX_RANGE:
        raise TemplateLimitError(f"range() of {len(r)} items in the chat template (at most {_MAX_RANGE})")
    for i in r:
        _tick()
        yield i


def _mul(a, b):  # noqa: ANN001, ANN202
    for seq, k in ((a, b), (b, a)):
        if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > _MAX_PRODUCT:
            raise TemplateLimitError("the chat template repeats a value past the size limit")
    return operator.mul(a, b)


def _pow(a, b):  # noqa: ANN001, ANN202
    if isinstance(b, (int, float)) and abs(b) > 64:
        raise TemplateLimitError("the chat template raises to a power above 64")
    return operator.pow(a, b)


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator_: str, left, right):  # noqa: ANN001, ANN201
        _tick()
        return _mul(left, right) if operator_ == "*" else _pow(left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: ANN001, ANN201, N805 - jinja's signature
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):  # noqa: ANN001, ANN201
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):  # noqa: ANN001, ANN201
        _tick()
        return super().getitem(obj, argument)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _env() -> _BudgetedSandbox:
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=_raise, range=_range)
    return env


def render_untrusted(template: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str],
                     seconds: float = 1.0, max_chars: int = 1 << 20, tools: list[dict] | None = None) -> str:
    """Render a request's chat template for `messages`; raises TemplateError (a 400) on anything it
    refuses: a template over MAX_TEMPLATE_CHARS, a sandbox violation, or a budget overrun."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"the chat template has {len(template)} characters (at most {MAX_TEMPLATE_CHARS})")
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        compiled = _env().from_string(template)
        parts, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       **special):
            _tick()
            size += len(piece)
            if size > max_chars:
                raise TemplateLimitError(f"the chat template rendered more than {max_chars} characters")
            parts.append(piece)
        return "".join(parts)
    finally:
        _DEADLINE.reset(token)
