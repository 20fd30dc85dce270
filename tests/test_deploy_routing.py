"""Replica routing without Ray: prefix affinity, its load-balance fallback, round robin; the merged metrics
page; the deploy config. (tests/test_deploy_ray.py runs the same on a local Ray cluster.)"""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tuneserve.deploy.config import DeployConfig
from tuneserve.deploy.metrics import merge_metrics
from tuneserve.deploy.routing import PrefixAffinity, RoundRobin, prefix_keys, prompt_text

PREFIXES = [f"Document {i}: " + "".join(chr(97 + (i * 5 + j * 3) % 26) for j in range(400)) for i in range(8)]


def route(policy, text: str, loads: dict[str, int]) -> str:
    keys = prefix_keys(text)
    first = policy.rank(keys, loads)[0][0]
    policy.record(keys, first)
    return first


def test_prefix_keys_are_whole_chunks_chained():
    assert len(prefix_keys("a" * 63)) == 0 and len(prefix_keys("a" * 130)) == 2
    k = prefix_keys("a" * 128)
    assert k[0] != k[1]  # the same chunk text at another position is another prefix
    assert prefix_keys("a" * 64 + "b" * 64)[0] == k[0] and prefix_keys("a" * 64 + "b" * 64)[1] != k[1]
    assert len(prefix_keys("x" * 10_000, max_chunks=8)) == 8


def test_prompt_text_of_completions_and_chat():
    assert prompt_text({"prompt": "hello"}) == "hello"
    assert prompt_text({"prompt": ["first", "second"]}) == "first"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1 2 3"
    chat = {"messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(chat) == "system: sys\nuser: hi\n"
    assert prompt_text({}) == ""


def test_same_prefix_goes_to_the_same_replica():
    p = PrefixAffinity(seed=0)
    loads = {"a": 0, "b": 0, "c": 0}
    first = route(p, PREFIXES[0] + " question one", loads)
    for q in range(10):
        assert route(p, PREFIXES[0] + f" question {q} is different", loads) == first
    # the longest known prefix wins: a prompt that extends a longer shared prefix goes where that one went
    longer = PREFIXES[1] + PREFIXES[2]
    p.record(prefix_keys(longer), "c")
    p.record(prefix_keys(PREFIXES[1]), "b")  # b served the shorter one since
    assert p.rank(prefix_keys(longer + " more"), loads)[0] == ["c"]
    assert p.rank(prefix_keys(PREFIXES[1] + " other"), loads)[0] == ["b"]


def test_new_prefixes_spread_over_the_replicas():
    p = PrefixAffinity(seed=0)
    loads = {"a": 0, "b": 0}
    chosen = [route(p, text, loads) for text in PREFIXES]
    assert sorted(chosen.count(r) for r in loads) == [4, 4]
    # and each one keeps going to its replica afterwards
    assert [route(p, text + " again", loads) for text in PREFIXES] == chosen
    # a replica busier by up to `imbalance` still takes the new prefix if it holds fewer; beyond, it does not
    p = PrefixAffinity(imbalance=2, seed=0)
    p.record(prefix_keys(PREFIXES[0]), "b")
    assert p.rank(prefix_keys(PREFIXES[1]), {"a": 2, "b": 0})[0] == ["a"]
    assert p.rank(prefix_keys(PREFIXES[1]), {"a": 3, "b": 0})[0] == ["b"]


def test_divergent_queues_fall_back_to_load_balance():
    p = PrefixAffinity(imbalance=4, seed=0)
    p.record(prefix_keys(PREFIXES[0]), "a")
    text = PREFIXES[0] + " next"
    assert p.rank(prefix_keys(text), {"a": 4, "b": 0})[0] == ["a"]  # within the threshold: affinity
    assert p.rank(prefix_keys(text), {"a": 5, "b": 0}) == [["b"], ["a"]]  # beyond it: the less loaded
    # with more replicas the fallback is power of two choices: never the overloaded owner's queue
    loads = {"a": 9, "b": 1, "c": 2, "d": 3}
    firsts = {p.rank(prefix_keys(text), loads)[0][0] for _ in range(50)}
    assert "a" not in firsts and firsts <= {"b", "c", "d"} and len(firsts) > 1


def test_a_gone_replica_is_forgotten():
    p = PrefixAffinity(seed=0)
    p.record(prefix_keys(PREFIXES[0]), "a")
    p.forget("a")
    assert p.match(prefix_keys(PREFIXES[0]), ["a", "b"]) == (None, 0)
    # an owner that is not among the candidates does not count
    p.record(prefix_keys(PREFIXES[1]), "a")
    assert p.rank(prefix_keys(PREFIXES[1]), {"b": 3, "c": 1})[0] == ["c"]


def test_capacity_drops_the_oldest_prefixes():
    p = PrefixAffinity(capacity=10, seed=0)
    p.record(prefix_keys(PREFIXES[0]), "a")  # 6 keys
    p.record(prefix_keys(PREFIXES[1]), "b")  # 6 more: 2 of the first dropped
    assert len(p.owner) == 10 and p.owned == {"a": 4, "b": 6}


def test_round_robin_ignores_prefixes():
    rr = RoundRobin()
    loads = {"b": 0, "a": 0}
    assert [rr.rank(prefix_keys(PREFIXES[0]), loads)[0][0] for _ in range(4)] == ["a", "b", "a", "b"]


def test_merged_metrics_label_each_replica():
    page = ('# HELP tuneserve:prompt_tokens_total Prompt tokens.\n# TYPE tuneserve:prompt_tokens_total counter\n'
            'tuneserve:prompt_tokens_total{model_name="m"} 5.0\n'
            '# HELP tuneserve:num_requests_running Running.\n# TYPE tuneserve:num_requests_running gauge\n'
            'tuneserve:num_requests_running{model_name="m"} 1.0\n')
    merged = merge_metrics({"r1": page, "r2": page.replace("5.0", "7.0")})
    samples = {(s.name, s.labels["replica"]): s.value for f in text_string_to_metric_families(merged)
               for s in f.samples}
    assert samples == {("tuneserve:prompt_tokens_total", "r1"): 5.0, ("tuneserve:prompt_tokens_total", "r2"): 7.0,
                       ("tuneserve:num_requests_running", "r1"): 1.0, ("tuneserve:num_requests_running", "r2"): 1.0}
    assert merged.count("# TYPE tuneserve:prompt_tokens counter") == 1


def test_deploy_config_files_and_errors(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: m\nnum_replicas: 3\nengine_args: {max_num_seqs: 4}\nray_actor_options: {num_cpus: 2}\n")
    pytest.importorskip("yaml")
    cfg = DeployConfig.from_file(f)
    assert cfg.num_replicas == 3 and cfg.engine().max_num_seqs == 4 and cfg.ray_actor_options == {"num_cpus": 2}
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"model": "m", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}))
    assert DeployConfig.from_file(j).num_replicas is None
    with pytest.raises(ValueError, match="unknown deploy config keys"):
        DeployConfig.from_dict({"replicas": 2})
    with pytest.raises(ValueError, match="engine_args: unknown"):
        DeployConfig(engine_args={"max_seqs": 2})
    with pytest.raises(ValueError, match="routing"):
        DeployConfig(routing="random")
    assert DeployConfig(server={"max_waiting_requests": 3}).settings().exit_on_fatal is False


def test_serve_run_finds_the_application(monkeypatch):
    """`serve run tuneserve.deploy:app` gets an Application built from the environment (and no submodule
    of the package shadows the name)."""
    serve = pytest.importorskip("ray.serve")
    import importlib

    import tuneserve.deploy as deploy

    for sub in ("application", "bench", "config", "ingress", "local", "metrics", "replica", "router", "routing"):
        importlib.import_module(f"tuneserve.deploy.{sub}")
    monkeypatch.setenv("TUNESERVE_MODEL", "some-model")
    monkeypatch.setenv("TUNESERVE_REPLICAS", "3")
    assert isinstance(deploy.app, serve.Application)
