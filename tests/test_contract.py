"""The conversion contract, one mixin run over every kind of model (PEFT's _test_merge_layers pattern).

For each model: object and class kept; trainable count = original - replaced + scalars; forward equals an
oracle that synthesizes the weights directly; backward reaches every trainable parameter; in detached mode
the site gives no gradient to its neighbours; a step on a, b alone changes the function; merge equals
converted and restores the state_dict keys; plan changes nothing.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import replace_wrap
from conftest import (
    TOL,
    assert_same_state,
    kernel_dims,
    oracle_model,
    oracle_weights,
    reference_adapt,
    state_snapshot,
    synthesized_value,
)
from toys import ConvNet, ResidualMLP, SharedSubmoduleNet, StagedCNN, TinyTransformer


def _out(y):
    """The tensor to compare from whatever the model returns (tensor, HF ModelOutput, tuple)."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "logits"):
        return y.logits
    return y[0]


class ConversionContract:
    """Subclasses provide make_model() and make_input(); every test here runs for each of them."""

    every = 2
    min_replaced = 1

    def make_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_input(self):
        raise NotImplementedError

    def call(self, model, x):
        return _out(model(x))

    # -- helpers --
    def converted(self, **options):
        model = self.make_model()
        original = copy.deepcopy(model)
        out = replace_wrap.convert(model, every=self.every, **options)
        assert out is model
        return original, model

    def randomize_scalars(self, model):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, replace_wrap.ReplacementSite):
                    for p in m.parameters():
                        p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.25)

    # -- the contract --
    def test_object_class_and_signature_kept(self):
        model = self.make_model()
        cls, sig = type(model), inspect.signature(model.forward)
        blocks_before = {n: m for n, m in model.named_modules()}
        replace_wrap.convert(model, every=self.every)
        assert type(model) is cls
        assert inspect.signature(model.forward) == sig
        for b in replace_wrap.report(model).replaced:  # a replaced block is the same object
            assert model.get_submodule(b.path) is blocks_before[b.path]

    def test_trainable_count(self):
        original, model = self.converted()
        rep = replace_wrap.report(model)
        assert len(rep.replaced) >= self.min_replaced
        before = sum(p.numel() for p in original.parameters() if p.requires_grad)
        removed = 0
        for b in rep.replaced:
            block = original.get_submodule(b.path)
            removed += sum(block.get_parameter(rel).numel() for rel in b.synthesized)
        after = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert after == before - removed + 2 * len(rep.replaced)
        assert rep.trainable_before == before and rep.trainable_after == after

    def test_synthesized_tensors_equal_hand_mixed_ones(self):
        """Every replaced tensor is a*prev + b*next up to the rounding of its dtype (no library maths in the oracle)."""
        original, model = self.converted()
        self.randomize_scalars(model)
        with torch.no_grad():
            for path, (exact, bound) in oracle_weights(original, model).items():
                value = synthesized_value(model, path).double()
                assert bool(((value - exact).abs() <= bound).all()), path

    def test_forward_equals_oracle(self):
        original, model = self.converted()
        self.randomize_scalars(model)
        oracle = oracle_model(original, model)
        model.eval(), oracle.eval()
        x = self.make_input()
        with torch.no_grad():
            torch.testing.assert_close(self.call(model, x), self.call(oracle, x), atol=TOL["oracle"], rtol=1e-5)

    def test_backward_reaches_every_trainable_parameter(self):
        _, model = self.converted()
        model.train()
        self.call(model, self.make_input()).float().square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing
        for b in replace_wrap.report(model).replaced:
            site = model.get_submodule(b.path).replacement
            assert site.a.grad is not None and site.b.grad is not None

    @pytest.mark.parametrize("mode", ["detached", "coupled"])
    def test_neighbour_gradient(self, mode):
        _, model = self.converted(neighbour_grad=mode)
        b = replace_wrap.report(model).replaced[0]
        block = model.get_submodule(b.path)
        rel = block.replacement.tensor_names[0]
        leaf_path, _, name = rel.rpartition(".")
        leaf = block.get_submodule(leaf_path) if leaf_path else block
        prev = model.get_parameter(f"{b.prev}.{rel}")
        nxt = model.get_parameter(f"{b.next}.{rel}")
        synthesized = getattr(leaf, name)
        grads = torch.autograd.grad(synthesized.sum(), [prev, nxt, block.replacement.a], allow_unused=True)
        assert grads[2] is not None  # the site's scalar always learns
        if mode == "detached":
            assert grads[0] is None and grads[1] is None
        else:
            # d(sum of a*adapt(P))/dP is a on the entries that land in the target, 0 on the sliced-off ones
            a, bb = (float(t.detach()) for t in block.replacement.coefficients())
            centre = kernel_dims(leaf, name, synthesized.dim())
            ones = torch.ones_like(synthesized)
            torch.testing.assert_close(grads[0], a * reference_adapt(ones, prev.shape, centre))
            torch.testing.assert_close(grads[1], bb * reference_adapt(ones, nxt.shape, centre))

    def test_step_on_scalars_alone_changes_function(self):
        _, model = self.converted()
        model.eval()
        x = self.make_input()
        scalars = [p for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite) for p in m.parameters()]
        opt = torch.optim.SGD(scalars, lr=0.5)
        with torch.no_grad():
            before = self.call(model, x).clone()
        self.call(model, x).float().square().mean().backward()
        opt.step()
        with torch.no_grad():
            after = self.call(model, x)
        assert not torch.allclose(before, after)

    def test_merge_equals_converted_and_restores_keys(self):
        original, model = self.converted()
        self.randomize_scalars(model)
        model.eval()
        x = self.make_input()
        with torch.no_grad():
            y_conv = self.call(model, x).clone()
        merged = replace_wrap.merge(model)
        assert merged is model
        assert list(merged.state_dict()) == list(original.state_dict())
        assert not any(isinstance(m, replace_wrap.ReplacementSite) for m in merged.modules())
        assert [type(m) for m in merged.modules()] == [type(m) for m in original.modules()]
        with torch.no_grad():
            assert (self.call(merged, x) - y_conv).abs().max().item() <= TOL["merge"]
        assert all(p.requires_grad for p in merged.parameters())
        # trainable again: every parameter gets a gradient
        merged.train()
        self.call(merged, x).float().square().mean().backward()
        assert all(p.grad is not None for p in merged.parameters())

    def test_plan_changes_nothing(self):
        model = self.make_model()
        model.train()
        before = state_snapshot(model)
        rep = replace_wrap.plan(model, every=self.every)
        assert_same_state(before, state_snapshot(model))
        assert len(rep.replaced) >= self.min_replaced
        model.eval()
        before = state_snapshot(model)
        replace_wrap.plan(model, every=self.every)
        assert_same_state(before, state_snapshot(model))

    def test_revert_restores_original(self):
        original, model = self.converted(keep_original=True)
        self.randomize_scalars(model)
        replace_wrap.revert(model)
        ref = original.state_dict()
        got = model.state_dict()
        assert list(got) == list(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k

    def test_deepcopy_of_converted_model(self):
        _, model = self.converted()
        self.randomize_scalars(model)
        model.eval()
        twin = copy.deepcopy(model)
        x = self.make_input()
        with torch.no_grad():
            torch.testing.assert_close(self.call(twin, x), self.call(model, x), atol=0, rtol=0)
        # the copy synthesizes from its own neighbours, not the original's
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.01)
            assert not torch.allclose(self.call(twin, x), self.call(model, x))


class TestResidualMLP(ConversionContract):
    def make_model(self):
        return ResidualMLP(depth=6)

    def make_input(self):
        return ResidualMLP.example()


class TestConvBN(ConversionContract):
    def make_model(self):
        return ConvNet(depth=5)

    def make_input(self):
        return ConvNet.example()


class TestTransformerAttributeBlocks(ConversionContract):
    def make_model(self):
        return TinyTransformer(depth=5)

    def make_input(self):
        return TinyTransformer.example()


class TestSharedSubmodule(ConversionContract):
    def make_model(self):
        return SharedSubmoduleNet(depth=5)

    def make_input(self):
        return SharedSubmoduleNet.example()


class TestTimmViT(ConversionContract):
    def make_model(self):
        timm = pytest.importorskip("timm")
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)

    def make_input(self):
        return torch.randn(2, 3, 32, 32)


class TestTimmResNet(ConversionContract):
    # resnet34 has stages of 3, 4, 6, 3 blocks: every=2 replaces inside stages and skips stage boundaries
    def make_model(self):
        timm = pytest.importorskip("timm")
        # zero_init_last=False: timm zeroes the last BN of each block, which would hide a, b from the output
        return timm.create_model("resnet34", pretrained=False, num_classes=5, zero_init_last=False)

    def make_input(self):
        return torch.randn(2, 3, 32, 32)


class TestHFViT(ConversionContract):
    def make_model(self):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=8, num_labels=3,
        )
        return transformers.ViTForImageClassification(cfg)

    def make_input(self):
        return torch.randn(2, 3, 16, 16)


# --- models whose replaced blocks need shape-adapting fusion ----------------------------------------------


class TestStagedCNN(ConversionContract):
    """Channels and kernel sizes change between stages; stage-first blocks are strided and project."""

    def make_model(self):
        return StagedCNN()

    def make_input(self):
        return StagedCNN.example()


class TestTimmResNet18(ConversionContract):
    # two blocks per stage: every replaced block has a neighbour in another stage (channels x2)
    min_replaced = 3

    def make_model(self):
        timm = pytest.importorskip("timm")
        return timm.create_model("resnet18", pretrained=False, num_classes=5, zero_init_last=False)

    def make_input(self):
        return torch.randn(2, 3, 32, 32)


class TestTimmEfficientNet(ConversionContract):
    # inverted-residual stacks: expansion, kernel size (3 / 5) and width change at stage boundaries
    min_replaced = 3

    def make_model(self):
        timm = pytest.importorskip("timm")
        model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5)
        # Fresh BatchNorm statistics (variance 1) shrink the eval activations ~4x per stage down to ~1e-6 at
        # the logits; set them from one batch, as training would, so the outputs respond to a and b.
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.momentum = None  # cumulative average: one batch sets the statistics
        with torch.no_grad():
            model.train()(torch.randn(8, 3, 32, 32))
        for m in norms:
            m.momentum = 0.1
        return model

    def make_input(self):
        return torch.randn(2, 3, 32, 32)
