"""Agents and workflows defined in YAML, validated with pydantic, errors pointing at file:line:column.

A file (or every ``*.yaml`` / ``*.yml`` file of a folder, in name order) holds two mappings, both
optional; names are unique across all files and shared by agents and workflows::

    agents:
      researcher:
        description: Finds facts in the document collection.     # shown to a supervisor
        instructions: You research questions. Cite sources as [n].  # the system message
        model: chat                    # router model alias; empty = the router default
        tools: [search_documents, {name: python, requires_approval: true}]
        retrieval: {enabled: true, collection: docs, top_k: 4}
        memory: {enabled: true, token_budget: 1500, facts: {enabled: true, top_k: 5}}
        max_steps: 4                   # model calls per invocation
        max_tokens: 512                # completion tokens per model call; 0 = router default
        budget: {max_total_tokens: 20000, max_cost_usd: 0.05}
    workflows:
      report:    {type: sequential, agents: [researcher, writer]}
      panel:     {type: parallel, agents: [optimist, skeptic], aggregator: judge}
      team:      {type: supervisor, supervisor: lead, specialists: [researcher, coder]}

See ``services/orchestrator/README.md`` for what each field does at run time. Everything is
checked when the orchestrator starts: unknown keys, wrong types, out-of-range numbers, duplicate
keys, names a workflow uses that no agent has. :class:`AgentConfigError` lists every problem as
``path:line:column: where: what``. Tool names are checked against the tool service's registry
when a run starts (that service may start after the orchestrator).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

#: Agent and workflow names. At most 48 characters so ``transfer_to_<name>`` stays a valid tool
#: name (``^[a-zA-Z0-9_-]{1,64}$``, the subset OpenAI and Anthropic both accept).
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,47}$"
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
COLLECTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"
#: Prefix of the tool a supervisor calls to hand a task to a specialist (LangGraph's naming).
HANDOFF_PREFIX = "transfer_to_"
#: Name of the agent built from a RunRequest that names none.
ADHOC_AGENT = "agentmesh"


class AgentConfigError(ValueError):
    """The agents YAML is invalid; the message lists every problem with its file and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolRef(_Strict):
    """A tool an agent may call. ``requires_approval``: every call waits for a person's decision
    (``ResolveInterrupt``) before it runs."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    requires_approval: bool = False


class RetrievalSpec(_Strict):
    """Chunks retrieved for the agent's input before its first model call."""

    enabled: bool = True
    collection: str = Field("", pattern=r"^$|" + COLLECTION_PATTERN, description="Empty = the default collection.")
    top_k: int = Field(4, ge=1, le=20)


class FactsSpec(_Strict):
    """Long-term facts about the run's user (``MemoryService.RecallFacts``), the ``top_k`` most
    related to the agent's input, given to the model as a system message before the history.
    ``min_similarity`` (cosine, -1..1): leave out less related facts; None = the memory service's
    default."""

    enabled: bool = False
    top_k: int = Field(5, ge=1, le=50)
    min_similarity: float | None = Field(None, ge=-1, le=1)


class MemorySpec(_Strict):
    """Session history read into the agent's conversation (``token_budget`` tokens of it) when
    ``enabled``; for the agent a run names directly it also decides whether the turn is appended
    to the session (the memory service then extracts facts from it). ``facts``: recall the user's
    long-term facts too (off by default)."""

    enabled: bool = True
    token_budget: int = Field(1500, ge=1, le=200_000)
    facts: FactsSpec = FactsSpec()


class BudgetSpec(_Strict):
    """Limits checked before every model call; a run (or agent invocation) that reached one stops
    with BUDGET_EXHAUSTED. ``max_total_tokens`` counts input + output tokens of every model call;
    ``max_cost_usd`` the cost the router reports from its catalogue prices."""

    max_total_tokens: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)

    def exhausted(self, total_tokens: int, cost_usd: float) -> str:
        """Why the budget is spent ("" when it is not)."""
        if self.max_total_tokens is not None and total_tokens >= self.max_total_tokens:
            return f"{total_tokens} tokens used of a budget of {self.max_total_tokens}"
        if self.max_cost_usd is not None and cost_usd >= self.max_cost_usd:
            return f"${cost_usd:.6f} spent of a budget of ${self.max_cost_usd:g}"
        return ""


def _tool_ref(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class AgentSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field("", max_length=2000)
    instructions: str = Field("", max_length=100_000)
    model: str = Field("", max_length=256)
    tools: tuple[ToolRef, ...] = ()
    #: Offer every registered tool (the agent built from a RunRequest without ``tools``).
    all_tools: bool = False
    retrieval: RetrievalSpec = RetrievalSpec()
    memory: MemorySpec = MemorySpec()
    max_steps: int = Field(4, ge=1, le=64)
    max_tokens: int = Field(0, ge=0, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    budget: BudgetSpec = BudgetSpec()

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        return [_tool_ref(v) for v in value] if isinstance(value, list) else value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: tuple[ToolRef, ...]) -> tuple[ToolRef, ...]:
        names = [t.name for t in value]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"lists tool(s) more than once: {', '.join(dupes)}")
        if handoffs := [n for n in names if n.startswith(HANDOFF_PREFIX)]:
            raise ValueError(f"{', '.join(handoffs)}: names starting with {HANDOFF_PREFIX!r} are reserved for handoffs")
        return value

    def approval_required(self, tool: str) -> bool:
        return any(t.name == tool and t.requires_approval for t in self.tools)


class WorkflowMemory(_Strict):
    """Whether the run's turn (its input and the workflow's answer) is appended to the session."""

    enabled: bool = True


class _Workflow(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field("", max_length=2000)
    budget: BudgetSpec = BudgetSpec()
    memory: WorkflowMemory = WorkflowMemory()


class SequentialWorkflow(_Workflow):
    """Stages run one after the other; each gets the run's input and the previous stage's answer."""

    type: Literal["sequential"]
    agents: tuple[str, ...] = Field(min_length=1, max_length=16)

    @property
    def members(self) -> tuple[str, ...]:
        return self.agents


class ParallelWorkflow(_Workflow):
    """Branches run at once on the run's input; the aggregator gets every branch's answer."""

    type: Literal["parallel"]
    agents: tuple[str, ...] = Field(min_length=2, max_length=16)
    aggregator: str

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.agents, self.aggregator)


class SupervisorWorkflow(_Workflow):
    """The supervisor hands tasks to specialists with ``transfer_to_<name>`` tool calls; each
    specialist's answer is that call's result, and the supervisor gives the final answer."""

    type: Literal["supervisor"]
    supervisor: str
    specialists: tuple[str, ...] = Field(min_length=1, max_length=16)

    @property
    def members(self) -> tuple[str, ...]:
        return (self.supervisor, *self.specialists)


WorkflowSpec = Annotated[SequentialWorkflow | ParallelWorkflow | SupervisorWorkflow, Field(discriminator="type")]
_WORKFLOW = TypeAdapter(WorkflowSpec)


class _File(_Strict):
    agents: dict[str, Any] | None = None
    workflows: dict[str, Any] | None = None


@dataclass
class Catalog:
    """Every agent and workflow, by name."""

    agents: dict[str, AgentSpec] = field(default_factory=dict)
    workflows: dict[str, SequentialWorkflow | ParallelWorkflow | SupervisorWorkflow] = field(default_factory=dict)
    #: Where each name was defined (``file:line``), for error messages.
    origins: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted({*self.agents, *self.workflows})

    def snapshot(self, name: str) -> dict[str, Any]:
        """What a run of ``name`` needs, as JSON-able data kept in the run's checkpoint (so a
        run resumed later runs the definition it started with)."""
        if name in self.workflows:
            wf = self.workflows[name]
            return {
                "workflow": wf.model_dump(mode="json"),
                "agents": {n: self.agents[n].model_dump(mode="json") for n in dict.fromkeys(wf.members)},
            }
        return {"workflow": None, "agents": {name: self.agents[name].model_dump(mode="json")}}


@dataclass
class RunDefinition:
    """The target of one run, rebuilt from a checkpoint's snapshot."""

    target: str
    workflow: SequentialWorkflow | ParallelWorkflow | SupervisorWorkflow | None
    agents: dict[str, AgentSpec]

    @classmethod
    def from_snapshot(cls, target: str, snapshot: dict[str, Any]) -> RunDefinition:
        agents = {n: AgentSpec.model_validate(a) for n, a in snapshot["agents"].items()}
        workflow = _WORKFLOW.validate_python(snapshot["workflow"]) if snapshot.get("workflow") else None
        return cls(target, workflow, agents)

    @property
    def budget(self) -> BudgetSpec:
        return self.workflow.budget if self.workflow else self.agents[self.target].budget

    def handoff_agent(self, tool_name: str) -> str | None:
        """The specialist a ``transfer_to_<name>`` call of this run's supervisor names."""
        if isinstance(self.workflow, SupervisorWorkflow) and tool_name.startswith(HANDOFF_PREFIX):
            name = tool_name.removeprefix(HANDOFF_PREFIX)
            return name if name in self.workflow.specialists else None
        return None


# --- loading ----------------------------------------------------------------------------------


def load_catalog(path: str | Path, max_steps_limit: int | None = None) -> Catalog:
    """Load a YAML file or every ``*.yaml``/``*.yml`` of a folder. Raises :class:`AgentConfigError`
    listing every problem (``file:line:column: where: what``), or for a missing path."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    elif root.is_file():
        files = [root]
    else:
        raise AgentConfigError(f"{root}: no such file or folder (AGENTMESH_ORCHESTRATOR_AGENTS_PATH)")
    catalog = Catalog()
    problems: list[str] = []
    pending_workflows: list[tuple[str, SequentialWorkflow | ParallelWorkflow | SupervisorWorkflow, _Located]] = []
    for file in files:
        try:
            data, marks, key_marks = _compose(file)
        except AgentConfigError as exc:
            problems.append(str(exc))
            continue
        where = _Located(file, marks, key_marks)
        if data is None:
            continue
        try:
            top = _File.model_validate(data)
        except ValidationError as exc:
            problems.extend(where.errors(exc, ()))
            continue
        for section in ("agents", "workflows"):
            for name, body in (getattr(top, section) or {}).items():
                origin = where.at((section, name))
                if name in catalog.origins:
                    problems.append(f"{origin}: {section}.{name}: already defined at {catalog.origins[name]}")
                    continue
                if not isinstance(body, dict):
                    problems.append(f"{origin}: {section}.{name}: expected a mapping of settings")
                    continue
                try:
                    if section == "agents":
                        spec = AgentSpec.model_validate({**body, "name": name})
                        if max_steps_limit is not None and spec.max_steps > max_steps_limit:
                            problems.append(
                                f"{where.at((section, name, 'max_steps'))}: agents.{name}.max_steps: {spec.max_steps} "
                                f"is above the orchestrator's limit of {max_steps_limit}"
                            )
                            continue
                        catalog.agents[name] = spec
                    else:
                        wf = _WORKFLOW.validate_python({**body, "name": name})
                        catalog.workflows[name] = wf
                        pending_workflows.append((name, wf, where))
                except ValidationError as exc:
                    problems.extend(where.errors(exc, (section, name)))
                    continue
                catalog.origins[name] = origin
    for name, wf, where in pending_workflows:
        problems.extend(_check_members(name, wf, catalog, where))
    if problems:
        problems.sort(key=_position)
        raise AgentConfigError("invalid agents configuration:\n  " + "\n  ".join(problems))
    return catalog


def _position(problem: str) -> tuple[str, int, int]:
    """(file, line, column) of a problem line, to list problems in file order."""
    parts = problem.split(":", 3)
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    return parts[0], 0, 0


def _check_members(name: str, wf: Any, catalog: Catalog, where: _Located) -> Iterable[str]:
    if wf.type == "supervisor":
        fields = [("supervisor", None, wf.supervisor)] + [("specialists", i, n) for i, n in enumerate(wf.specialists)]
    else:
        fields = [("agents", i, n) for i, n in enumerate(wf.agents)]
        if wf.type == "parallel":
            fields.append(("aggregator", None, wf.aggregator))
    for key, index, member in fields:
        path = ("workflows", name, key) + ((index,) if index is not None else ())
        dotted = f"workflows.{name}.{key}" + (f"[{index}]" if index is not None else "")
        if member not in catalog.agents:
            hint = "a workflow, not an agent" if member in catalog.workflows else "not defined"
            yield f"{where.at(path)}: {dotted}: {member!r} is {hint}; members must be agents ({', '.join(sorted(catalog.agents)) or 'none defined'})"
    if wf.type == "supervisor" and wf.supervisor in wf.specialists:
        yield f"{where.at(('workflows', name, 'supervisor'))}: workflows.{name}: the supervisor cannot be its own specialist"
    if wf.type == "parallel" and len(set(wf.agents)) != len(wf.agents):
        yield f"{where.at(('workflows', name, 'agents'))}: workflows.{name}.agents: a branch is listed twice"


class _Located:
    """Line and column of every node of one parsed file, by path."""

    #: Union member tags pydantic puts first in the location of a workflow's errors.
    _TAGS = {"sequential", "parallel", "supervisor"}

    def __init__(self, file: Path, marks: dict[tuple, yaml.Mark], key_marks: dict[tuple, yaml.Mark] | None = None):
        self.file = file
        self.marks = marks
        self.key_marks = key_marks or {}

    def at(self, path: tuple, key: bool = False) -> str:
        """``file:line:column`` of the deepest node of ``path`` that exists (of its key with ``key``)."""
        mark = None
        for end in range(len(path), -1, -1):
            prefix = tuple(path[:end])
            if (mark := (self.key_marks.get(prefix) if key else None) or self.marks.get(prefix)) is not None:
                break
        if mark is None:
            return str(self.file)
        return f"{self.file}:{mark.line + 1}:{mark.column + 1}"

    def errors(self, exc: ValidationError, prefix: tuple) -> list[str]:
        out = []
        for err in exc.errors(include_url=False):
            loc = list(err["loc"])
            if loc and prefix[:1] == ("workflows",) and loc[0] in self._TAGS:
                loc = loc[1:]
            message = err["msg"].removeprefix("Value error, ")
            if loc == ["name"]:  # the name is the mapping key, not a setting of the file
                loc, message = [], "the name must be 1..48 letters, digits, '_' or '-', starting with a letter"
            if err["type"] == "union_tag_invalid":
                loc = ["type"]
            path = (*prefix, *loc)
            dotted = ".".join(str(p) for p in path) or "(top level)"
            unknown = err["type"] == "extra_forbidden"
            if unknown:
                message = "unknown setting (check the spelling; see services/orchestrator/README.md)"
            out.append(f"{self.at(path, key=unknown)}: {dotted}: {message}")
        return out


def _compose(file: Path) -> tuple[Any, dict[tuple, yaml.Mark], dict[tuple, yaml.Mark]]:
    """Parse one file with PyYAML's safe loader, keeping the start mark of every node."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"{file}: cannot read: {exc}") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, {}
        marks: dict[tuple, yaml.Mark] = {}
        key_marks: dict[tuple, yaml.Mark] = {}
        _index(file, node, (), marks, key_marks)
        return loader.construct_document(node), marks, key_marks
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise AgentConfigError(f"{where}: YAML syntax: {exc.problem or exc.context}") from exc
    finally:
        loader.dispose()


def _index(
    file: Path, node: yaml.Node, path: tuple, marks: dict[tuple, yaml.Mark], key_marks: dict[tuple, yaml.Mark]
) -> None:
    marks[path] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:  # PyYAML would silently keep the last one
                m, first = key_node.start_mark, seen[key]
                raise AgentConfigError(
                    f"{file}:{m.line + 1}:{m.column + 1}: duplicate key {key!r} (first at line {first.line + 1})"
                )
            seen[key] = key_node.start_mark
            key_marks[(*path, key)] = key_node.start_mark
            _index(file, value_node, (*path, key), marks, key_marks)
            if not isinstance(value_node, yaml.ScalarNode):  # a block: point at its key's line
                marks[(*path, key)] = key_node.start_mark
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(file, item, (*path, i), marks, key_marks)
