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

from .api import convert, merge, plan, report, revert
from .budget import Budget
from .config import ReplaceConfig
from .distributed import fsdp_units, shard
from .errors import (
    AlreadyConvertedError,
    AnalysisError,
    BudgetError,
    ConfigError,
    MergeError,
    NotConvertedError,
    NothingToReplaceError,
    PolicyError,
    RegistryError,
    ReplaceWrapError,
    StateDictError,
    TracingError,
)
from .graph import Stack
from .hooks import ReplacementSite
from .leaves import register_leaf_handler
from .persistence import ConversionRecord, RecordedBlock, from_pretrained, load, load_state_dict, save
from .policy import AllOf, AnyOf, Every, Filter, Indices, Paths, Pattern, Policy
from .report import BlockReport, ConversionReport
from .rules import IntegrationRule, list_rules, register_rule
from .similarity import Similarity
from .tracing import register_leaf_module

__version__ = "0.1.0.dev0"

__all__ = [
    "AllOf",
    "AlreadyConvertedError",
    "AnalysisError",
    "AnyOf",
    "BlockReport",
    "Budget",
    "BudgetError",
    "ConfigError",
    "ConversionRecord",
    "ConversionReport",
    "Every",
    "Filter",
    "Indices",
    "IntegrationRule",
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
    "TracingError",
    "__version__",
    "convert",
    "from_pretrained",
    "fsdp_units",
    "list_rules",
    "load",
    "load_state_dict",
    "merge",
    "plan",
    "register_leaf_handler",
    "register_leaf_module",
    "register_rule",
    "report",
    "revert",
    "save",
    "shard",
]
