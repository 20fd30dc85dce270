"""LLM: the offline facade over LLMEngine (generate, chat)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from tuneserve.engine.intake import PromptType
from tuneserve.engine.llm_engine import LLMEngine
from tuneserve.engine_args import EngineArgs
from tuneserve.outputs import RequestOutput
from tuneserve.sampling_params import SamplingParams
from tuneserve.tokenizer import chat_prompt


class LLM:
    """Offline batch inference: LLM(model=...).generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        if model is not None:
            engine_args["model"] = model
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs.from_dict(engine_args))

    def get_tokenizer(self):  # noqa: ANN201 - an HF tokenizer
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns RequestOutputs in prompt order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        # validate every prompt before queueing any, so that a bad one leaves nothing queued behind it
        prepared = [engine.prepare_request(None, prompt, p or SamplingParams(), priority=priority[i] if priority else 0)
                    for i, (prompt, p) in enumerate(zip(prompts, params))]
        ids = []
        try:
            for prep in prepared:
                prep.parent.output_kind = "final"  # only finished outputs are read: no per-step copies
                ids.append(engine.submit(prep))
        except BaseException:
            engine.abort_request(ids)
            engine.step()
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the model's chat template; `tools`
        (OpenAI's function definitions) are rendered by the template, and the calls the model writes are in the
        text (`tuneserve.tool_calls.parser.parse` with the template's parser reads them)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [chat_prompt(self.get_tokenizer(), c, add_generation_prompt, chat_template, tools) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm, leave=False)
        try:
            while len(done) < len(ids):
                for ro in engine.step():
                    if ro.finished:
                        done[ro.request_id] = ro
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            engine.step()
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]
