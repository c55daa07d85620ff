"""Graph capture for structure analysis: torch.fx with a leaf registry, then torch.export.

The graphs are used to learn structure only (the order in which blocks run and which block feeds which),
never to run the model: tracing a model in train mode bakes randomness into the graph, and checkpointing is
inlined. Every failure becomes a :class:`~replace_wrap.TracingError`, and the caller falls back to the next
route (FX -> export when example inputs are given -> structural walk of the module tree).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from .._compat import timm_notrace
from ..errors import TracingError

__all__ = [
    "BlockGraph",
    "export_block_graph",
    "fx_block_graph",
    "preserved_state",
    "register_leaf_module",
]

# Module types that FX should never trace into (user extensions; timm's own registry is added per model).
_LEAF_TYPES: set[type[nn.Module]] = set()


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: treat modules of this type as opaque leaves when tracing (like timm's notrace)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module needs an nn.Module subclass, got {cls!r}")
    _LEAF_TYPES.add(cls)
    return cls


@dataclass
class BlockGraph:
    """What a captured graph says about the candidate blocks.

    Attributes:
        route: ``"fx"`` or ``"export"``.
        order: Block path -> position of its first call in the graph (blocks never called are absent).
        feeds: ``feeds(a, b)`` tells whether block ``a``'s output reaches block ``b``'s input.
    """

    route: str
    order: dict[str, int]
    feeds: Callable[[str, str], bool] = field(repr=False)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Put every module back as it was on exit, whatever the analysis ran.

    Tracing calls ``forward`` with proxies or fake tensors, and a forward may have side effects: flip
    ``training``, count calls in an attribute, cache a tensor, register a buffer. Each module's attribute
    dict and its parameter/buffer/submodule/hook tables are snapshotted (shallowly: tensors themselves are
    never written by tracing) and restored if anything in them changed.
    """
    tables = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
    snapshot = []
    for m in model.modules():
        attrs = dict(m.__dict__)
        snapshot.append((m, attrs, {t: dict(attrs[t]) for t in tables if isinstance(attrs.get(t), dict)}))
    try:
        yield
    finally:
        for m, attrs, inner in snapshot:
            if m.__dict__.keys() != attrs.keys() or any(m.__dict__[k] is not v for k, v in attrs.items()):
                m.__dict__.clear()
                m.__dict__.update(attrs)
            for name, table in inner.items():
                current = attrs[name]
                if current.keys() != table.keys() or any(current[k] is not v for k, v in table.items()):
                    current.clear()
                    current.update(table)


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Iterable[nn.Module], leaf_types: Iterable[type], autowrap: Iterable[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap))
        self._leaf_ids = {id(m) for m in leaves}
        self._leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaf_ids or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fx_block_graph(model: nn.Module, blocks: dict[str, nn.Module]) -> BlockGraph:
    """Symbolically trace ``model`` with ``blocks`` as leaves.

    Raises:
        TracingError: If torch.fx cannot trace the model (the message keeps FX's reason).
    """
    leaf_types, autowrap = timm_notrace(model)
    tracer = _LeafTracer(blocks.values(), [*_LEAF_TYPES, *leaf_types], autowrap)
    try:
        with preserved_state(model), torch.no_grad():
            graph = tracer.trace(model)
    except Exception as exc:  # FX raises anything from TraceError to TypeError on data-dependent code
        raise TracingError(f"torch.fx could not trace {type(model).__name__}: {_one_line(exc)}") from exc
    nodes: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in blocks and node.target not in nodes:
            nodes[str(node.target)] = node
    positions = {n: i for i, n in enumerate(graph.nodes)}
    order = {path: i for i, path in enumerate(sorted(nodes, key=lambda p: positions[nodes[p]]))}

    def feeds(a: str, b: str) -> bool:
        return a in nodes and b in nodes and _reaches(nodes[a], [nodes[b]])

    return BlockGraph("fx", order, feeds)


def export_block_graph(model: nn.Module, blocks: dict[str, nn.Module], example_inputs: Any) -> BlockGraph:
    """Capture ``model`` with ``torch.export(strict=False)`` and map its nodes back to blocks.

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs.

    Raises:
        TracingError: If torch.export fails.
    """
    args, kwargs = _split_inputs(example_inputs)
    try:
        with preserved_state(model):
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        raise TracingError(f"torch.export could not capture {type(model).__name__}: {_one_line(exc)}") from exc
    members: dict[str, list[fx.Node]] = {}
    for node in ep.graph.nodes:
        for path in _module_paths(node):
            if path in blocks:
                members.setdefault(path, []).append(node)
    positions = {n: i for i, n in enumerate(ep.graph.nodes)}
    order = {p: i for i, p in enumerate(sorted(members, key=lambda p: positions[members[p][0]]))}

    def feeds(a: str, b: str) -> bool:
        if a not in members or b not in members:
            return False
        return _reaches_any(set(members[a]), members[b])

    return BlockGraph("export", order, feeds)


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_normalize_path(v[0]) for v in stack.values()]


def _normalize_path(path: str) -> str:
    # strict export spells paths like "L['self'].blocks[0]"; non-strict uses "blocks.0"
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].lstrip(".").replace("[", ".").replace("]", "").replace("'", "")
    return path


def _reaches(src: fx.Node, targets: list[fx.Node]) -> bool:
    return _reaches_any({src}, targets)


def _reaches_any(sources: set[fx.Node], targets: list[fx.Node]) -> bool:
    """Whether any node of ``sources`` is an ancestor of a node of ``targets`` (walks inputs backwards)."""
    seen: set[fx.Node] = set()
    todo = [inp for t in targets for inp in t.all_input_nodes]
    while todo:
        n = todo.pop()
        if n in sources:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
