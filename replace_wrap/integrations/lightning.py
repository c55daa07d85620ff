"""A Lightning ``Callback`` that logs every replaced block's ``a, b`` to the Trainer's logger.

Imports ``lightning`` (``import replace_wrap`` does not import this module).

Example:
    >>> # trainer = lightning.Trainer(callbacks=[ScalarsCallback()], logger=CSVLogger("logs"))
    >>> # trainer.fit(module)   # module holds a converted model; logs replace_wrap/<block>/a, .../b
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ..observe import scalar_logs

__all__ = ["ScalarsCallback"]


class ScalarsCallback(Callback):
    """Log ``<prefix>/<block>/a`` and ``.../b`` of every replaced block after each training batch.

    Uses ``LightningModule.log_dict``, so whatever logger the Trainer has (TensorBoard, W&B, CSV, ...) gets
    them, at the Trainer's ``log_every_n_steps``. Block paths are those inside the ``LightningModule``
    (e.g. ``model.blocks.1``). The values are the same on every rank, so no synchronisation is asked for.

    Args:
        prefix: First part of every key.
    """

    def __init__(self, prefix: str = "replace_wrap"):
        self.prefix = prefix

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log_dict(scalar_logs(pl_module, self.prefix), on_step=True, on_epoch=False, logger=True)
