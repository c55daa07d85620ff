"""Where replaced blocks' scalars start: ``init=(a, b)``, ``init="fit"`` (least squares to the neighbours), ``"auto"``.

The oracles are independent of the library's fit (``replace_wrap.synthesis.maths.fit_coefficients``): weights
built as exact mixes, ``torch.linalg.lstsq`` on the flattened tensors, and the normal equations of the
synthesis the converted model actually runs.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import replace_wrap
from replace_wrap import ConfigError, ReplaceConfig
from toys import ConvNet, ResidualMLP, StagedCNN


def _own(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.named_parameters()}


def _tensor(module: torch.nn.Module, path: str) -> torch.Tensor:
    """The tensor at ``path`` as the module's forward reads it (a synthesized one is not a Parameter)."""
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _lstsq(target: list[torch.Tensor], prev: list[torch.Tensor], nxt: list[torch.Tensor]) -> tuple[float, float]:
    """min ||a p + b n - t|| over the concatenated tensors, by LAPACK on a (numel, 2) float64 system."""
    flat = [torch.cat([x.double().reshape(-1) for x in xs]) for xs in (prev, nxt, target)]
    sol = torch.linalg.lstsq(torch.stack(flat[:2], dim=1), flat[2].unsqueeze(1)).solution
    return float(sol[0]), float(sol[1])


def test_fit_recovers_exact_mixes_and_the_converted_model_computes_what_the_original_did():
    torch.manual_seed(0)
    model = ResidualMLP(depth=5).eval()
    blocks = model.blocks
    half = copy.deepcopy(model)
    with torch.no_grad():
        for i, (a, b) in {1: (0.3, 0.8), 3: (-0.2, 1.1)}.items():
            for name, p in blocks[i].named_parameters():
                p.copy_(a * blocks[i - 1].get_parameter(name) + b * blocks[i + 1].get_parameter(name))
    half.load_state_dict(model.state_dict())
    x = ResidualMLP.example(6)
    with torch.no_grad():
        before = model(x)
    replace_wrap.convert(model, every=2, init="fit")
    assert [b.path for b in replace_wrap.report(model).replaced] == ["blocks.1", "blocks.3"]
    for i, (a, b) in {1: (0.3, 0.8), 3: (-0.2, 1.1)}.items():
        site = blocks[i].replacement
        assert site.a.item() == pytest.approx(a, abs=1e-6) and site.b.item() == pytest.approx(b, abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert [b.init for b in replace_wrap.report(model).replaced] == ["fit", "fit"]
    # with (0.5, 0.5) the same model computes something else: the fit is what keeps the function
    replace_wrap.convert(half, every=2, init=(0.5, 0.5))
    with torch.no_grad():
        assert (half(x) - before).abs().max() > 1e-2


@pytest.mark.parametrize("scalars", ["block", "tensor"])
def test_fit_is_the_least_squares_solution(scalars):
    torch.manual_seed(1)
    model = ResidualMLP(depth=5)
    own = {i: _own(model.blocks[i]) for i in range(5)}
    replace_wrap.convert(model, every=2, init="fit", scalars=scalars)
    for i in (1, 3):
        site = model.blocks[i].replacement
        names = list(site.tensor_names)
        if scalars == "block":
            want = [_lstsq([own[i][n] for n in names], [own[i - 1][n] for n in names], [own[i + 1][n] for n in names])]
        else:
            want = [_lstsq([own[i][n]], [own[i - 1][n]], [own[i + 1][n]]) for n in names]
        torch.testing.assert_close(site.a.double(), torch.tensor([w[0] for w in want], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(site.b.double(), torch.tensor([w[1] for w in want], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


def test_fit_under_the_convex_rule_is_the_best_mix_with_a_plus_b_one():
    torch.manual_seed(2)
    model = ResidualMLP(depth=5)
    own = {i: _own(model.blocks[i]) for i in range(3)}
    replace_wrap.convert(model, every=2, init="fit", rule="convex")
    names = list(model.blocks[1].replacement.tensor_names)
    # t - n = a (p - n): one unknown
    t, p, n = (torch.cat([own[j][k].double().reshape(-1) for k in names]) for j in (1, 0, 2))
    a_star = float((t - n) @ (p - n) / ((p - n) @ (p - n)))
    a, b = model.blocks[1].replacement.coefficients()
    assert a.item() == pytest.approx(a_star, abs=1e-5) and (a + b).item() == pytest.approx(1.0, abs=1e-6)


def test_fit_through_shape_adapted_neighbours_minimises_the_synthesis_residual():
    """On a staged CNN the neighbours are sliced / padded: the fit must be the one of what the block mixes.

    The oracle reads the synthesis the converted model runs: with ``(a, b) = (1, 0)`` and ``(0, 1)`` it
    gives the adapted neighbours ``P``, ``N``; least squares of the block's own tensors on them must be the
    fitted ``(a, b)``.
    """
    torch.manual_seed(3)
    model = StagedCNN()
    own = {path: _own(m) for path, m in model.named_modules()}
    replace_wrap.convert(model, every=2, init="fit")
    adapted = [b for b in replace_wrap.report(model).replaced if b.adapted]
    assert adapted, "the staged CNN must exercise shape-adapted neighbours"
    for b in replace_wrap.report(model).replaced:
        block = model.get_submodule(b.path)
        site = block.replacement
        fitted = (site.a.item(), site.b.item())
        sides = []
        with torch.no_grad():
            for a_, b_ in ((1.0, 0.0), (0.0, 1.0)):
                site.a.fill_(a_)
                site.b.fill_(b_)
                sides.append([_tensor(block, n).detach().clone() for n in site.tensor_names])
            site.a.fill_(fitted[0])
            site.b.fill_(fitted[1])
        target = [own[b.path][n] for n in site.tensor_names]
        want = _lstsq(target, *sides)
        assert fitted == pytest.approx(want, abs=1e-5), b.path


def test_plan_previews_the_fitted_scalars_that_convert_starts_from():
    torch.manual_seed(4)
    model = ConvNet()
    preview = replace_wrap.plan(model, every=2, init="fit")
    replace_wrap.convert(model, every=2, init="fit")
    for b in preview.replaced:
        site = model.get_submodule(b.path).replacement
        assert b.init == "fit"
        assert b.scalars == {"a": [site.a.item()], "b": [site.b.item()]}
        assert b.scalars != {"a": [0.5], "b": [0.5]}
    assert "scalars start: fit x2" in str(replace_wrap.report(model))


def test_a_constant_init_and_a_policys_scalars_are_reported_as_such():
    model = replace_wrap.convert(ResidualMLP(depth=5), every=2, init=(0.2, 0.9))
    assert {b.init for b in replace_wrap.report(model).replaced} == {"(0.2, 0.9)"}
    assert model.blocks[1].replacement.a.item() == pytest.approx(0.2)
    model = replace_wrap.convert(ResidualMLP(depth=5), policy=replace_wrap.Similarity(every=2), init=(0.2, 0.9))
    assert {b.init for b in replace_wrap.report(model).replaced} == {"policy"}
    assert model.blocks[1].replacement.a.item() != pytest.approx(0.2)


def test_fit_on_meta_tensors_is_refused_and_leaves_the_model_as_it_was():
    with torch.device("meta"):
        model = ResidualMLP(depth=5)
    before = dict(model.named_parameters())
    with pytest.raises(ConfigError, match=r"init='fit' .* block 'blocks\.1' .* meta device .* init=\(a, b\)"):
        replace_wrap.convert(model, every=2, init="fit")
    assert dict(model.named_parameters()) == before
    assert not any(name.endswith("replacement") for name, _ in model.named_modules())


def test_a_fit_near_zero_is_said_and_the_plain_start_is_named(caplog):
    """Fresh, unrelated weights: the fit of a norm-free block is near zero, which silences it; convert says so."""
    torch.manual_seed(5)
    plain = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()) for _ in range(5)])
    with caplog.at_level(logging.INFO, logger="replace_wrap"):
        replace_wrap.convert(plain, every=2, init="fit")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "near zero" in r.getMessage()]
    assert len(warned) == 1 and "2 block(s)" in warned[0].getMessage() and "'1'" not in warned[0].getMessage()
    assert "1 (a=" in warned[0].getMessage() and "init=(0.5, 0.5)" in warned[0].getMessage()
    a, b = plain[1].replacement.a.item(), plain[1].replacement.b.item()
    assert abs(a) + abs(b) < 0.25
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="replace_wrap"):  # a block that is a mix of its neighbours: no warning
        replace_wrap.convert(ResidualMLP(depth=5), every=2, init="fit")
    assert "scalars start: fit x2" in caplog.text and "near zero" not in caplog.text


def test_a_fitted_conversion_saves_and_loads_exactly_and_loading_fits_nothing(tmp_path, monkeypatch):
    torch.manual_seed(6)
    model = replace_wrap.convert(ResidualMLP(depth=5), every=2, init="fit")
    with torch.no_grad():
        model.blocks[1].replacement.a.add_(0.25)  # as if trained: the load must give these, not a new fit
    replace_wrap.save(model, tmp_path)
    assert replace_wrap.ConversionRecord.of(model).config.init == "fit"
    from replace_wrap.surgery import fits

    calls = []
    monkeypatch.setattr(fits, "block_fits", lambda *a, **k: calls.append(a) or [])
    torch.manual_seed(7)
    twin = replace_wrap.load(ResidualMLP(depth=5), tmp_path)
    assert not calls
    assert replace_wrap.report(twin).config.init == "fit"
    x = ResidualMLP.example()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert twin.blocks[1].replacement.a.item() == model.blocks[1].replacement.a.item()


def test_a_model_converted_with_another_init_loads_the_same_checkpoint(tmp_path):
    torch.manual_seed(8)
    src = replace_wrap.convert(ResidualMLP(depth=5), every=2, init=(0.5, 0.5))
    replace_wrap.save(src, tmp_path)
    dst = replace_wrap.convert(ResidualMLP(depth=5), every=2, init="fit")
    replace_wrap.load(dst, tmp_path)  # init says where training started, not what the model computes
    x = ResidualMLP.example()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_hf_from_pretrained_of_a_fitted_conversion_builds_on_meta_and_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8, num_labels=3)
    torch.manual_seed(9)
    model = transformers.ViTForImageClassification(cfg).eval()
    replace_wrap.convert(model, every=2, init="fit")
    model.save_pretrained(tmp_path)
    twin = replace_wrap.from_pretrained(transformers.ViTForImageClassification, tmp_path).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)


def test_default_init_is_recorded_and_old_records_keep_their_start():
    assert ReplaceConfig.from_dict({"version": 2, "init": [0.5, 0.5]}).init == (0.5, 0.5)
    assert ReplaceConfig.from_dict({"version": 2}).init == (0.5, 0.5)  # a v2 record without the field
    assert ReplaceConfig.from_dict({"version": 1}).init == (0.5, 0.5)
