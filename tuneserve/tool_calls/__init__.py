"""Tool calls in model output: one parser per model family (a registry), each able to parse finished text,
stream deltas, and write the grammar that forces a valid call."""
