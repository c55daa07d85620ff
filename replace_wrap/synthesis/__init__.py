"""How a replaced tensor is synthesized from its neighbours' (pure tensor maths; knows no model).

- :mod:`.maths`: ``mix`` (``a * prev + b * next``) and the closed-form least-squares fit.
- :mod:`.rules`: integration rules (``linear``, ``convex``, ``ema``) and their registry.
- :mod:`.adapt`: shape adapters (slice / zero-pad) for neighbours of another shape.
- :mod:`.kernels`: linear and convolution with a synthesized weight and a lean backward.
- :mod:`.layer_kernels`: the registry that gives replaced layers of a type their fast kernel.
"""
