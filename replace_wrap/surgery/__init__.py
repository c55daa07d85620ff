"""Stage 3, rewrite: plan the conversion, rewrite the model, and undo it.

- :mod:`.plan`: the single owner of matching, scalar-set counts and parameter accounting.
- :mod:`.fits`: least-squares fits of a block to its neighbours (fitted initial scalars, redundancy scores).
- :mod:`.matching`: which tensor of a block is synthesized from which neighbour tensor.
- :mod:`.site`: the :class:`~replace_wrap.ReplacementSite` holding a replaced block's scalars.
- :mod:`.swap`: the class swap that makes a layer's tensors synthesized properties.
- :mod:`.apply`: applying a plan atomically, and restoring blocks (merge, revert).
- :mod:`.notices`: what ``convert`` logs and warns about the conversion it made.
- :mod:`.attachments`: what rides along a converted model (report, guard, config record).
"""
