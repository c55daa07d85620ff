"""Stage 2, select: which blocks of each stack to replace.

- :mod:`.policies`: the :class:`~replace_wrap.Policy` protocol and the built-in per-stack policies.
- :mod:`.budget`, :mod:`.similarity`: whole-model policies over the plan's candidates.
- :mod:`._solvers`, :mod:`._fits`: the exact dynamic programs and least-squares scores they use.
"""
