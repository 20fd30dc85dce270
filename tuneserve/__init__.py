"""tuneserve: an LLM serving engine whose every trade-off is a measured knob."""

from tuneserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: importing tuneserve should not import torch
    if name == "LLM":
        from tuneserve.llm import LLM

        return LLM
    if name == "LLMEngine":
        from tuneserve.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "EngineArgs":
        from tuneserve.engine_args import EngineArgs

        return EngineArgs
    if name == "RequestOutput":
        from tuneserve.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
