"""Schemathesis against the server's own OpenAPI document (app.openapi()), on a tiny random model.

Every operation gets positive cases (bodies the schema allows: they must be served or refused with a
4xx, and the responses must match the documented statuses, media types and bodies) and, where it takes a
body, negative cases (bodies the schema forbids: they must be refused with a 4xx). No case may get a 5xx,
and the engine must serve a normal request afterwards. The schema carries the server's limits and the
model's vocabulary and context (schema.py), so positive cases really reach the engine.
"""

from __future__ import annotations

import collections
import time

import httpx
import pytest
import requests
import schemathesis
import torch
from conftest import TINY_KV_BYTES
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_utils import LiveServer

from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings
from tuneserve.server.limits import RequestLimits

MODEL = "tiny"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# small limits and context keep each case fast (a case runs at most 2 x 3 sequences of 64 tokens)
LIMITS = RequestLimits(max_n=2, max_prompts=3, max_prompt_chars=24, max_messages=3, max_stop=3, max_stop_chars=8,
                       max_stop_token_ids=4, max_logit_bias=8)
# examples per (operation, mode) in the default run; the slow run takes ten times as many
EXAMPLES = {"POST /v1/completions": (70, 40), "POST /v1/chat/completions": (70, 40), "POST /tokenize": (20, 15),
            "POST /detokenize": (20, 15)}
GET_OPERATIONS = ("GET /health", "GET /version", "GET /metrics", "GET /v1/models")


@pytest.fixture(scope="module")
def server(tiny_dirs):
    # one intra-op thread: on a busy 2-core machine two threads make a tiny model's step 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=64)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, max_waiting_requests=10_000, limits=LIMITS))
    yield s
    s.stop()
    torch.set_num_threads(threads)


def operations(server) -> dict:
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    return {op.label: op for op in (r.ok() for r in schema.get_all_operations())}


def run_operation(op, mode: GenerationMode, examples: int, url: str, tally: collections.Counter,
                  session: requests.Session) -> None:
    """Generate up to `examples` cases of op in `mode`, send each and check its response."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def one(case) -> None:
        response = case.call(base_url=url, session=session, timeout=60)
        tally[(op.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    one()


def fuzz(server, scale: int) -> collections.Counter:
    ops = operations(server)
    assert set(ops) == set(EXAMPLES) | set(GET_OPERATIONS)
    tally: collections.Counter = collections.Counter()
    with requests.Session() as session:
        for label in GET_OPERATIONS:
            run_operation(ops[label], GenerationMode.POSITIVE, 1, server.url, tally, session)
        for label, (positive, negative) in EXAMPLES.items():
            run_operation(ops[label], GenerationMode.POSITIVE, positive * scale, server.url, tally, session)
            run_operation(ops[label], GenerationMode.NEGATIVE, negative * scale, server.url, tally, session)
    return tally


def assert_alive_and_idle(server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "still here", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    eng = server.state.engine.engine
    deadline = time.time() + 10
    while (eng.has_unfinished_requests() or eng.kv.usage) and time.time() < deadline:
        time.sleep(0.02)
    assert not eng.has_unfinished_requests() and eng.kv.usage == 0


def report(tally: collections.Counter) -> tuple[int, dict]:
    """Total cases, and per (operation, mode) the count of each status; printed for the release notes."""
    table: dict = collections.defaultdict(collections.Counter)
    for (label, mode, status), n in tally.items():
        table[(label, mode)][status] += n
    for key, statuses in sorted(table.items()):
        print(key, dict(sorted(statuses.items())))
    return sum(tally.values()), table


def check_coverage(table: dict, total: int, minimum: int) -> None:
    assert total >= minimum, total
    assert not any(s >= 500 for statuses in table.values() for s in statuses)
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"):
        positive, negative = table[(label, "positive")], table[(label, "negative")]
        # the schema is precise: most positive cases are served, and every negative one is refused
        assert positive[200] >= sum(positive.values()) // 2, (label, positive)
        assert set(negative) <= {400, 404}, (label, negative)


def test_fuzz_every_endpoint(server):
    total, table = report(fuzz(server, scale=1))
    check_coverage(table, total, minimum=280)
    assert_alive_and_idle(server)


@pytest.mark.slow
def test_fuzz_every_endpoint_long(server):
    total, table = report(fuzz(server, scale=10))
    check_coverage(table, total, minimum=2800)
    assert_alive_and_idle(server)
