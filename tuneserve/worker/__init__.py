"""Running a scheduled batch through the model: inputs, forward, logits rows, picks."""
