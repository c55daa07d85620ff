"""Stage 1, analyse: find the stacks of repeated blocks and their execution order (pure; changes nothing).

- :mod:`.discovery`: structural discovery of stacks, ordered and split by a captured graph.
- :mod:`.capture`: graph capture (torch.fx with a leaf-module registry, then torch.export).
- :mod:`.wrappers`: wrappers whose child state dicts do not name (activation checkpointing), and the one map
  from module paths to state-dict keys.
"""
