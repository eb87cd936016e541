"""Valid requests the fuzzer mutates, per RPC (keyed by the method's full name).

Requests generated from scratch mostly stop at the first validation; mutations of these reach
what lies behind it (the store, the model, the sandbox). An RPC without seeds is still fuzzed
with generated requests only, so a new RPC is covered before anyone writes seeds for it.
Ids come from what conftest.py created in the mesh (:class:`Seeded`).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import message as pb_message
from google.protobuf import struct_pb2

from agentmesh.agent.v1 import agent_pb2
from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.retrieval.v1 import retrieval_pb2
from agentmesh.tools.v1 import tools_pb2

SESSION, USER, COLLECTION, DOCUMENT = "fuzz-s1", "fuzz-user", "fuzz_docs", "fuzz-doc"


@dataclass
class Seeded:
    """Ids of what the mesh holds before the fuzzing starts."""

    run_id: str
    message_ids: list[str]
    fact_ids: list[str]


def _struct(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _msg(role: int, content: str, **kw: object) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content, **kw)


def seed_requests(seeded: Seeded) -> dict[str, list[pb_message.Message]]:
    a, llm, mem, ret, tools = agent_pb2, llm_pb2, memory_pb2, retrieval_pb2, tools_pb2
    user = _msg(common_pb2.ROLE_USER, "When was the Eddystone Lighthouse completed?")
    chunk = common_pb2.Chunk(chunk_id="fuzz-doc-0", document_id=DOCUMENT, title="Lighthouses", source="test://fuzz",
                             text="The Eddystone Lighthouse was completed in 1759.", end_char=47, metadata={"lang": "en"})
    call = common_pb2.ToolCall(id="call_1", name="calculator", arguments=_struct(expression="6*7"))
    tool_turn = [user, _msg(common_pb2.ROLE_ASSISTANT, "", tool_calls=[call]),
                 _msg(common_pb2.ROLE_TOOL, "42", tool_call_id="call_1", name="calculator")]
    calculator = common_pb2.ToolDefinition(name="calculator", description="arithmetic",
                                           parameters_schema=_struct(type="object", properties={}))
    generation = {
        "messages": [_msg(common_pb2.ROLE_SYSTEM, "Answer briefly."), user], "context": [chunk],
        "options": llm.GenerationOptions(max_tokens=64, temperature=0.5),
    }
    tooled = {"messages": tool_turn, "tools": [calculator], "routing": llm.RoutingOptions(cache=True, cache_ttl_s=60)}
    lang_en = ret.FilterCondition(metadata_key="lang", operator=ret.FILTER_OPERATOR_EQUAL, values=["en"])
    scope = {"session_id": SESSION, "user_id": USER}
    run = seeded.run_id
    return {
        "agentmesh.agent.v1.AgentService.Run": [
            a.RunRequest(session_id="fuzz-s2", input="When was the Eddystone Lighthouse completed?"),
            a.RunRequest(session_id=SESSION, input="And who built it?", agent="assistant", user_id=USER),
            a.RunRequest(session_id="fuzz-s3", input="6*7", tools=["calculator"], max_steps=2, max_tokens=64,
                         collection=COLLECTION, top_k=2, on_disconnect=a.ON_DISCONNECT_CONTINUE),
        ],
        "agentmesh.agent.v1.AgentService.ResumeRun": [a.ResumeRunRequest(run_id=run, after_sequence=1)],
        "agentmesh.agent.v1.AgentService.ResolveInterrupt": [a.ResolveInterruptRequest(
            run_id=run, interrupt_id="fuzz", decisions=[a.ToolCallDecision(tool_call_id="call_1", approved=True)])],
        "agentmesh.agent.v1.AgentService.CancelRun": [a.CancelRunRequest(run_id=run, reason="fuzz")],
        "agentmesh.agent.v1.AgentService.GetRun": [a.GetRunRequest(run_id=run)],
        "agentmesh.llm.v1.LLMService.Generate": [llm.GenerateRequest(**generation), llm.GenerateRequest(**tooled)],
        "agentmesh.llm.v1.LLMService.StreamGenerate": [
            llm.StreamGenerateRequest(**generation), llm.StreamGenerateRequest(**tooled)],
        "agentmesh.llm.v1.LLMService.CountTokens": [
            llm.CountTokensRequest(messages=tool_turn, tools=[calculator], context=[chunk], deployment="extractive")],
        "agentmesh.memory.v1.MemoryService.AppendMessages": [
            mem.AppendMessagesRequest(**scope, messages=[user, _msg(common_pb2.ROLE_ASSISTANT, "In 1759.")],
                                      idempotency_key="fuzz-2"),
            mem.AppendMessagesRequest(session_id="fuzz-s6", messages=tool_turn)],
        "agentmesh.memory.v1.MemoryService.GetContext": [mem.GetContextRequest(**scope, token_budget=500, min_version=1)],
        "agentmesh.memory.v1.MemoryService.ListMessages": [mem.ListMessagesRequest(
            **scope, limit=10, from_message_id=seeded.message_ids[0], to_message_id=seeded.message_ids[-1])],
        "agentmesh.memory.v1.MemoryService.WatchSession": [mem.WatchSessionRequest(**scope, after_sequence=0)],
        "agentmesh.memory.v1.MemoryService.GetSession": [mem.GetSessionRequest(**scope)],
        "agentmesh.memory.v1.MemoryService.SetPinnedMessages": [mem.SetPinnedMessagesRequest(
            **scope, messages=[_msg(common_pb2.ROLE_SYSTEM, "The user prefers short answers.")])],
        "agentmesh.memory.v1.MemoryService.CompactSession": [mem.CompactSessionRequest(**scope)],
        "agentmesh.memory.v1.MemoryService.SetRetention": [
            mem.SetRetentionRequest(session_id="fuzz-s4", user_id=USER, ttl_s=3600, keep_last_messages=10)],
        "agentmesh.memory.v1.MemoryService.DeleteSession": [mem.DeleteSessionRequest(session_id="fuzz-s5", user_id=USER)],
        "agentmesh.memory.v1.MemoryService.ForgetUser": [mem.ForgetUserRequest(user_id="fuzz-gone")],
        "agentmesh.memory.v1.MemoryService.RememberFacts": [mem.RememberFactsRequest(user_id=USER, facts=[
            mem.FactInput(text="The user prefers tea.", kind=mem.FACT_KIND_PREFERENCE,
                          sources=[mem.FactSource(session_id=SESSION, message_id=seeded.message_ids[0])])])],
        "agentmesh.memory.v1.MemoryService.RecallFacts": [mem.RecallFactsRequest(
            user_id=USER, query="Where does the user live?", top_k=3, min_similarity=0.1, recency_weight=0.2,
            recency_half_life_s=86_400, min_score=0.0)],
        "agentmesh.memory.v1.MemoryService.ListFacts": [mem.ListFactsRequest(user_id=USER, page_size=2)],
        "agentmesh.memory.v1.MemoryService.DeleteFacts": [mem.DeleteFactsRequest(user_id=USER, fact_ids=seeded.fact_ids)],
        "agentmesh.retrieval.v1.RetrievalService.IngestDocuments": [
            ret.IngestDocumentsRequest(collection=COLLECTION, document=ret.Document(
                id="fuzz-md", title="Notes", format=ret.DOCUMENT_FORMAT_MARKDOWN, metadata={"lang": "en"},
                text="# Lighthouses\n\nSmeaton used granite.\n\n## Later\n\nDouglass built the fourth one.")),
            ret.IngestDocumentsRequest(collection=COLLECTION, document=ret.Document(
                format=ret.DOCUMENT_FORMAT_JSONL, content=b'{"id": "j1", "text": "one"}\n{"id": "j2", "text": "two"}\n')),
            ret.IngestDocumentsRequest(document=ret.Document(
                id="fuzz-html", format=ret.DOCUMENT_FORMAT_HTML, content=b"<title>T</title><h1>H</h1><p>body</p>")),
        ],
        "agentmesh.retrieval.v1.RetrievalService.Search": [
            ret.SearchRequest(collection=COLLECTION, query="Who built the lighthouse?", top_k=3, filters=[lang_en],
                              mode=ret.SEARCH_MODE_HYBRID, fusion=ret.FUSION_METHOD_WEIGHTED, dense_weight=0.6,
                              candidates=20, mmr=ret.MmrOptions(relevance_weight=0.5)),
            ret.SearchRequest(query="granite", mode=ret.SEARCH_MODE_SPARSE, rrf_k=60, min_score=0.1),
        ],
        "agentmesh.retrieval.v1.RetrievalService.DeleteDocuments": [ret.DeleteDocumentsRequest(
            collection=COLLECTION, document_ids=["fuzz-none"], filters=[ret.FilterCondition(
                document_field=ret.DOCUMENT_FIELD_SOURCE, operator=ret.FILTER_OPERATOR_IN, values=["test://none"])])],
        "agentmesh.retrieval.v1.RetrievalService.CreateCollection": [ret.CreateCollectionRequest(
            collection="fuzz_new", chunking=ret.ChunkingConfig(chunk_tokens=128, overlap_tokens=16, title_tokens=8))],
        "agentmesh.retrieval.v1.RetrievalService.DescribeCollection": [
            ret.DescribeCollectionRequest(collection=COLLECTION)],
        "agentmesh.retrieval.v1.RetrievalService.DropCollection": [ret.DropCollectionRequest(collection="fuzz_new")],
        "agentmesh.tools.v1.ToolService.ExecuteTool": [
            tools.ExecuteToolRequest(name="calculator", arguments=_struct(expression="6*7"), tool_call_id="call_1",
                                     idempotency_key="fuzz-k1"),
            tools.ExecuteToolRequest(name="recall_memory", arguments=_struct(query="Where does the user live?"),
                                     session_id=SESSION, user_id=USER),
            tools.ExecuteToolRequest(name="search_documents", arguments=_struct(query="lighthouse")),
            tools.ExecuteToolRequest(name="python", arguments=_struct(code="print(6*7)")),
        ],
        "agentmesh.tools.v1.ToolService.CancelToolCall": [
            tools.CancelToolCallRequest(name="calculator", idempotency_key="fuzz-k1")],
    }
