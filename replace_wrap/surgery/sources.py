"""What a replaced layer reads must be what its model holds: checks on a layer's sources.

A replaced layer synthesizes its tensors from the neighbour layers it was converted with
(:class:`~replace_wrap.synthesis.layer_kernels.TensorSource`). Three things can put those sources outside the
model that runs or saves the layer, and each would give another model without a word:

- a **deep copy** of part of a model (one block alone) holds private copies of the neighbours that no model
  trains (:func:`check_copy`, at the copy's first synthesis; also ``nn.DataParallel`` replicas);
- **module surgery** after ``convert`` (a block swapped in, layers quantized in place) leaves the replaced layer
  reading a module the model no longer holds, while its state dict names the new one (:func:`sources_outside`,
  which the state-dict check of :mod:`replace_wrap.io.guard` applies);
- **meta neighbours** under accelerate's offloading, or a model never loaded (:func:`check_meta`);
- a neighbour tensor **quantized in place** (torchao's ``quantize_`` assigns a tensor subclass, keeping the
  module) or **distributed by tensor parallelism** (``parallelize_module`` makes it a DTensor outside FSDP2)
  from which ``a * prev + b * next`` cannot be computed (:func:`check_subclass`, when a synthesis fails).
"""

from __future__ import annotations

import collections
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import CompatibilityError
from ..integrations.fsdp_state import is_managed
from ..synthesis.mixing import SOURCES_ATTR, TensorSource

__all__ = ["CHECK", "check_copy", "check_meta", "check_subclass", "copy_root", "refuse_script", "sources_outside"]

_ACCELERATE_HOOK = "_hf_hook"  # the attribute accelerate's add_hook_to_module sets on a hooked module


def check_meta(layer: nn.Module, src: TensorSource, p: torch.Tensor | None, n: torch.Tensor | None) -> None:
    """Refuse to synthesize from a neighbour tensor on the meta device unless the whole computation is on meta.

    A model wholly on meta (meta init, shape inference, FSDP's meta init) synthesizes meta tensors as usual.
    But accelerate's offloading (cpu_offload, disk_offload, a device_map with "disk" or offloaded "cpu"
    entries) keeps a module's weights on meta until that module's own forward loads them, and a replaced block
    reads its neighbours' weights outside their forward; a model built under init_empty_weights and never
    loaded has meta neighbours and real scalars. Both would end in a raw device error, or compute nothing real.
    """
    site = src.site
    hooked = any(m is not None and hasattr(m, _ACCELERATE_HOOK) for m in (src.prev, src.next, site, layer))
    if not hooked and all(t.is_meta for t in (*(t for t in (p, n) if t is not None), *site.parameters())):
        return
    rel = site.tensor_names[src.k]
    side = site.prev_path if p is not None and p.is_meta else site.next_path
    where = (
        f"this replaced {type(layer).__name__} (a layer of the block between {site.prev_path!r} and "
        f"{site.next_path!r}) synthesizes {rel!r} from {side}.{rel}, which is on the meta device"
    )
    if hooked:
        raise CompatibilityError(
            f"{where}: offloaded by accelerate, whose hooks keep a module's weights on meta until that module's "
            "own forward, while a replaced block reads its neighbours' weights outside their forward. A converted "
            "model cannot be offloaded. Offload a plain model: replace_wrap.merge(model) first, or load the "
            "checkpoint with the plain loader (ModelClass.from_pretrained(directory, device_map=...): every "
            "checkpoint of a converted model is a plain one that predicts exactly the same); or keep the model "
            "on real devices (no 'disk' entries, no cpu offload)."
        )
    raise CompatibilityError(
        f"{where} while the other neighbour or the block's scalars are not: the model's weights were never "
        "(wholly) loaded (init_empty_weights "
        "or a meta-device build, then convert), or accelerate offloaded them. Load the weights before using the "
        "model: model.to_empty(device=...) then load_state_dict, or replace_wrap.load / replace_wrap.from_pretrained; "
        "to load with accelerate (load_checkpoint_and_dispatch, offloading), load the checkpoint into the "
        "unconverted model instead (every checkpoint of a converted model is a plain one) or merge first."
    )


def refuse_script(what: str, site: Any) -> None:
    """``__prepare_scriptable__`` of a replaced layer and of a site: ``torch.jit.script`` calls it on every module
    before compiling anything, so it refuses here, typed and with the model unchanged, instead of failing inside
    the compiler on the synthesizing properties (or the kernels' ``*args`` forward) with a raw RuntimeError."""
    raise CompatibilityError(
        f"torch.jit.script cannot compile a converted model: the replaced block between {site.prev_path!r} and "
        f"{site.next_path!r} synthesizes its tensors in Python on every read (here: its {what}), which "
        "TorchScript cannot compile. Script the plain model: replace_wrap.merge(model) first (it computes exactly "
        "the same); or capture the converted model with torch.jit.trace, torch.export or torch.compile, which "
        "record the synthesis."
    )


def check_subclass(layer: nn.Module, error: Exception) -> None:
    """After ``layer``'s synthesis (or kernel) raised ``error``: refuse with the fix when a neighbour tensor it
    reads is now of a tensor subclass from outside torch (torchao's ``quantize_`` assigns one, in place, to a
    layer it quantizes; the subclass implements the ops of its own linear, not ``a * prev + b * next``). Called
    only on the failure path, so nothing is checked while the synthesis works; otherwise the caller re-raises."""
    if isinstance(error, CompatibilityError):  # already said (a property read inside the layer's forward)
        return
    for name, src in layer.__dict__.get(SOURCES_ATTR, {}).items():
        site = src.site
        for side, leaf in ((site.prev_path, src.prev), (site.next_path, src.next)):
            t = None if leaf is None else getattr(leaf, name, None)
            rel = site.tensor_names[src.k]
            if _is_dtensor(t) and not is_managed(leaf):
                raise CompatibilityError(
                    f"this replaced {type(layer).__name__} (a layer of the block between {site.prev_path!r} and "
                    f"{site.next_path!r}) synthesizes {rel!r} from {side}.{rel}, which is a DTensor outside "
                    "FSDP2 (tensor parallelism: parallelize_module or distribute_module after convert). A "
                    "replaced block synthesizes from plain or FSDP2-sharded neighbours only: apply tensor "
                    "parallelism to the merged model (replace_wrap.merge(model) first), or shard the converted "
                    "model with FSDP2 alone (replace_wrap.shard). parallelize_module changed the neighbour layers "
                    "in place: build or load the model again."
                ) from error
            # torch's other subclasses (FakeTensor, FSDP2's DTensors, ...) are no quantization: their errors stay
            if t is None or type(t).__module__.split(".")[0] == "torch":
                continue
            raise CompatibilityError(
                f"this replaced {type(layer).__name__} (a layer of the block between {site.prev_path!r} and "
                f"{site.next_path!r}) synthesizes {rel!r} from {side}.{rel}, which is now a {type(t).__name__} (a "
                "tensor subclass: quantized in place after convert, e.g. by torchao's quantize_), and "
                "a * prev + b * next cannot be computed from it. A converted model cannot be quantized: "
                "quantize the merged model (replace_wrap.merge(model), then quantize). This model's neighbour "
                "layers were already changed in place: load it again (replace_wrap.load, or the plain "
                "checkpoint), merge, then quantize."
            ) from error


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has none
        return False
    return isinstance(t, DTensor)


CHECK = "_rw_check_copy"  # set on copies and replicas: what to check before the first synthesis


class CopyRoot:
    """The outermost object of one deep copy, shared by all of the copy's replaced layers: what it holds is
    walked once, at the first check, not once per replaced layer (a holder may hold much more than the model).

    The outermost object is known only once the copy is done: ``copy.deepcopy`` appends each original to the
    memo's keep-alive list (``memo[id(memo)]``) when its copy is complete, so the outermost comes last. The
    memo's first entry is the first object *started* that memoizes early (a module, a dict), not the outermost:
    in ``deepcopy((config, model))`` that is the config, whose walk holds no neighbour."""

    __slots__ = ("_memo", "_held")

    def __init__(self, memo: dict[int, Any]):
        self._memo: dict[int, Any] | None = memo
        self._held: tuple[set[int], set[int]] | None = None

    def _root(self) -> Any:
        memo, self._memo = self._memo, None  # read once: the memo (originals and copies) is not kept
        assert memo is not None
        originals = memo.get(id(memo))
        outermost = originals[-1] if originals else None
        if outermost is not None and id(outermost) in memo:
            return memo[id(outermost)]
        return memo[next(iter(memo))]  # no keep-alive list (a memo filled by other means): the first entry

    def held(self) -> tuple[set[int], set[int]]:
        """Ids of the modules and of their parameters inside the copy."""
        if self._held is None:
            modules = list(_modules_of(self._root()))
            self._held = ({id(m) for m in modules}, {id(p) for m in modules for p in m.parameters(recurse=False)})
        return self._held


_COPY_KEY = object()  # a deep copy's memo holds its CopyRoot under id(_COPY_KEY): no copied object has that id


def copy_root(memo: dict[int, Any]) -> CopyRoot:
    """The :class:`CopyRoot` of the deep copy that ``memo`` belongs to (made at its first replaced layer)."""
    found = memo.get(id(_COPY_KEY))
    if found is None:
        found = memo[id(_COPY_KEY)] = CopyRoot(memo)  # its root is read at the first check, the copy done
    return found


def check_copy(layer: nn.Module) -> None:
    """Before the first synthesis of a deep copy (or a DataParallel replica): refuse one that does not hold what
    it synthesizes from (see ``swap._CopyProbe``, which marks copies with :data:`CHECK`)."""
    if layer.__dict__.get("_is_replica", False):  # set by nn.Module._replicate_for_data_parallel
        raise CompatibilityError(
            "nn.DataParallel cannot run a converted model: its replicas would read the replaced blocks' "
            "neighbours on the first device. Use DistributedDataParallel (one process per device), or "
            "replace_wrap.merge(model) first."
        )
    root = layer.__dict__.pop(CHECK, None)
    if root is None:
        return
    modules, params = root.held()
    missing = sources_outside(layer, modules, params)
    if missing:
        layer.__dict__[CHECK] = root  # every later use fails the same way
        site = next(iter(layer.__dict__[SOURCES_ATTR].values())).site
        raise CompatibilityError(
            f"this replaced {type(layer).__name__} (a layer of the block between {site.prev_path!r} and "
            f"{site.next_path!r}) was deep-copied without its neighbour block(s) {missing}, or module surgery "
            "on the copy has since removed or swapped the neighbour layers it synthesizes from: the copy would "
            "compute with private copies of them that no model trains. Copy the whole model (or a module "
            "holding the replaced block and both neighbours), or copy replace_wrap.merge(copy of the model). "
            "Tools that copy a model and swap or fuse its layers (torch.ao.quantization.quantize_dynamic, "
            "timm's reparameterize_model, module surgery) need the plain model: merge first."
        )


def sources_outside(layer: nn.Module, modules: set[int], tensors: set[int]) -> list[str]:
    """What ``layer`` synthesizes from that a model does not hold: the paths of the neighbour blocks (as recorded
    at conversion; ``"replacement"`` for the scalars) some of whose layers or tensors are missing from ``modules``
    and ``tensors`` (ids of the model's modules and parameters).

    A side counts as held when its layer is one of the modules (a parametrized layer's tensor is computed on
    access, so no parameter of the model is it) or its tensor one of the parameters (a GraphModule holds the
    tensors a traced model read as its own parameters, not their modules).
    """
    missing: list[str] = []
    for name, src in layer.__dict__.get(SOURCES_ATTR, {}).items():
        sides = ((src.site.prev_path, src.prev), (src.site.next_path, src.next))
        for path, leaf in sides:
            if leaf is not None and id(leaf) not in modules and id(getattr(leaf, name)) not in tensors:
                missing.append(path)
        if id(src.site) not in modules and any(id(p) not in tensors for p in src.site.parameters()):
            missing.append("replacement")
    return list(dict.fromkeys(missing))  # each path once, in order


# What a holder's attribute walk does not enter: values, tensors, classes, and Python modules (whose
# attributes are a library's globals: holding ``torch`` must not make the walk visit the interpreter).
_NOT_HOLDERS = (str, bytes, int, float, complex, torch.Tensor, type, types.ModuleType, types.FunctionType)
# A module's own attributes that the walk does not enter: torch's machinery (parameters, buffers and children,
# which the walk reaches otherwise, and hooks), and replace_wrap's (a replaced layer's sources name the
# neighbours it reads: entering them would find the neighbours in any copy, and the check would pass a block
# copied alone).
_MODULE_MACHINERY = frozenset(nn.Module().__dict__)
_OWN_PREFIXES = ("_rw_", "_replace_wrap")


def _modules_of(root: Any) -> Iterator[nn.Module]:
    """Every module inside what a deep copy started from: a module, a container of modules, or any object that
    holds them in its attributes (a pipeline, a dataclass of training state, a namespace, a module's plain
    attribute such as ``self.models = [model]``), at any depth. Only the copy is walked: a deep copy has
    already visited each object the walk visits."""
    todo, seen = [root], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None or isinstance(obj, _NOT_HOLDERS):
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            yield obj
            todo.extend(obj._modules.values())
            todo.extend(v for k, v in obj.__dict__.items()
                        if k not in _MODULE_MACHINERY and not k.startswith(_OWN_PREFIXES))
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        else:
            try:  # an exotic object (a proxy whose attribute access raises) holds nothing we can see
                todo.extend(getattr(obj, "__dict__", {}).values())
                for cls in type(obj).__mro__:  # every class's own slots: a subclass lists only its new ones
                    slots = cls.__dict__.get("__slots__", ())
                    todo.extend(getattr(obj, s, None) for s in ([slots] if isinstance(slots, str) else slots))
            except Exception:  # noqa: BLE001 - see above
                continue
