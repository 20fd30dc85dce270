"""The command line: `tuneserve serve | generate | chat | quantize | eval | bench | sweep | tune | report`."""
