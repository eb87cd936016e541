"""Protocol-faithful fake servers of remote LLM providers (OpenAI, Anthropic) for tests."""
