"""What converted models need from the libraries they train with.

- :mod:`.optim`: rebinding optimizers across ``convert`` and ``merge``.
- :mod:`.fsdp`: sharding converted models with FSDP2.
"""
