"""Providers of the LLM router: the interface (``base``), OpenAI-compatible, Anthropic, extractive."""
