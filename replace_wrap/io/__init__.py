"""Checkpoints of converted models.

- :mod:`.record`: the :class:`~replace_wrap.ConversionRecord` saved next to the weights.
- :mod:`.guard`: the state-dict guard and the Hugging Face config record (attachments of a conversion).
- :mod:`.plain`: the synthesized values written into state dicts, so checkpoints also load plainly.
- :mod:`.verify`: those values compared, on load, with what the checkpoint's neighbours and scalars synthesize.
- :mod:`.checkpoint`: ``save`` / ``load`` / ``from_pretrained``.
"""
