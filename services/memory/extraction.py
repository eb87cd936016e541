"""Fact extraction from a session's user messages, run in the background after each append.

Two extractors:

* **LLM** (when the router's default model is a language model): the user messages, numbered, are
  sent to the router's ``Generate`` with :data:`INSTRUCTIONS`; each answer line
  ``fact [n]: …`` / ``preference [n]: …`` becomes a fact whose source is message ``n`` (all of
  the job's messages when ``[n]`` is missing). An answer produced by the router's extractive
  fallback instead of the model is not parsed; the heuristic runs instead.
* **Heuristic** (no LLM configured, or the router unreachable): first-person statements, one
  sentence at a time, from user messages only. The rules, in order:

  1. split on ``.``/``!``/``?`` followed by a space, and on line breaks; keep sentences of 2 to
     40 words; drop questions (ending in ``?``);
  2. drop a leading discourse marker (``well``, ``also``, ``btw``, ``by the way``, ``actually``,
     ``and``, ``but``, ``so``, ``oh``, ``ok``);
  3. drop conditionals and hypotheticals (starting ``if``, ``when``, ``suppose``, ``imagine``,
     ``what if``);
  4. a **preference** is ``I [really|also|usually|always|generally|absolutely|honestly]
     like|love|prefer|enjoy|adore|hate|dislike|don't like|do not like|can't stand|cannot stand…``,
     ``My favo(u)rite … is/are …``, or an instruction ``(Please) always|never …``;
  5. a **fact** is ``I am|I'm …`` (not followed by a passing state: sure, going, trying, looking,
     wondering, asking, here, glad, happy, sorry, afraid, just, still, done, back, ready, curious,
     confused, interested, thinking, having, working on, not sure), ``I live|work|study|grew up|
     was born|have|own|speak|moved|teach|use|drive …`` (not ``I have a question/problem/issue/
     error/bug``, ``I have to``, ``I have been``, ``I have no idea``), ``My name|wife|husband|
     partner|son|daughter|kid(s)|child(ren)|mother|father|mom|dad|brother|sister|dog|cat|pet|
     birthday|job|role|company|employer|team|email|phone|address|home|hometown|timezone|first
     language|native language … is/are/was …``, or ``Call me …``.

  The statement is the sentence as written (marker dropped, first letter capitalized, ending in a
  full stop). At most ``max_facts`` per job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from agentmesh.common.v1 import common_pb2
from agentmesh.llm.v1 import llm_pb2
from agentmesh.memory.v1 import memory_pb2
from agentmesh.services.memory.facts import MAX_FACT_CHARS, FactInput
from agentmesh.services.memory.router import RouterClient
from agentmesh.services.memory.store import SessionRef
from agentmesh.services.runtime.errors import ServiceError

log = logging.getLogger("agentmesh.memory")

FACT = memory_pb2.FACT_KIND_FACT
PREFERENCE = memory_pb2.FACT_KIND_PREFERENCE

INSTRUCTIONS = (
    "You extract long-term memories about the user from the user's own messages. List only what the "
    "user states about themselves that will still be true in later conversations: identity, location, "
    "work, family, possessions, plans, abilities, likes and dislikes, and how they want to be answered. "
    "Ignore questions, requests for help and anything about other topics. Write each memory on its own "
    "line as `fact [n]: <statement>` or `preference [n]: <statement>`, where n is the number of the "
    "message it comes from and the statement is one short sentence about \"the user\". If there is "
    "nothing to remember, reply `none`."
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_MARKER = re.compile(r"^(?:well|also|btw|by the way|actually|and|but|so|oh|ok|okay)\b[,\s]*", re.I)
_HYPOTHETICAL = re.compile(r"^(?:if|when|suppose|imagine|what if)\b", re.I)
_ADVERBS = r"(?:(?:really|also|usually|always|generally|absolutely|honestly)\s+)*"
_PREFERENCE = [
    re.compile(
        rf"^i\s+{_ADVERBS}(?:like|love|prefer|enjoy|adore|hate|dislike|don't like|do not like|can't stand|"
        r"cannot stand)\b", re.I),
    re.compile(r"^my\s+favou?rite\s+.+\s(?:is|are)\s", re.I),
    re.compile(r"^(?:please\s+)?(?:always|never)\s+(?!mind\b)\w+", re.I),
]
_PASSING = (
    r"(?:not\s+sure|sure|going|trying|looking|wondering|asking|here|glad|happy|sorry|afraid|just|still|done|back|"
    r"ready|curious|confused|interested|thinking|having|working\s+on)\b"
)
_FACT = [
    re.compile(rf"^i\s*(?:am|'m)\s+(?!{_PASSING})\w+", re.I),
    re.compile(
        r"^i\s+(?:live|work|study|grew up|was born|have|own|speak|moved|teach|use|drive)\b"
        r"(?!\s+(?:a\s+|an\s+)?(?:question|problem|issue|error|bug|doubt)s?\b)(?!\s+to\b)(?!\s+been\b)(?!\s+no idea\b)",
        re.I),
    re.compile(
        r"^my\s+(?:name|wife|husband|partner|son|daughter|kids?|child|children|mother|father|mom|dad|brother|"
        r"sister|dog|cat|pet|birthday|job|role|company|employer|team|email|phone|address|home|hometown|timezone|"
        r"time zone|first language|native language)\b.*\b(?:is|are|was|were)\b", re.I),
    re.compile(r"^call me\s+\w+", re.I),
]
_LLM_LINE = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?(fact|preference)\s*(?:\[(\d+)\])?\s*:\s*(.+?)\s*$", re.I)


def heuristic_statements(text: str) -> list[tuple[str, int]]:
    """(statement, FactKind) pairs found in one user message by the rules of the module docstring."""
    out: list[tuple[str, int]] = []
    for raw in _SENTENCE.split(text):
        sentence = " ".join(raw.replace("\u2019", "'").split())
        if not sentence or sentence.endswith("?"):
            continue
        sentence = _MARKER.sub("", sentence).strip()
        words = sentence.split()
        if not 2 <= len(words) <= 40 or _HYPOTHETICAL.match(sentence):
            continue
        kind = None
        if any(p.match(sentence) for p in _PREFERENCE):
            kind = PREFERENCE
        elif any(p.match(sentence) for p in _FACT):
            kind = FACT
        if kind is None:
            continue
        statement = sentence.rstrip(" .!;,:") + "."
        out.append((statement[0].upper() + statement[1:], kind))
    return out


@dataclass
class ExtractionJob:
    """User messages of one append to extract facts from."""

    ref: SessionRef
    incarnation: str
    #: (message id, text) of the append's user messages.
    messages: list[tuple[str, str]]


class FactExtractor:
    """Turns a job's messages into :class:`FactInput` (see the module docstring).

    ``mode``: ``auto`` (through the router when it has a language model; the heuristic when it
    has none, is out of reach or fails) or ``heuristic`` (never the router).
    """

    def __init__(self, router: RouterClient | None, *, mode: str = "auto", max_facts: int = 10,
                 max_tokens: int = 300):
        self.router = router
        self.mode = mode
        self.max_facts = max_facts
        self.max_tokens = max_tokens

    async def extract(self, job: ExtractionJob) -> tuple[list[FactInput], str]:
        """The facts of ``job`` and the extractor that found them (``llm`` or ``heuristic``)."""
        if self.mode != "heuristic" and self.router is not None:
            try:
                if await self.router.is_llm():
                    found = await self._llm(job)
                    if found is not None:
                        return found[: self.max_facts], "llm"
            except ServiceError as err:
                log.warning("LLM extraction failed; using the heuristic extractor",
                            extra={"fields": {"error": err.message}})
        return self._heuristic(job)[: self.max_facts], "heuristic"

    def _heuristic(self, job: ExtractionJob) -> list[FactInput]:
        out: list[FactInput] = []
        for message_id, text in job.messages:
            for statement, kind in heuristic_statements(text):
                out.append(FactInput(statement[:MAX_FACT_CHARS], kind, [(job.ref.session, message_id)]))
        return out

    async def _llm(self, job: ExtractionJob) -> list[FactInput] | None:
        """Facts from the router's model; None when the answer did not come from a model."""
        numbered = "\n".join(f"[{i}] {text}" for i, (_, text) in enumerate(job.messages, start=1))
        reply = await self.router.generate(
            llm_pb2.GenerateRequest(
                messages=[
                    common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=INSTRUCTIONS),
                    common_pb2.Message(role=common_pb2.ROLE_USER, content=f"User messages:\n{numbered}"),
                ],
                options=llm_pb2.GenerationOptions(max_tokens=self.max_tokens, temperature=0.0),
            )
        )
        if not reply.metadata.is_llm:
            return None
        return parse_llm_facts(reply.message.content, job)


def parse_llm_facts(answer: str, job: ExtractionJob) -> list[FactInput]:
    """The ``fact [n]: …`` / ``preference [n]: …`` lines of an extraction answer; other lines
    (including ``none``) are ignored."""
    out: list[FactInput] = []
    everyone: Sequence[tuple[str, str]] = [(job.ref.session, mid) for mid, _ in job.messages]
    for line in answer.splitlines():
        match = _LLM_LINE.match(line)
        if not match:
            continue
        kind = PREFERENCE if match.group(1).lower() == "preference" else FACT
        statement = " ".join(match.group(3).split()).strip("`\"' ")
        if len(statement.split()) < 2:
            continue
        n = int(match.group(2)) if match.group(2) else 0
        sources = [everyone[n - 1]] if 1 <= n <= len(everyone) else list(everyone)
        out.append(FactInput(statement[:MAX_FACT_CHARS], kind, sources))
    return out
