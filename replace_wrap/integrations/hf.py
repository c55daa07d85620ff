"""A ``transformers.TrainerCallback`` that logs every replaced block's ``a, b`` through the Trainer's loggers.

Imports ``transformers`` (``import replace_wrap`` does not import this module).

Example:
    >>> # trainer = Trainer(model=replace_wrap.convert(model, every=2), args=args, train_dataset=train)
    >>> # trainer.add_callback(ScalarsCallback(trainer))
    >>> # trainer.train()   # logs replace_wrap/<block>/a and .../b at every logging step
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from ..observe import scalar_logs

__all__ = ["ScalarsCallback"]


class ScalarsCallback(TrainerCallback):
    """Log ``<prefix>/<block>/a`` and ``.../b`` of every replaced block each time the Trainer logs.

    The values go through ``trainer.log``, so every logger the Trainer reports to (TensorBoard, W&B, MLflow,
    ``trainer.state.log_history``, the console) receives them, at the same step as the loss. Pass the
    trainer (``trainer.add_callback(ScalarsCallback(trainer))``): the Trainer calls its reporting callbacks
    before the ones you add, so without it the values can only be added to the entry that
    ``log_history`` and the console print, and the callback warns once if the Trainer reports elsewhere.

    Args:
        trainer: The ``transformers.Trainer`` (recommended).
        prefix: First part of every key.
    """

    def __init__(self, trainer: Any = None, prefix: str = "replace_wrap"):
        self.trainer = trainer
        self.prefix = prefix
        self._last_step = -1
        self._warned = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None, **kwargs: Any) -> None:
        if logs is None or model is None or any(k.startswith(f"{self.prefix}/") for k in logs):
            return  # our own trainer.log call coming back, or nothing to read
        if state.global_step == self._last_step:
            return  # the evaluation metrics of a step whose scalars are logged already
        self._last_step = state.global_step
        values = scalar_logs(model, self.prefix)
        if self.trainer is not None:
            self.trainer.log(values)
            return
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)
        if not self._warned and [r for r in (getattr(args, "report_to", None) or []) if r != "none"]:
            self._warned = True
            warnings.warn(
                f"ScalarsCallback without the trainer: the scalars reach log_history and the console, not "
                f"{args.report_to} (the Trainer calls those first). Use trainer.add_callback(ScalarsCallback(trainer)).",
                stacklevel=2,
            )
