"""The start-up line reports memory: the peak RSS after loading, against the weights and the file."""

from __future__ import annotations

import re

from conftest import TINY_KV_BYTES
from tiny_models import write_gguf

from tuneserve.llm import LLM
from tuneserve.resources import peak_rss_bytes


def test_loaded_line_reports_peak_rss_weights_and_file(tiny_dirs, tmp_path, capsys, monkeypatch):
    path = write_gguf(tiny_dirs["llama"], tmp_path / "m.gguf", qtype="Q8_0")
    monkeypatch.delenv("TUNESERVE_QUIET", raising=False)
    capsys.readouterr()
    llm = LLM(model=str(path), tokenizer=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES,
              max_model_len=256)
    line = next(x for x in capsys.readouterr().err.splitlines() if "] loaded " in x)
    m = re.search(r"peak RSS ([\d,]+) MiB, weights ([\d,]+) MiB, file ([\d,]+) MiB$", line)
    assert m, line
    rss, weights, file = (int(g.replace(",", "")) for g in m.groups())
    mib = 2**20
    assert 0 < rss <= round(peak_rss_bytes() / mib)  # the peak only grows after the line
    assert weights == round(llm.llm_engine.footprint()["weight_bytes"] / mib)
    assert file == round(path.stat().st_size / mib)
