"""Atajo: an OpenAI-compatible LLM gateway that cuts cost and latency without serving wrong answers."""

__version__ = "0.1.0"
