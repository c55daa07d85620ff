"""Block discovery: find the stacks of repeated blocks in a model, and their execution order.

Pure analysis: nothing here changes the model or knows about policies.

1. **Runs.** Under every module, consecutive children of the same kind (class; for plain
   ``Sequential``/``ModuleList``/``ModuleDict`` the class plus the kinds of their children) that own
   parameters form a run. Blocks registered as plain attributes (``s1.b1``, ``s1.b2``) are children too.
2. **Stacks.** Runs of the same kind whose parents' paths differ only in numbers (``stages.0.blocks`` and
   ``stages.1.blocks``, ``layer1`` and ``layer2``) are chained, in registration order, into one stack: the
   blocks of a CNN run across its stages.
3. **Choice.** A stack needs evidence of repetition: two blocks at distance 1 or 2 (period-2 stacks
   alternate two kinds of block) with identical parameter shapes.
   Candidate stacks that nest (the LayerNorms inside transformer blocks chain into a stack too) or share
   modules conflict; the one whose blocks carry the most parameters shared in shape with an adjacent block
   wins, so transformer blocks beat their LayerNorms and Swin's blocks beat its stages.
4. **Order.** If the model can be traced (torch.fx, or torch.export with example inputs), the graph reorders
   each stack by execution, drops blocks that never run, and splits a stack where one block does not feed
   the next (parallel branches). Otherwise registration order stands, and the route says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Hashable

from torch import nn

from .errors import TracingError
from .tracing import BlockGraph, export_block_graph, fx_block_graph, preserved_state

__all__ = ["Analysis", "Stack", "analyse", "find_stacks", "template"]

_GENERIC_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Stack:
    """A sequence of blocks that run one after another.

    Attributes:
        name: Readable name: the blocks' paths with numbers replaced by ``*`` (``"blocks.*"``, ``"layer*.*"``).
        paths: Module paths of the blocks, in execution order.
        modules: The block modules, aligned with ``paths``.
    """

    name: str
    paths: tuple[str, ...]
    modules: tuple[nn.Module, ...] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Analysis:
    """Result of :func:`analyse`: the stacks, the route that ordered them, and notes on what was dropped."""

    route: str
    stacks: list[Stack]
    notes: list[str] = field(default_factory=list)


def template(path: str) -> str:
    """``"stages.1.blocks.0"`` -> ``"stages.*.blocks.*"``: numbers in a path replaced by ``*``."""
    return ".".join(re.sub(r"\d+", "*", part) for part in path.split(".")) if path else path


def analyse(model: nn.Module, example_inputs: Any = None, trace: bool = True) -> Analysis:
    """Find the block stacks of ``model`` and order them by execution where a graph can be captured.

    Args:
        model: The model; it is not changed (modes are restored, nothing is run on real data).
        example_inputs: Optional inputs for the ``torch.export`` route, used when torch.fx cannot trace.
        trace: ``False`` skips graph capture and uses the structural walk only.

    Returns:
        An :class:`Analysis` whose ``route`` is ``"fx"``, ``"export"`` or ``"structural"``.
    """
    with preserved_state(model):
        stacks = find_stacks(model)
        notes: list[str] = []
        if not stacks or not trace:
            return Analysis("structural", stacks, notes)
        blocks = {p: m for s in stacks for p, m in zip(s.paths, s.modules)}
        graph: BlockGraph | None = None
        try:
            graph = fx_block_graph(model, blocks)
        except TracingError as exc:
            notes.append(str(exc))
        if graph is None and example_inputs is not None:
            try:
                graph = export_block_graph(model, blocks, example_inputs)
            except TracingError as exc:
                notes.append(str(exc))
        if graph is None:
            notes.append("using the structural walk: blocks in registration order")
            return Analysis("structural", stacks, notes)
        return Analysis(graph.route, _order_by_graph(stacks, graph, notes), notes)


def find_stacks(model: nn.Module) -> list[Stack]:
    """Structural discovery (steps 1-3 above), in registration order."""
    sizes = _sizes(model)
    order = {id(m): i for i, m in enumerate(model.modules())}
    aliases: dict[int, list[str]] = {}  # a shared module is reachable under several paths
    for path, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(path)
    candidates = _chain(_runs(model, sizes))
    scores = {id(c[0][1]): _score(c, sizes) for c in candidates}
    scored = sorted(
        # A stack needs evidence of repetition: blocks with identical parameter shapes nearby.
        (c for c in candidates if scores[id(c[0][1])] > 0),
        # Most shape-shared parameters first; on a tie the outer stack (shorter paths) wins.
        key=lambda c: (-scores[id(c[0][1])], c[0][0].count("."), order[id(c[0][1])]),
    )
    taken: set[str] = set()  # accepted block paths
    taken_prefixes: set[str] = set()  # every ancestor path of an accepted block
    chosen: list[list[tuple[str, nn.Module]]] = []
    for cand in scored:
        if any(_conflicts(a, taken, taken_prefixes) for _, m in cand for a in aliases[id(m)]):
            continue
        chosen.append(cand)
        for _, m in cand:
            for a in aliases[id(m)]:
                taken.add(a)
                taken_prefixes.update(_ancestors(a))
    chosen.sort(key=lambda c: order[id(c[0][1])])
    return _named([Stack("", tuple(p for p, _ in c), tuple(m for _, m in c)) for c in chosen])


def _runs(model: nn.Module, sizes: dict[int, int]) -> Iterator[tuple[Hashable, str, list[tuple[str, nn.Module]]]]:
    """Yield ``(kind, parent_path, members)`` for every run of >= 2 same-kind children with parameters."""
    for ppath, parent in model.named_modules():
        run: list[tuple[str, nn.Module]] = []
        run_kind: Hashable = None
        for name, child in parent.named_children():
            path = f"{ppath}.{name}" if ppath else name
            # ModuleList/ModuleDict have no forward: they hold blocks but are never blocks themselves.
            callable_block = not isinstance(child, (nn.ModuleList, nn.ModuleDict))
            kind = _kind(child) if sizes[id(child)] and callable_block else None
            if kind is not None and kind == run_kind:
                run.append((path, child))
                continue
            if len(run) >= 2:
                yield run_kind, ppath, run
            run, run_kind = ([(path, child)], kind) if kind is not None else ([], None)
        if len(run) >= 2:
            yield run_kind, ppath, run


def _chain(runs: Iterator[tuple[Hashable, str, list[tuple[str, nn.Module]]]]) -> list[list[tuple[str, nn.Module]]]:
    chains: dict[tuple[Hashable, str], list[tuple[str, nn.Module]]] = {}
    for kind, ppath, members in runs:
        chains.setdefault((kind, template(ppath)), []).extend(members)
    return list(chains.values())


def _kind(module: nn.Module) -> Hashable:
    if type(module) in _GENERIC_CONTAINERS:  # generic containers are told apart by what they hold
        return (type(module), tuple(_kind(c) for c in module.children()))
    return type(module)


def _sizes(model: nn.Module) -> dict[int, int]:
    """Parameter count of every module (shared submodules count under each parent)."""
    sizes: dict[int, int] = {}

    def visit(m: nn.Module) -> int:
        if id(m) not in sizes:
            own = sum(p.numel() for p in m._parameters.values() if p is not None)
            sizes[id(m)] = own + sum(visit(c) for c in m.children())
        return sizes[id(m)]

    visit(model)
    return sizes


def _signature(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def _score(cand: list[tuple[str, nn.Module]], sizes: dict[int, int]) -> int:
    """Parameters of the blocks whose shapes repeat at distance 1 or 2 (period-2 stacks alternate kinds)."""
    sigs = [_signature(m) for _, m in cand]
    n = len(cand)
    total = 0
    for i, (_, m) in enumerate(cand):
        if any(0 <= j < n and sigs[j] == sigs[i] for j in (i - 2, i - 1, i + 1, i + 2)):
            total += sizes[id(m)]
    return total


def _ancestors(path: str) -> Iterator[str]:
    parts = path.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _conflicts(path: str, taken: set[str], taken_prefixes: set[str]) -> bool:
    return path in taken or path in taken_prefixes or any(a in taken for a in _ancestors(path))


def _named(stacks: list[Stack]) -> list[Stack]:
    names = [template(s.paths[0]) for s in stacks]
    out = []
    for s, name in zip(stacks, names):
        if names.count(name) > 1:  # two stacks share a template: name them by their extent
            name = f"{name}[{s.paths[0]}..{s.paths[-1]}]"
        out.append(Stack(name, s.paths, s.modules))
    return out


def _order_by_graph(stacks: list[Stack], graph: BlockGraph, notes: list[str]) -> list[Stack]:
    out: list[Stack] = []
    for stack in stacks:
        seen = [(p, m) for p, m in zip(stack.paths, stack.modules) if p in graph.order]
        if not seen:  # the graph shows none of them (called through a path FX does not see): keep as is
            notes.append(f"stack {stack.name!r}: no block appears in the {graph.route} graph; registration order kept")
            out.append(stack)
            continue
        missing = [p for p in stack.paths if p not in graph.order]
        if missing:
            notes.append(f"stack {stack.name!r}: {', '.join(missing)} never run in the traced forward; left out")
        seen.sort(key=lambda pm: graph.order[pm[0]])
        segments: list[list[tuple[str, nn.Module]]] = [[seen[0]]]
        for prev, cur in zip(seen, seen[1:]):
            if graph.feeds(prev[0], cur[0]):
                segments[-1].append(cur)
            else:
                notes.append(
                    f"stack {stack.name!r} split between {prev[0]} and {cur[0]}: the first does not feed the second"
                )
                segments.append([cur])
        for k, seg in enumerate(segments):
            name = stack.name if len(segments) == 1 else f"{stack.name}#{k}"
            out.append(Stack(name, tuple(p for p, _ in seg), tuple(m for _, m in seg)))
    return out
