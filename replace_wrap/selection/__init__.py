"""Stage 2, select: which blocks of each stack to replace.

- :mod:`.policies`: the :class:`~replace_wrap.Policy` protocol and the built-in per-stack policies.
- :mod:`.budget`, :mod:`.similarity`: whole-model policies over the plan's candidates.
- :mod:`._solvers`: the exact dynamic programs they use (the least-squares scores are
  :mod:`replace_wrap.surgery.fits`, shared with the fitted initial scalars).
"""
