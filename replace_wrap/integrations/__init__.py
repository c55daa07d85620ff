"""What converted models need from the libraries they train with.

- :mod:`.optim`: rebinding optimizers across ``convert`` and ``merge``.
- :mod:`.fsdp`: sharding converted models with FSDP2.
- :mod:`.peft`: PEFT adapters (LoRA, ...) on a converted model.
- :mod:`.hf`: a ``transformers.TrainerCallback`` that logs the scalars.
- :mod:`.lightning`: a Lightning ``Callback`` that logs the scalars.
"""
