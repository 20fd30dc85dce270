"""Performance peers: HF transformers and llama.cpp measured on the engine's own workloads.

result holds what a peer run reports; hf and llama_cpp run the peers; compare is `tuneserve bench peers`;
sweep adds peer points to a `tuneserve sweep` results file.
"""
