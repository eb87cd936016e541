"""The LLM router service (``agentmesh.llm.v1.LLMService``): see ``service.py`` and README.md."""
