"""Turning logits into tokens: processing, sampling, seeded noise, draft verification."""
