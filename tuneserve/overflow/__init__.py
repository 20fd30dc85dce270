"""Context overflow policies: what happens when prompt + max_tokens exceed the context."""
