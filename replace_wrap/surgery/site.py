"""The replacement site: the learnable scalars of one replaced block, registered as ``block.replacement``."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import CompatibilityError
from ..integrations.fsdp_state import held_values
from ..synthesis.rules import get_rule, is_linear_mix
from .sources import refuse_script

__all__ = ["LIVE_SITES", "SITE_ATTR", "ReplacementSite"]

SITE_ATTR = "replacement"  # attribute under which a replaced block holds its ReplacementSite
# Every site alive in the process (built, copied or unpickled), so that an optimizer step can tell which
# parameters are replaced blocks' scalars (see replace_wrap.integrations.decay) without knowing the model.
LIVE_SITES: weakref.WeakSet[ReplacementSite] = weakref.WeakSet()


class ReplacementSite(nn.Module):
    """The learnable scalars of one replaced block.

    Registered on the block as ``block.replacement``; its parameters (``a`` and ``b`` for the linear rule) are
    the only learnable parameters of the site and stay fp32 whatever dtype the model is cast to.

    Args:
        rule: Name of the integration rule.
        n_sets: Number of scalar sets: 1 (``scalars="block"``) or the number of synthesized tensors.
        init: Initial ``(a, b)`` of every set (the config's ``init``).
        tensor_names: Paths of the synthesized tensors inside the block, in scalar-set order.
        detach: Detach the neighbours' tensors inside the synthesis (``neighbour_grad="detached"``).
        prev_path: Path of the previous block (for reports).
        next_path: Path of the next block (for reports).
        originals: Frozen copies of the replaced tensors (``keep_original=True``), kept as buffers.
        coefficients: Per-set initial ``(a, b)``, each of shape ``(n_sets,)``, overriding ``init`` (a policy's
            :meth:`~replace_wrap.Policy.initial_scalars`); mapped to the rule's parameters by
            :meth:`~replace_wrap.IntegrationRule.params_from_coefficients`.
        own: The block's own tensors at conversion, for rules that start their state from them.
        fast_path: Whether layer kernels may compute the block's layers (the config's ``fast_path``).
        ab_grad_sample: The layer kernels' scalar-gradient estimator (the config's ``ab_grad_sample``).
    """

    def __init__(
        self,
        rule: str,
        n_sets: int,
        init: tuple[float, float],
        tensor_names: tuple[str, ...],
        detach: bool,
        prev_path: str,
        next_path: str,
        originals: list[torch.Tensor] | None = None,
        coefficients: tuple[torch.Tensor, torch.Tensor] | None = None,
        own: Sequence[torch.Tensor] = (),
        fast_path: bool = True,
        ab_grad_sample: float | str | None = "auto",
    ):
        super().__init__()
        self.rule = rule
        self._rule = get_rule(rule)
        if coefficients is None:
            params = self._rule.init_params(n_sets, init)
        else:
            params = self._rule.params_from_coefficients(*coefficients)
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value.detach().to(torch.float32)))
        # what reset_parameters restores (model.to_empty() leaves the scalars uninitialized)
        self._initial = (tuple(init), None if coefficients is None else tuple(c.detach().cpu().clone() for c in coefficients))
        self.n_sets = n_sets
        self.tensor_names = tuple(tensor_names)
        self.detach = detach
        self.fast_path = fast_path
        self.ab_grad_sample = ab_grad_sample
        # Layer kernels compute with (a, b) directly; a rule with its own synthesis keeps the generic path.
        self.linear_mix = is_linear_mix(self._rule)
        self.prev_path, self.next_path = prev_path, next_path
        self.has_originals = originals is not None
        for i, t in enumerate(originals or []):
            self.register_buffer(f"original_{i}", t.detach().clone())
        for name, value in self._rule.init_buffers(self, list(own)).items():
            self.register_buffer(name, value)
        LIVE_SITES.add(self)

    def reset_parameters(self) -> None:
        """Set the scalars back to the values ``convert`` gave them, in place.

        The usual re-initialisation after ``model.to_empty(device=...)`` (a meta-device build, FSDP2's recipe)
        calls ``reset_parameters()`` on every module that has one; ``to_empty`` leaves the scalars as
        uninitialized memory, which would silently scale the replaced blocks' weights by garbage.

        Raises:
            CompatibilityError: If the rule keeps a state that starts from the replaced block's own tensors
                (``rule="ema"``'s shadows): re-initialisation cannot restore it; nothing is changed then.
        """
        state = [n for n in self._buffers if n not in self._non_persistent_buffers_set and not n.startswith("original_")]
        if state:
            raise CompatibilityError(
                f"cannot re-initialise the replaced block between {self.prev_path!r} and {self.next_path!r}: its "
                f"rule {self.rule!r} keeps a state ({', '.join(state[:3])}) that started from the block's own "
                "tensors at convert, which re-initialisation cannot restore. Load a checkpoint into the model "
                "instead (load_state_dict, replace_wrap.load), or initialise the plain model and convert it then."
            )
        init, coefficients = self.__dict__.get("_initial", ((0.5, 0.5), None))
        params = (self._rule.init_params(self.n_sets, init) if coefficients is None
                  else self._rule.params_from_coefficients(*coefficients))
        with torch.no_grad():
            for name, value in params.items():
                p = self._parameters[name]
                value = value.to(device=p.device, dtype=p.dtype)
                if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # an FSDP2 (DTensor) scalar
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, p.device_mesh, p.placements)
                p.copy_(value)  # in place: optimizers keep their parameters

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # copies and unpickled sites are sites too
        LIVE_SITES.add(self)

    def __prepare_scriptable__(self) -> ReplacementSite:
        """``torch.jit.script`` of a module holding the site: refused, typed (see :func:`.sources.refuse_script`)."""
        refuse_script("scalars, replacement.a/b", self)
        return self  # not reached

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Identity: a block that is an ``nn.Sequential`` calls every child, the site included."""
        return x

    def index_of(self, k: int) -> int:
        """Scalar set used by the ``k``-th synthesized tensor."""
        return k if self.n_sets > 1 else 0

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(a, b)``, each of shape ``(n_sets,)``."""
        return self._rule.coefficients(self)

    def synthesize(self, k: int, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
        """The ``k``-th synthesized tensor (``tensor_names[k]``) from the neighbours' current tensors."""
        if self.detach:
            prev, next = prev.detach(), next.detach()
        return self._rule.synthesize_tensor(self, k, prev, next)

    def _apply(self, fn: Any, recurse: bool = True) -> ReplacementSite:
        # The scalars stay fp32 when the model is cast (model.half(), .to(torch.bfloat16)): a bf16 scalar
        # cannot express small updates. Devices still follow; buffers (originals) follow the model's dtype.
        # So do their gradients: torch casts a parameter's .grad with it, and a bf16 gradient on an fp32 scalar
        # made the optimizer's next step fail inside torch (AdamW: "expected dtype float for `end`").
        fp32 = {
            n: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
            for n, p in self._parameters.items() if p is not None
        }
        super()._apply(fn, recurse)
        for n, p in self._parameters.items():
            if p is None:
                continue
            if p.dtype != torch.float32:
                p.data = fp32[n][0].to(p.device)
            grad = fp32[n][1]
            if p.grad is not None and grad is not None and p.grad.dtype != torch.float32:
                p.grad = grad.to(p.device)
        return self

    def extra_repr(self) -> str:
        # held values: NaN on meta (a meta or offloaded model prints), no collective for FSDP2 shards
        a, b = (held_values(t.detach()).float() for t in self.coefficients())
        ab = f"a={a.item():.4g}, b={b.item():.4g}" if a.numel() == 1 else f"a.mean={a.mean():.4g}, b.mean={b.mean():.4g}"
        return f"rule={self.rule!r}, tensors={len(self.tensor_names)}, {ab}, prev={self.prev_path!r}, next={self.next_path!r}"
