"""Docs build machinery: an mkdocs hook and a griffe extension (loaded by docs/mkdocs.yml).

1. The pages are docs/*.md, next to ``mkdocs.yml`` (the repository's top level is fixed). mkdocs refuses a
   ``docs_dir`` that holds its own config file, because the config would be copied into the site; here the
   config and this file are left out by ``exclude_docs``, so ``on_config`` points ``docs_dir`` at this folder
   once mkdocs has validated the rest.
2. The package's docstrings head their runnable examples ``Example:`` (Google style allows it). griffe only
   renders an ``Examples:`` section as code, and would otherwise turn ``>>>`` lines into nested quotes;
   :class:`ExampleSections` renames the heading when griffe reads a docstring.
"""

from __future__ import annotations

import os
import re

from griffe import Extension, Object

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def on_config(config):
    here = os.path.dirname(os.path.abspath(config.config_file_path))
    site = os.path.abspath(config.site_dir)
    if os.path.commonpath([site, here]) == here:  # the check mkdocs can no longer make for us
        raise ValueError(f"site_dir {site!r} must be outside the docs folder {here!r}")
    config.docs_dir = here
    return config


class ExampleSections(Extension):
    """Read a docstring's ``Example:`` section as griffe's ``Examples:`` (code, not prose)."""

    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
