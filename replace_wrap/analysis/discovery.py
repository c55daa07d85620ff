"""Block discovery: find the stacks of repeated blocks in a model, and their execution order.

Pure analysis: nothing here changes the model or knows about policies.

1. **Runs.** Under every module, consecutive children of the same kind (class; for plain
   ``Sequential``/``ModuleList``/``ModuleDict`` the class plus the kinds of their children) that own
   parameters form a run; in a generic container, parameter-free items between them (activations,
   pooling) do not break it. Blocks registered as plain attributes (``s1.b1``, ``s1.b2``) are children too.
   Under a module of its own class, only *blocks* (two or more weight matrices or kernels) count: the
   ``qkv``/``proj`` or ``fc1``/``fc2`` layers of one block are not a stack. A lone block counts where it is
   an item (of a container, or a numbered attribute): CNN stages of one block each.
2. **Stacks.** Runs of the same kind whose parents' paths differ only in numbers (``stages.0.blocks`` and
   ``stages.1.blocks``, ``layer1`` and ``layer2``) are chained, in registration order, into one candidate
   stack: the blocks of a CNN run across its stages.
3. **Choice.** A candidate needs evidence of repetition: two blocks at distance 1 or 2 (period-2 stacks
   alternate two kinds of block) with the same parameter names and ranks (*alike*; shape-adapting fusion
   maps the sizes) or also the same shapes (*exact*). Candidates that nest (the LayerNorms inside
   transformer blocks chain into a stack too) or share modules conflict; the first in this order wins:
   stacks of at least 3 blocks; stacks of blocks before stacks of single layers; exact stacks by
   shape-shared parameters (transformer blocks beat their LayerNorms, Swin's blocks beat its stages); alike
   stacks, the longest first (DenseNet's layers beat its dense blocks); on a tie the inner stack.
4. **Order.** If the model can be traced (torch.fx, or torch.export with example inputs), the graph reorders
   each stack by execution, drops blocks that never run, and splits a stack where one block does not feed
   the next (parallel branches). A candidate that the graph cuts into pieces too short to replace in was
   the wrong guess: it is set aside and the next candidate takes its place (a few rounds at most).
   Otherwise registration order stands, and the route says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from torch import nn

from ..errors import TracingError
from .capture import BlockGraph, export_block_graph, fx_block_graph, preserved_state
from .wrappers import unwrap

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
        refuted: set[str] = set()
        for attempt in range(_MAX_REFUTATIONS + 1):
            graph = _capture(model, stacks, example_inputs, notes)
            if graph is None:
                notes.append("using the structural walk: blocks in registration order")
                return Analysis("structural", stacks, notes)
            step_notes: list[str] = []
            ordered = [(s, _segments(s, graph, step_notes)) for s in stacks]
            # A candidate that the graph cuts into pieces too short to replace in (parallel branches that
            # look like a stack, such as two branch blocks per unit) was the wrong guess: try the next one.
            wrong = {s.paths[0] for s, segs in ordered if len(s) >= 3 and max(map(len, segs)) < 3}
            if not wrong or attempt == _MAX_REFUTATIONS:
                break
            for s, _ in ordered:
                if s.paths[0] in wrong:
                    notes.append(f"stack {s.name!r} set aside: the {graph.route} graph shows its blocks do not run one "
                                 "after another")
            refuted |= wrong
            retry = find_stacks(model, frozenset(refuted))
            if not retry:
                break
            stacks = retry
        notes.extend(step_notes)
        return Analysis(graph.route, [seg for _, segs in ordered for seg in segs], notes)


_MAX_REFUTATIONS = 3  # graph captures spent on replacing refuted candidates


def _capture(model: nn.Module, stacks: list[Stack], example_inputs: Any, notes: list[str]) -> BlockGraph | None:
    """The block graph by torch.fx, else torch.export with example inputs; ``None`` if neither works."""
    blocks = {p: m for s in stacks for p, m in zip(s.paths, s.modules)}
    try:
        return fx_block_graph(model, blocks)
    except TracingError as exc:
        if str(exc) not in notes:
            notes.append(str(exc))
    if example_inputs is not None:
        try:
            return export_block_graph(model, blocks, example_inputs)
        except TracingError as exc:
            if str(exc) not in notes:
                notes.append(str(exc))
    return None


def find_stacks(model: nn.Module, exclude: frozenset[str] = frozenset()) -> list[Stack]:
    """Structural discovery (steps 1-3 above), in registration order.

    Args:
        model: The model.
        exclude: First block paths of candidate stacks to leave out (candidates a graph refuted).
    """
    sizes = _sizes(model)
    order = {id(m): i for i, m in enumerate(model.modules())}
    aliases: dict[int, list[str]] = {}  # a shared module is reachable under several paths
    for path, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(path)
    candidates = [c for c in _chain(_runs(model, sizes)) if len(c) >= 2 and c[0][0] not in exclude]
    exact = {id(c[0][1]): _score(c, sizes, _signature) for c in candidates}
    alike = {id(c[0][1]): _score(c, sizes, _structure) for c in candidates}
    layers = {id(c[0][1]): not all(_is_block(m) for _, m in c) for c in candidates}

    def rank(c: list[tuple[str, nn.Module]]) -> tuple[Any, ...]:
        # First-match-wins order of the candidates, most convincing first:
        # 1. stacks of >= 3 blocks (a shorter one can never replace a block);
        # 2. stacks of blocks before stacks of single layers (a RegNet layer beats the convs inside it);
        # 3. stacks with exact repeats, most shape-shared parameters first (a transformer block beats its
        #    LayerNorms, Swin's blocks beat its stages);
        # 4. then stacks whose blocks only differ in shape (CNN stages of one block each), the longest first
        #    (finer blocks beat the stages that hold them), then the most alike parameters;
        # 5. on a tie the inner stack: the outer one only wraps it (a Sequential holding one block).
        k = id(c[0][1])
        tier_b = exact[k] == 0
        return (len(c) < 3, layers[k], tier_b, -len(c) if tier_b else -exact[k], -alike[k], -c[0][0].count("."),
                order[k])

    # A stack needs evidence of repetition: blocks with the same parameters nearby (alike: same names and
    # ranks; exact: same shapes too).
    scored = sorted((c for c in candidates if alike[id(c[0][1])] > 0), key=rank)
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
    """Yield ``(kind, parent_path, members)`` for every run of same-kind children with parameters.

    Runs of >= 2 anywhere, single blocks too where they are items (of a generic container, or numbered
    attributes such as ``s1.b1``), so that CNN stages of one block each chain into a stack. Under a module
    of its own class (not a generic container) only blocks count: its single layers (``qkv``/``proj``,
    ``fc1``/``fc2``, RepVGG's parallel 3x3/1x1 convs) are parts of one block, not a stack.
    """
    for ppath, parent in model.named_modules():
        run: list[tuple[str, nn.Module]] = []
        run_kind: Hashable = None
        first = ""  # the attribute name of the run's first member
        item_parent = type(parent) in _GENERIC_CONTAINERS
        for name, child in parent.named_children():
            # a block under activation checkpointing is the module the wrapper holds: its scalars then live
            # inside the wrapper, where the wrapper's load hook sends their state-dict keys (.wrappers)
            path, child = unwrap(f"{ppath}.{name}" if ppath else name, child)
            # ModuleList/ModuleDict have no forward: they hold blocks but are never blocks themselves
            # (a subclass with its own forward, like DenseNet's DenseBlock, can be a block).
            callable_block = type(child).forward is not nn.Module.forward
            if item_parent and not sizes[id(child)]:
                continue  # activations, pooling, dropout between the items of a Sequential: the run goes on (VGG)
            member = sizes[id(child)] and callable_block and (item_parent or _is_block(child))
            kind = _kind(child) if member else None
            if kind is not None and kind == run_kind:
                run.append((path, child))
                continue
            if len(run) >= 2 or (run and _lone_block(first, run[0][1], item_parent)):
                yield run_kind, ppath, run
            run, run_kind, first = ([(path, child)], kind, name) if kind is not None else ([], None, "")
        if len(run) >= 2 or (run and _lone_block(first, run[0][1], item_parent)):
            yield run_kind, ppath, run


def _is_block(module: nn.Module) -> bool:
    """A block of layers: at least two weight matrices or kernels (a conv+norm unit or a Linear is a layer)."""
    count = 0
    for p in module.parameters():
        count += p.dim() >= 2
        if count >= 2:
            return True
    return False


def _lone_block(name: str, module: nn.Module, item_parent: bool) -> bool:
    """Whether a child ``name`` without a same-kind sibling may still join a stack: an item, and a block."""
    return (item_parent or name[-1:].isdigit()) and _is_block(module)


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


def _structure(module: nn.Module) -> tuple[tuple[str, int], ...]:
    """Like :func:`_signature` without sizes: parameter names and ranks (shape-adapting fusion fills the rest)."""
    return tuple((n, p.dim()) for n, p in module.named_parameters())


def _score(cand: list[tuple[str, nn.Module]], sizes: dict[int, int], key: Callable[[nn.Module], Hashable]) -> int:
    """Parameters of the blocks whose ``key`` repeats at distance 1 or 2 (period-2 stacks alternate kinds)."""
    sigs = [key(m) for _, m in cand]
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


def _segments(stack: Stack, graph: BlockGraph, notes: list[str]) -> list[Stack]:
    """``stack`` in execution order, without blocks that never run, split where a block does not feed the next."""
    seen = [(p, m) for p, m in zip(stack.paths, stack.modules) if p in graph.order]
    if not seen:  # the graph shows none of them (called through a path FX does not see): keep as is
        notes.append(f"stack {stack.name!r}: no block appears in the {graph.route} graph; registration order kept")
        return [stack]
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
    return [
        Stack(stack.name if len(segments) == 1 else f"{stack.name}#{k}", tuple(p for p, _ in seg),
              tuple(m for _, m in seg))
        for k, seg in enumerate(segments)
    ]
