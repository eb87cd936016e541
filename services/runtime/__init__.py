"""Shared runtime of every AgentMesh service: settings, server bootstrap, interceptors, clients."""
