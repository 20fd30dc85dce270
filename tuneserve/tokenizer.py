"""Tokenizers (from the model's own source) and incremental detokenization with stop strings."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_path: str | Path, tokenizer: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The HF tokenizer (with chat template) of a GGUF file or HF model directory.

    A GGUF's tokenizer is converted by transformers on first use (seconds) and saved beside the file in
    `<file>.tokenizer/` when that directory is writable, so later loads are fast.
    """
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    p = Path(model_path)
    if p.is_dir():
        return AutoTokenizer.from_pretrained(str(p))
    saved = p.with_name(p.name + ".tokenizer")
    stamp = f"{p.stat().st_size}:{int(p.stat().st_mtime)}"
    if (saved / "STAMP").exists() and (saved / "STAMP").read_text() == stamp:
        return AutoTokenizer.from_pretrained(str(saved))
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    try:
        tok.save_pretrained(str(saved))
        (saved / "STAMP").write_text(stamp)
    except OSError:
        pass  # read-only location: convert again next time
    return tok


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 and any tail
    that could still become a stop string. The stop string itself is never part of the text.

    Work per token is bounded: only the text not yet returned (at most the longest stop string plus the
    newest piece) is kept and searched, and decoding looks at a few tokens around the newest one."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        # start decoding from a few prompt tokens back so the first output token gets its leading space
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pending = ""  # text decoded but not yet returned (before any stop string)
        self.stopped: str | None = None

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly final text. After a stop string matches, self.stopped is set."""
        for t in new_ids:
            self.ids.append(t)
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset],
                                     skip_special_tokens=self.skip)
            full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.pending += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                if self._find_stop(len(full) - len(prefix)):
                    break
        return self._delta(final=self.stopped is not None)

    def _find_stop(self, added: int) -> bool:
        if not self.stop:
            return False
        search_from = max(0, len(self.pending) - added - self.hold)
        best = None
        for s in self.stop:
            i = self.pending.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.pending = self.pending[: i + len(s)] if self.include_stop else self.pending[:i]
        self.stopped = s
        return True

    def _delta(self, final: bool) -> str:
        keep = 0 if final else min(self.hold, len(self.pending))
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        """The held-back tail, once the request is finished."""
        return self._delta(final=True)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation (and the tools it may call) rendered with the model's chat template."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model has no chat template (it is a base model); send a plain prompt to "
                         "the completions API instead, or pass chat_template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        chat_template=template, tools=tools)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
