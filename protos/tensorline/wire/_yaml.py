"""YAML manifests parsed within bounds (the client reads manifest files, the server its pipeline
repository).

YAML aliases let a few hundred bytes stand for billions of values ("billion laughs": nine levels
of ten aliases each); PyYAML builds them as shared objects in no time, and everything that walks
the result (``json.dumps``, the server) then expands them, for minutes and gigabytes. The loader
here counts what a document expands to right after composing it and refuses one beyond
``MAX_NODES`` (or beyond ``MAX_CHARS`` of text) with a clear ValueError.

``syntax_error`` turns PyYAML's multi-line report (which names "<unicode string>", not the file)
into one line naming the source, line and column.
"""

from __future__ import annotations

from typing import Any

import yaml

# Values a manifest may expand to (aliases counted as often as they are used): far more than any
# real pipeline, far less than what would take a client more than a moment to serialize.
MAX_NODES = 1_000_000
MAX_CHARS = 64 * 1024 * 1024


class _BoundedLoader(yaml.SafeLoader):
    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            expanded = expanded_size(node)
            if expanded > MAX_NODES:
                raise ValueError(f"YAML document expands to {expanded} values through its "
                                 f"aliases; the limit is {MAX_NODES}")
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for once every alias is expanded (a shared node counts
    each time it is referenced). Iterative with memoization, so it costs one visit per distinct
    node however large the expansion; ValueError for a recursive alias."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            on_path.discard(key)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError("YAML document refers to itself through an alias")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses oversized text and alias bombs with a ValueError."""
    if len(text) > MAX_CHARS:
        raise ValueError(f"YAML text of {len(text)} characters exceeds the limit of {MAX_CHARS}")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: no arbitrary objects
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ValueError("YAML document nested too deeply") from None


def syntax_error(exc: yaml.YAMLError, source: str) -> ValueError:
    """One line, ``source:line:column: not valid YAML: problem (context)``, for a PyYAML error."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ValueError(f"{source}: not valid YAML: {' '.join(str(exc).split())}")
    mark = exc.problem_mark  # 0-based; editors count from 1
    problem = exc.problem or "syntax error"
    context = f" ({exc.context})" if exc.context else ""
    return ValueError(f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: "
                      f"{problem}{context}")
