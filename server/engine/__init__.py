"""The speech LM engine: KV-cache reuse, frame-constrained sampling, off-loop step loop."""
