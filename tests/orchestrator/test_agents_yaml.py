"""Agents and workflows from YAML: the shipped examples load, and every kind of mistake is
reported with its file, line and column (and all of them at once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentmesh.services.orchestrator.agents import (
    AgentConfigError,
    ParallelWorkflow,
    RunDefinition,
    SupervisorWorkflow,
    load_catalog,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "agents.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(AgentConfigError) as info:
        load_catalog(path, **kwargs)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def test_the_shipped_examples_load_with_every_kind_of_workflow():
    catalog = load_catalog(REPO / "agents", max_steps_limit=16)
    assert {"assistant", "coder"} <= set(catalog.agents)
    kinds = {wf.type for wf in catalog.workflows.values()}
    assert kinds == {"sequential", "parallel", "supervisor"}
    coder = catalog.agents["coder"]
    assert coder.approval_required("python") and not coder.approval_required("calculator")
    assert coder.budget.max_cost_usd == 0.10 and coder.retrieval.enabled is False
    team = catalog.workflows["research_team"]
    assert isinstance(team, SupervisorWorkflow) and team.specialists == ("researcher", "analyst", "writer")
    # A run keeps the definition it started with: the snapshot rebuilds it exactly.
    snapshot = catalog.snapshot("research_team")
    rebuilt = RunDefinition.from_snapshot("research_team", snapshot)
    assert rebuilt.workflow == team and set(rebuilt.agents) == {"lead", "researcher", "analyst", "writer"}
    assert rebuilt.handoff_agent("transfer_to_analyst") == "analyst"
    assert rebuilt.handoff_agent("transfer_to_coder") is None  # not a specialist of this team


def test_type_errors_unknown_settings_and_ranges_point_at_their_line(tmp_path):
    path = write(
        tmp_path,
        "agents:\n"
        "  a:\n"
        "    instructions: hi\n"
        "    max_steps: many\n"          # line 4
        "    instructons: typo\n"        # line 5
        "    budget:\n"
        "      max_cost_usd: -1\n"       # line 7
        "    tools:\n"
        "      - calculator\n"
        "      - {name: python, requires_approval: maybe}\n"  # line 10
        "  b:\n"
        "    retrieval: {top_k: 99}\n",  # line 12
    )
    found = problems(path)
    assert f"{path}:4:16: agents.a.max_steps: Input should be a valid integer, unable to parse string as an integer" in found
    assert any(p.startswith(f"{path}:5:5: agents.a.instructons: unknown setting") for p in found)
    assert any(p.startswith(f"{path}:7:21: agents.a.budget.max_cost_usd: Input should be greater than 0") for p in found)
    assert any(p.startswith(f"{path}:10:43: agents.a.tools.1.requires_approval:") for p in found)
    assert any(p.startswith(f"{path}:12:24: agents.b.retrieval.top_k: Input should be less than or equal to 20") for p in found)
    assert len(found) == 5
    assert [int(p.split(":")[1]) for p in found] == [4, 5, 7, 10, 12]  # in file order


def test_workflow_members_must_be_defined_agents(tmp_path):
    path = write(
        tmp_path,
        "agents:\n"
        "  lead: {instructions: plan}\n"
        "  writer: {instructions: write}\n"
        "workflows:\n"
        "  team:\n"
        "    type: supervisor\n"
        "    supervisor: lead\n"
        "    specialists: [writer, reseacher]\n"  # line 8: typo
        "  chain:\n"
        "    type: sequential\n"
        "    agents:\n"
        "      - writer\n"
        "      - team\n"  # line 13: a workflow, not an agent
        "  odd:\n"
        "    type: graph\n"  # line 15
        "  panel:\n"
        "    type: parallel\n"
        "    agents: [writer]\n",  # line 18: needs two branches; aggregator missing
    )
    found = problems(path)
    assert any(p.startswith(f"{path}:8:27: workflows.team.specialists[1]: 'reseacher' is not defined") for p in found), found
    assert any(p.startswith(f"{path}:13:9: workflows.chain.agents[1]: 'team' is a workflow, not an agent") for p in found)
    assert any(p.startswith(f"{path}:15:11: workflows.odd.type: Input tag 'graph' found using 'type' does not match")
               for p in found), found
    assert any(p.startswith(f"{path}:18:5: workflows.panel.agents: Tuple should have at least 2 items") for p in found)
    assert any(p.startswith(f"{path}:16:3: workflows.panel.aggregator: Field required") for p in found)


def test_yaml_syntax_errors_and_duplicate_keys_are_located(tmp_path):
    broken = write(tmp_path, "agents:\n  a:\n    instructions: [unclosed\n", "broken.yaml")
    (problem,) = problems(broken)
    assert problem.startswith(f"{broken}:4:1: YAML syntax:")
    dupes = write(tmp_path, "agents:\n  a:\n    max_steps: 2\n    max_steps: 3\n", "dupes.yaml")
    (problem,) = problems(dupes)
    assert problem == f"{dupes}:4:5: duplicate key 'max_steps' (first at line 3)"


def test_names_are_unique_across_the_files_of_a_folder_and_limits_apply(tmp_path):
    write(tmp_path, "agents:\n  helper: {instructions: one}\n", "a.yaml")
    write(tmp_path, "workflows:\n  helper: {type: sequential, agents: [x]}\nagents:\n  x: {max_steps: 40}\n", "b.yaml")
    found = problems(tmp_path, max_steps_limit=16)
    assert f"{tmp_path / 'b.yaml'}:2:3: workflows.helper: already defined at {tmp_path / 'a.yaml'}:2:3" in found
    assert f"{tmp_path / 'b.yaml'}:4:18: agents.x.max_steps: 40 is above the orchestrator's limit of 16" in found


def test_bad_names_reserved_tool_names_and_a_missing_path(tmp_path):
    path = write(
        tmp_path,
        "agents:\n"
        "  9lives: {}\n"
        "  ok:\n"
        "    tools: [calculator, calculator, transfer_to_x]\n",
    )
    found = problems(path)
    assert found == [
        f"{path}:2:3: agents.9lives: the name must be 1..48 letters, digits, '_' or '-', starting with a letter",
        f"{path}:4:5: agents.ok.tools: lists tool(s) more than once: calculator",
    ]
    with pytest.raises(AgentConfigError, match="no such file or folder"):
        load_catalog(tmp_path / "missing.yaml")


def test_an_empty_file_defines_nothing_and_a_parallel_branch_may_aggregate(tmp_path):
    write(tmp_path, "", "empty.yaml")
    write(tmp_path, "agents:\n  a: {}\n  b: {}\nworkflows:\n  p: {type: parallel, agents: [a, b], aggregator: a}\n", "p.yaml")
    catalog = load_catalog(tmp_path)
    assert isinstance(catalog.workflows["p"], ParallelWorkflow) and catalog.workflows["p"].members == ("a", "b", "a")
