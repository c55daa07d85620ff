"""An unchanged transformers.Trainer trains a converted ViT, saves it, and the checkpoint reloads exactly.

Runs examples/hf_vit_trainer.py (the documented example) with small-data flags.
"""

from __future__ import annotations

import json

import pytest

from conftest import TOL, load_example


def _example():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    return load_example("hf_vit_trainer")


def test_trainer_trains_saves_and_reloads_converted_vit(tmp_path):
    example = _example()
    result = example.main(
        ["--steps", "40", "--depth", "3", "--width", "32", "--batch-size", "32", "--lr", "3e-3",
         "--output-dir", str(tmp_path)]
    )
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.3, result  # the loss falls
    assert result["train_losses"][-1] < result["train_losses"][0]
    assert result["accuracy"] > 0.2  # chance is 0.1
    # trainer.save_model() wrote the conversion record into config.json ...
    record = json.loads((tmp_path / "converted" / "config.json").read_text())["replace_wrap"]
    assert [b["path"] for b in record["blocks"]] == ["vit.layers.1"]
    # ... so replace_wrap.from_pretrained rebuilds a model that predicts bit for bit the same
    assert result["reloaded_identical"] is True
    # and the merged model saved as a plain checkpoint predicts as the converted one
    assert "replace_wrap" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert result["merged_max_abs_diff"] <= TOL["merge"]
