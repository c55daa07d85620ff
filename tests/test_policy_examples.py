"""The policy/rule examples and documentation snippets run (on small data), as the docs show them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the examples pin one thread



def test_similarity_vs_every_small(examples_path, capsys):
    import similarity_vs_every

    result = similarity_vs_every.main(["--small"])
    every, similarity = result["Every(2)"], result["Similarity(every=2)"]
    assert len(every["replaced"]) == len(similarity["replaced"]) == 2
    assert every["trainable"] == similarity["trainable"] < every["trainable_before"]
    for row in (every, similarity):
        for phase in ("after_convert", "after_finetune"):
            assert math.isfinite(row[phase]["loss"]) and 0.0 <= row[phase]["acc"] <= 1.0
    assert all(ab != [0.5, 0.5] for ab in similarity["scalars"].values())  # started from the fit
    out = capsys.readouterr().out
    assert "| `Similarity(every=2)` |" in out and "loss after convert" in out


def test_learned_selection_small(examples_path, capsys):
    import learned_selection

    (result,) = learned_selection.main(["--small", "--seeds", "0"])
    assert len(result["gates"]) == 3 and all(0.0 < g < 1.0 for g in result["gates"])
    sel = result["selection"]
    assert len(sel) == 2 and all(j - i > 1 for i, j in zip(sel, sel[1:]))
    assert result["learned"]["replaced"] == sel
    assert result["learned"]["trainable"] == result["Every(2)"]["trainable"]
    # gates of blocks 1..4: the two highest (blocks 2 and 3) are adjacent, so 2 and 4 (cost 1.0 < 1.1 for 1, 3)
    assert learned_selection.select([0.1, 0.9, 0.8, 0.1], 2) == [2, 4]
    assert learned_selection.select([0.9, 0.2, 0.3, 0.95], 2) == [1, 4]


@pytest.mark.parametrize("page", ["policies.md", "rules.md"])
def test_doc_snippets_run(page, rule_registry, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/{page}[{i}]", "exec"), {"__name__": f"doc_{i}"})
    assert "Traceback" not in capsys.readouterr().out
