"""replace_wrap: Replacement Learning as a drop-in plugin for PyTorch models.

Some blocks of a repeated stack are *replaced*: their own weights are dropped, and each of their weight tensors
is synthesized on every forward as ``a * W_prev + b * W_next`` from the same tensor of the neighbouring blocks,
with two learnable scalars per replaced block.

Example:
    >>> import torch, replace_wrap
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)])
    >>> net = replace_wrap.convert(net, every=2)
    >>> net = replace_wrap.merge(net)  # a plain Sequential of Linear layers again
"""

from __future__ import annotations

from ._version import __version__
from .analysis.capture import register_leaf_module
from .analysis.discovery import Stack
from .api import convert, merge, plan, report, revert
from .config import ReplaceConfig
from .errors import (
    AlreadyConvertedError,
    AnalysisError,
    BudgetError,
    CompatibilityError,
    ConfigError,
    IntegrationError,
    MergeError,
    NotConvertedError,
    NothingToReplaceError,
    PolicyError,
    RegistryError,
    ReplaceWrapError,
    StateDictError,
    SynthesisMismatchError,
    TracingError,
)
from .integrations import peft as _peft  # noqa: F401  registers the attachment that guards PEFT-wrapped models
from .integrations.decay import param_groups
from .integrations.fsdp import fsdp_units, shard
from .integrations.fsdp_memory import FSDPMemory, fsdp_memory
from .integrations import hf_sharded as _hf_sharded  # noqa: F401  registers the Trainer's sharded-checkpoint check
from .io.checkpoint import from_pretrained, load, save
from .io.guard import load_state_dict
from .io import plain as _plain  # noqa: F401  registers the plain_state_dict attachment
from .io.record import ConversionRecord, RecordedBlock
from .observe import print_trainable_parameters, scalars
from .report import BlockReport, ConversionReport, LayerRoute
from .selection.budget import Budget
from .selection.policies import AllOf, AnyOf, Every, Filter, Indices, Paths, Pattern, Policy
from .selection.similarity import Similarity
from .surgery.site import ReplacementSite
from .synthesis.layer_kernels import register_layer_kernel
from .synthesis.rules import IntegrationRule, list_rules, register_rule
from . import _aliases  # noqa: E402,F401  the 0.1 module paths (replace_wrap.rules, ...), deprecated



def register_leaf_handler(*types: type, name: str | None = None, requires: tuple[str, ...] = ("weight",)):  # noqa: ANN201
    """Deprecated 0.1 name of :func:`register_layer_kernel`."""
    import warnings

    warnings.warn(
        "replace_wrap.register_leaf_handler is now replace_wrap.register_layer_kernel", DeprecationWarning, stacklevel=2
    )
    return register_layer_kernel(*types, name=name, requires=requires)


__all__ = [
    "AllOf",
    "AlreadyConvertedError",
    "AnalysisError",
    "AnyOf",
    "BlockReport",
    "Budget",
    "BudgetError",
    "CompatibilityError",
    "ConfigError",
    "ConversionRecord",
    "ConversionReport",
    "Every",
    "FSDPMemory",
    "Filter",
    "Indices",
    "IntegrationError",
    "IntegrationRule",
    "LayerRoute",
    "MergeError",
    "NotConvertedError",
    "NothingToReplaceError",
    "Paths",
    "Pattern",
    "Policy",
    "PolicyError",
    "RecordedBlock",
    "RegistryError",
    "ReplaceConfig",
    "ReplaceWrapError",
    "ReplacementSite",
    "Similarity",
    "Stack",
    "StateDictError",
    "SynthesisMismatchError",
    "TracingError",
    "__version__",
    "convert",
    "from_pretrained",
    "fsdp_memory",
    "fsdp_units",
    "list_rules",
    "load",
    "load_state_dict",
    "merge",
    "param_groups",
    "plan",
    "print_trainable_parameters",
    "register_layer_kernel",
    "register_leaf_module",
    "register_rule",
    "report",
    "revert",
    "save",
    "scalars",
    "shard",
]
