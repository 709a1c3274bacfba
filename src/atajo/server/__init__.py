"""The inbound HTTP edge: the only code that knows OpenAI's HTTP wire format (JSON bodies, SSE, errors)."""
