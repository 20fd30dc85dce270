"""`tuneserve chat`: an interactive conversation in the terminal, streamed token by token."""

from __future__ import annotations

import sys

from tuneserve.engine.llm_engine import LLMEngine
from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import SamplingParams
from tuneserve.tokenizer import chat_prompt

HELP = "type a message; /reset clears the conversation, /quit (or Ctrl-D) leaves"


def stream_reply(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, out=None) -> str:  # noqa: ANN001
    """Run one request, writing text to `out` (stdout) as it is produced; returns the whole reply."""
    out = out or sys.stdout
    rid = engine.add_request(None, prompt_ids, params)
    sent = 0
    text = ""
    try:
        while engine.has_unfinished_requests():
            for ro in engine.step():
                if ro.request_id != rid:
                    continue
                text = ro.outputs[0].text
                out.write(text[sent:])
                out.flush()
                sent = len(text)
    except KeyboardInterrupt:
        engine.abort_request(rid)
        engine.step()
        out.write(" [interrupted]")
    out.write("\n")
    return text


def run_chat(args: EngineArgs, params: SamplingParams, system: str | None = None, inp=sys.stdin) -> int:
    engine = LLMEngine.from_engine_args(args)
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        print(f"error: {args.model} has no chat template (it is a base model); use `tuneserve generate`",
              file=sys.stderr)
        return 2
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(HELP, file=sys.stderr)
    while True:
        print(">>> ", end="", flush=True, file=sys.stderr)
        line = inp.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        reply = stream_reply(engine, chat_prompt(tok, messages), params)
        messages.append({"role": "assistant", "content": reply})
