"""Diagrams of the two state machines, generated from the tables the runtime uses.

The migration FSM and the agent FSM are drawn by `transitions`' own `GraphMachine` from
`MIGRATION_TRANSITIONS` and `AGENT_TRANSITIONS`, so a diagram can never show an edge the code
does not have (or miss a guard: `show_conditions=True` writes each transition's `conditions`
and `unless` on its edge). Two renderings per machine:

- mermaid text (`.mmd`), which any Markdown viewer shows, built without system packages;
- SVG, laid out by Graphviz through `pygraphviz` (its wheels bundle Graphviz). It is imported
  only when SVG is asked for, so the rest of lockstep never needs it.

Everything here returns text or bytes; writing files is the job of `lockstep diagram`
(`coordinator/commands/diagram.py`). SVG layout depends on the fonts of the machine that drew
it, so an SVG is not compared byte for byte: each one carries the SHA-256 of the Graphviz source
it was drawn from (`svg_source_digest`), and staleness is judged on that.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from transitions.extensions import GraphMachine

from statemachine.agent_fsm import AGENT_TRANSITIONS, AgentState
from statemachine.exceptions import LockstepError
from statemachine.migration_fsm import GUARD_DESCRIPTIONS, MIGRATION_TRANSITIONS
from statemachine.phases import MigrationState

#: The command that rewrites every committed diagram; error messages point at it.
REFRESH_COMMAND = "lockstep diagram"  # from the repository root; or python docs/gen_diagrams.py


class DiagramError(LockstepError, RuntimeError):
    """Raised when a diagram cannot be produced here (for SVG: pygraphviz is not installed)."""


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """One state machine to draw: its states, initial state and transition table."""

    name: str  # file stem: docs/diagrams/<name>.mmd and .svg
    title: str
    states: tuple[enum.Enum, ...]
    initial: enum.Enum
    transitions: tuple[Mapping[str, Any], ...]


MACHINES: tuple[MachineSpec, ...] = (
    MachineSpec(
        "migration",
        "lockstep migration FSM (coordinator)",
        tuple(MigrationState),
        MigrationState.PENDING,
        tuple(MIGRATION_TRANSITIONS),
    ),
    MachineSpec(
        "agent",
        "lockstep agent FSM",
        tuple(AgentState),
        AgentState.IDLE,
        tuple(AGENT_TRANSITIONS),
    ),
)


def machine_spec(name: str) -> MachineSpec:
    for spec in MACHINES:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in MACHINES)
    raise KeyError(f"no state machine named {name!r}; known: {known}")


#: transitions' styles, except that the initial state is drawn like every other one: a
#: diagram has no "current" state to highlight.
_DOC_STYLES: dict[str, Any] = copy.deepcopy(GraphMachine.style_attributes)
_DOC_STYLES["node"]["active"] = dict(_DOC_STYLES["node"]["default"])


class _DocGraphMachine(GraphMachine):
    style_attributes = _DOC_STYLES


class _Model:
    """A blank model: the drawing machine binds its triggers here, never on real objects."""


def _graph(spec: MachineSpec, engine: Literal["mermaid", "pygraphviz"], title: str) -> Any:
    model = _Model()
    _DocGraphMachine(
        model=model,
        states=list(spec.states),
        initial=spec.initial,
        # transitions may normalise the dicts it is given; the runtime's table stays untouched.
        transitions=copy.deepcopy(list(spec.transitions)),
        auto_transitions=False,
        show_conditions=True,
        graph_engine=engine,
        title=title,
    )
    return model.get_graph()  # type: ignore[attr-defined]


def mermaid(spec: MachineSpec) -> str:
    """Mermaid `stateDiagram-v2` text of `spec`, guards on the edges, ending in a newline."""
    # transitions puts the title verbatim between `---` lines; mermaid reads that block as
    # YAML front matter, so give it the `title:` key it understands.
    text = str(_graph(spec, "mermaid", f"title: {spec.title}").draw(None))
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(lines).rstrip("\n") + "\n"


def _pygraphviz() -> Any:
    try:
        import pygraphviz
    except ImportError as exc:
        raise DiagramError(
            "SVG diagrams need pygraphviz (its wheels bundle Graphviz): "
            "pip install 'lockstep[diagrams]'"
        ) from exc
    return pygraphviz


def dot(spec: MachineSpec) -> str:
    """Graphviz DOT source of `spec` (needs pygraphviz)."""
    pygraphviz = _pygraphviz()
    graph = _graph(spec, "pygraphviz", spec.title)
    if not isinstance(graph, pygraphviz.AGraph):  # transitions falls back silently
        raise DiagramError(f"transitions did not build a pygraphviz graph, got {type(graph)}")
    return str(graph.string())


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


_DIGEST_RE = re.compile(rb"<!-- lockstep diagram source sha256: ([0-9a-f]{64}) -->")


def svg(spec: MachineSpec) -> bytes:
    """SVG of `spec`, laid out by Graphviz's `dot`, stamped with its source's digest."""
    pygraphviz = _pygraphviz()
    source = dot(spec)
    drawn = pygraphviz.AGraph(string=source).draw(None, format="svg", prog="dot")
    if not isinstance(drawn, bytes) or b"<svg" not in drawn:
        raise DiagramError(f"Graphviz produced no SVG for {spec.name}")
    stamp = (
        f"<!-- lockstep diagram source sha256: {source_digest(source)} -->\n"
        f"<!-- generated from the transition table by `{REFRESH_COMMAND}`; do not edit -->\n"
    ).encode()
    head, sep, rest = drawn.partition(b"<svg")
    return head + stamp + sep + rest


def svg_source_digest(svg_bytes: bytes) -> str | None:
    """The digest `svg` stamped into an SVG, or None if it carries none."""
    match = _DIGEST_RE.search(svg_bytes)
    return match.group(1).decode() if match else None


def render(
    machines: Iterable[MachineSpec] = MACHINES, *, with_svg: bool = True
) -> dict[str, bytes]:
    """Every diagram file's expected content, by file name (`migration.mmd`, ...)."""
    files: dict[str, bytes] = {}
    for spec in machines:
        files[f"{spec.name}.mmd"] = mermaid(spec).encode()
        if with_svg:
            files[f"{spec.name}.svg"] = svg(spec)
    return files


# ----------------------------------------------------------------- markdown
_BEGIN = "<!-- generated by `lockstep diagram`: {name} (do not edit) -->"
_END = "<!-- end generated: {name} -->"


def guard_table() -> str:
    """A Markdown table: each guard of the migration FSM, what it checks, where it is used."""
    used: dict[str, list[str]] = {name: [] for name in GUARD_DESCRIPTIONS}
    for t in MIGRATION_TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        edge = f"{'/'.join(s.name for s in sources)} --{t['trigger']}--> {t['dest'].name}"
        for key, note in (("conditions", ""), ("unless", " (must be false)")):
            names = t.get(key) or []
            for name in [names] if isinstance(names, str) else names:
                if name not in used:
                    raise DiagramError(f"guard {name!r} has no entry in GUARD_DESCRIPTIONS")
                used[name].append(f"`{edge}`{note}")
    rows = ["| Guard | Checks | On the edges |", "| --- | --- | --- |"]
    for name, description in GUARD_DESCRIPTIONS.items():
        rows.append(f"| `{name}` | {description} | {'<br>'.join(used[name]) or 'unused'} |")
    return "\n".join(rows) + "\n"


def markdown_sections(machines: Iterable[MachineSpec] = MACHINES) -> dict[str, str]:
    """The generated parts of `docs/state-machine.md`, by marker name."""
    sections = {spec.name: f"```mermaid\n{mermaid(spec)}```\n" for spec in machines}
    sections["guards"] = guard_table()
    return sections


def embed(markdown: str, sections: Mapping[str, str]) -> str:
    """`markdown` with the text between each section's markers replaced by the section.

    A document marks a generated part with `_BEGIN`/`_END` comment lines naming it; a
    section whose markers are missing is an error (the document would silently go stale).
    """
    for name, content in sections.items():
        begin, end = _BEGIN.format(name=name), _END.format(name=name)
        start = markdown.find(begin + "\n")
        stop = markdown.find(end, start + 1)
        if start < 0 or stop < 0:
            raise DiagramError(f"the document has no {begin!r} ... {end!r} block")
        head = markdown[: start + len(begin) + 1]
        markdown = head + content + markdown[stop:]
    return markdown


def stale(
    machines: Iterable[MachineSpec], committed: Mapping[str, bytes | None], *, with_svg: bool
) -> list[str]:
    """What differs between `committed` diagram files and the code; empty when up to date.

    `committed` maps a file name to its bytes, or None when the file is missing. Mermaid text
    must match exactly; an SVG must carry the digest of the DOT source generated now.
    """
    problems = []
    for spec in machines:
        names = [f"{spec.name}.mmd"] + ([f"{spec.name}.svg"] if with_svg else [])
        for name in names:
            content = committed.get(name)
            if content is None:
                problems.append(f"{name} is missing")
            elif name.endswith(".mmd"):
                if content != mermaid(spec).encode():
                    problems.append(f"{name} differs from the {spec.name} transition table")
            elif svg_source_digest(content) != source_digest(dot(spec)):
                problems.append(f"{name} was drawn from another version of the table")
    return problems


__all__ = [
    "MACHINES",
    "REFRESH_COMMAND",
    "DiagramError",
    "MachineSpec",
    "dot",
    "embed",
    "guard_table",
    "machine_spec",
    "markdown_sections",
    "mermaid",
    "render",
    "source_digest",
    "stale",
    "svg",
    "svg_source_digest",
]
