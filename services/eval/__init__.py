"""Evaluations shipped with AgentMesh (``agentmesh eval``)."""
