"""A thin, fast OpenAI-compatible reverse proxy for many LLM providers."""

__version__ = "0.1.0"
