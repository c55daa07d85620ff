"""The runnable examples in replace_wrap's docstrings run and print what they say.

Run in a subprocess: some examples register things (a rule) in process-wide registries.
"""

from __future__ import annotations

import re

from conftest import run_python


def test_docstring_examples_run():
    proc = run_python(
        "-m",
        "pytest",
        "--doctest-modules",
        "replace_wrap",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-W",
        "ignore::DeprecationWarning",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    assert passed >= 10, proc.stdout  # the examples were collected, not silently skipped

