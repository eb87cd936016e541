"""AgentMesh service implementations.

One subpackage per service (``llm``, ``retrieval``, ``memory``, ``tools``, ``orchestrator``), the
shared ``runtime`` they are all built on (settings, server bootstrap, interceptors, typed clients)
and the ``cli`` that serves, runs and talks to them. The generated contracts live beside this
package as ``agentmesh.<domain>.v1`` (source: ``protos/``, code: ``gen/python/``).
"""
