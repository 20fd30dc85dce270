"""The engine: requests in, one step at a time (schedule, execute, update), outputs out."""
