"""Training integrations without a process group: AMP and dtype casts, gradient checkpointing, device moves."""

from __future__ import annotations

import copy

import pytest
import torch

import replace_wrap
from conftest import TOL, oracle_model
from toys import ResidualMLP, logits, tiny_hf_vit, tiny_timm_vit




def _sites(model):
    return [m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)]


def _set_scalars(model, a=0.3, b=0.9):
    with torch.no_grad():
        for s in _sites(model):
            s.a.fill_(a), s.b.fill_(b)
    return model


# --- AMP and dtype casts -----------------------------------------------------------------------------------------


def test_bf16_autocast_training():
    model = replace_wrap.convert(tiny_hf_vit(), every=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=x, labels=y)
        assert out.logits.dtype == torch.bfloat16  # autocast really ran the linears in bf16
        opt.zero_grad()
        out.loss.backward()
        for s in _sites(model):
            assert s.a.grad.dtype == torch.float32 and torch.isfinite(s.a.grad).all()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(s.a.detach(), torch.tensor([0.5])) for s in _sites(model))


@pytest.mark.parametrize(
    ("cast", "dtype"),
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(dtype=torch.float64), torch.float64),
    ],
    ids=["to_bf16", "half", "to_double"],
)
def test_scalars_stay_fp32_when_the_model_is_cast_and_merge_takes_the_model_dtype(cast, dtype):
    model = _set_scalars(replace_wrap.convert(ResidualMLP(), every=2, keep_original=True))
    cast(model)
    for s in _sites(model):
        assert s.a.dtype == s.b.dtype == torch.float32
        assert s.a.item() == pytest.approx(0.3) and s.b.item() == pytest.approx(0.9)
        assert s.original_0.dtype == dtype  # frozen originals follow the model
    block, prev, nxt = model.blocks[1], model.blocks[0], model.blocks[2]
    synthesized = block.fc1.weight
    assert synthesized.dtype == dtype
    p, n = prev.fc1.weight.double(), nxt.fc1.weight.double()
    a, b = (c.detach().double() for c in block.replacement.coefficients())  # the fp32 0.3 / 0.9
    exact = a * p + b * n
    # computed in the model dtype: within a few roundings of the terms' size (cancellation rules out rtol)
    ulp = torch.finfo(dtype).eps * (a * p.abs() + b * n.abs()).max().item()
    torch.testing.assert_close(synthesized.double(), exact, atol=4 * ulp, rtol=0)
    want = synthesized.detach().clone()
    if dtype != torch.float16:  # CPU half matmul coverage varies; the synthesis above is what matters
        model(ResidualMLP.example().to(dtype)).float().sum().backward()
        assert model.blocks[1].replacement.a.grad.dtype == torch.float32
    replace_wrap.merge(model)
    assert model.blocks[1].fc1.weight.dtype == dtype
    assert torch.equal(model.blocks[1].fc1.weight, want)
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("swap", [False, True], ids=["data", "swap_tensors"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_cast_keeps_the_scalars_gradients_fp32_and_training_goes_on(dtype, swap):
    # torch casts a parameter's .grad with it: the scalars stayed fp32 but their gradients became bf16 / fp64,
    # and AdamW's next step failed inside torch ("expected dtype float for `end`"), where a plain model trains on.
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        torch.manual_seed(0)
        model = replace_wrap.convert(ResidualMLP(), every=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = ResidualMLP.example()
        model(x).square().mean().backward()
        grads = [s.a.grad.clone() for s in _sites(model)]
        model.to(dtype)
        # exact: the fp32 gradients, not cast and back
        assert all(torch.equal(s.a.grad, g) for s, g in zip(_sites(model), grads))
        opt.step()
        opt.zero_grad()
        model(x.to(dtype)).float().square().mean().backward()
        opt.step()
        for s in _sites(model):
            assert s.a.dtype == s.a.grad.dtype == torch.float32 and torch.isfinite(s.a).all()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


# --- gradient checkpointing ----------------------------------------------------------------------------------


def _grads(model, x):
    model.zero_grad()
    logits(model(x)).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _count_forwards(block):
    # a pre-hook: non-reentrant checkpointing stops the recomputation early, before post-hooks would run
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _checkpointing_case(factory, enable, when, block_path, sample="exact"):
    torch.manual_seed(0)
    reference = replace_wrap.convert(factory(), every=2, ab_grad_sample=sample).train()
    model = factory().train()
    if when == "before":
        enable(model)
    replace_wrap.convert(model, every=2, ab_grad_sample=sample)
    if when == "after":
        enable(model)
    model.load_state_dict(_set_scalars(reference, 0.2, 0.7).state_dict())
    calls = _count_forwards(model.get_submodule(block_path))
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)  # the sampled estimator draws from torch's generator: the same draws in both runs
    got = _grads(model, x)
    torch.manual_seed(1)
    want = _grads(reference, x)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is really on
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=TOL["oracle"], rtol=1e-5, msg=n)
    assert got["vit.layers.1.replacement.a" if "vit" in block_path else "blocks.1.replacement.a"].abs().sum() > 0


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing(when, reentrant):
    def enable(m):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})

    _checkpointing_case(tiny_hf_vit, enable, when, "vit.layers.1")


@pytest.mark.parametrize("when", ["before", "after"])
def test_timm_grad_checkpointing(when):
    _checkpointing_case(tiny_timm_vit, lambda m: m.set_grad_checkpointing(True), when, "blocks.1")


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_replays_the_sampled_estimators_draws(reentrant):
    # The default estimator samples in the forward; checkpointing restores the generator for the recomputation,
    # so a checkpointed step draws the very rows an unchecked one draws: equal gradients. (Reentrant
    # checkpointing runs the first forward without grad: the training layers draw there all the same, so each
    # segment starts from the generator state it has in an unchecked step.)
    def enable(m):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})

    _checkpointing_case(tiny_hf_vit, enable, "after", "vit.layers.1", sample="auto")


class _DropoutBlock(torch.nn.Module):
    def __init__(self, conv: bool, width: int = 8):
        super().__init__()
        self.conv = conv
        self.layer = torch.nn.Conv2d(8, width, 3, padding=1) if conv else torch.nn.Linear(8, width)
        self.out = torch.nn.Conv2d(width, 8, 1) if conv else torch.nn.Linear(width, 8)
        self.norm = None if conv else torch.nn.RMSNorm(8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        x = x + self.drop(self.out(self.drop(self.layer(x))))
        return x if self.norm is None else x + self.drop(self.norm(x))


class _DropoutStack(torch.nn.Module):
    """Blocks with a dropout after each kind of layer kernel (linear, convolution, RMS norm), checkpointed as a
    user's loop would checkpoint them."""

    def __init__(self, conv: bool, widths: tuple[int, ...] = (8, 8, 8, 8)):
        super().__init__()
        self.checkpoint = None
        self.stem = torch.nn.Conv2d(3, 8, 1) if conv else torch.nn.Linear(3, 8)
        self.blocks = torch.nn.ModuleList(_DropoutBlock(conv, w) for w in widths)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.checkpoint == "reentrant")
        return x


# The options whose scalars or neighbours are computed tensors (a sigmoid; zero-padded copies of neighbours of
# another width, coupled): what requires grad must be read as a forward with gradients reads it. Coupled
# neighbours need the full weight gradient, so their layers draw nothing (and must not draw without gradients).
_CHECKPOINT_OPTIONS = {"default": ({}, (8, 8, 8, 8)), "convex": ({"rule": "convex"}, (8, 8, 8, 8)),
                       "coupled_adapted": ({"neighbour_grad": "coupled"}, (8, 12, 8, 8))}


@pytest.mark.parametrize("options", list(_CHECKPOINT_OPTIONS))
@pytest.mark.parametrize("conv", [False, True], ids=["linear_rms_norm", "conv"])
@pytest.mark.parametrize("checkpoint", ["reentrant", "non_reentrant"])
def test_checkpointing_with_dropout_replays_the_sampled_estimators_draws(conv, checkpoint, options):
    # Reentrant checkpointing runs a segment without gradients, then again with them from the same generator
    # state; the sampled kernels draw their units in both forwards, so a dropout after them draws the same mask
    # twice and the gradients are an unchecked step's. (Before, the forward without gradients drew no units:
    # the recomputation's dropout masks were other ones, and every gradient silently wrong.)
    kwargs, widths = _CHECKPOINT_OPTIONS[options]
    x = torch.randn(6, 3, 6, 6) if conv else torch.randn(6, 10, 3)  # 216 positions / 60 rows: both sampled
    torch.manual_seed(0)
    reference = _DropoutStack(conv, widths)
    model = copy.deepcopy(reference)
    model.checkpoint = checkpoint
    exact = copy.deepcopy(reference)
    grads = {}
    for name, m, sample in (("reference", reference, "auto"), ("model", model, "auto"), ("exact", exact, None)):
        replace_wrap.convert(m, every=2, ab_grad_sample=sample, **kwargs).train()
        if "rule" not in kwargs:
            _set_scalars(m, 0.2, 0.7)
        torch.manual_seed(1)
        m(x).square().mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["model"][n], g, atol=1e-6, rtol=1e-5, msg=n)
    if "neighbour_grad" not in kwargs:  # the units were sampled: the estimate is not the exact gradient
        a = next(n for n in grads["exact"] if n.startswith("blocks.1.replacement."))  # a (alpha when convex)
        assert not torch.allclose(grads["reference"][a], grads["exact"][a])


@pytest.mark.parametrize("conv", [False, True], ids=["linear_rms_norm", "conv"])
def test_forwards_without_gradients_draw_only_in_training(conv):
    # A training forward without gradients draws what one with gradients draws (the generator ends in the same
    # state); an evaluating one draws nothing (inference and generation keep the generator as a plain model
    # leaves it), and both compute the layer's output.
    x = torch.randn(6, 3, 6, 6) if conv else torch.randn(6, 10, 3)
    model = replace_wrap.convert(_DropoutStack(conv), every=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # (dropout draws nothing then: only the layers' draws remain)
    states = {}
    for mode, grad in (("train", True), ("train", False), ("eval", False)):
        getattr(model, mode)()
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad):
            y = model(x)
        states[mode, grad] = (torch.get_rng_state(), y.detach())
    torch.manual_seed(3)
    untouched = torch.get_rng_state()
    assert not torch.equal(states["train", True][0], untouched)  # the units were sampled
    assert torch.equal(states["train", False][0], states["train", True][0])
    assert torch.equal(states["eval", False][0], untouched)
    for key in states:
        torch.testing.assert_close(states[key][1], states["train", True][1], atol=1e-6, rtol=1e-6)


# --- devices and moves -------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", [False, True], ids=["in_place", "swap_params"])
def test_moves_after_convert_keep_the_synthesis_correct(swap):
    original = ResidualMLP()
    model = _set_scalars(replace_wrap.convert(copy.deepcopy(original), every=2))
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)  # .to() then replaces parameter objects
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    with torch.no_grad():
        model.blocks[0].fc1.weight.add_(1.0)  # the synthesis must read the neighbour's current tensor
    oracle = oracle_model(original.to(torch.float64), model)
    x = ResidualMLP.example().to(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), atol=1e-12, rtol=1e-12)


def test_meta_init_then_materialize_and_load():
    source = _set_scalars(replace_wrap.convert(ResidualMLP(), every=2))
    with torch.device("meta"):
        model = replace_wrap.convert(ResidualMLP(), every=2)
    assert model.blocks[1].fc1.weight.device.type == "meta"
    assert model(ResidualMLP.example().to("meta")).device.type == "meta"
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    x = ResidualMLP.example()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize("init", [(0.3, 0.6), "policy"])
def test_meta_init_then_materialize_and_reset_parameters_restores_the_scalars(init):
    # The meta-init recipe (FSDP2's too): to_empty, then reset_parameters() on every module that has one. to_empty
    # leaves the scalars as uninitialized memory; the site has no reset_parameters of its own, so they stayed so.
    class Scaled(replace_wrap.Indices):  # a policy's own initial scalars (as Similarity's fitted ones)
        def initial_scalars(self, stack, index, match, n_sets):
            return torch.full((n_sets,), 0.2), torch.full((n_sets,), 0.7)

    options = ({"config": replace_wrap.ReplaceConfig(init=init)} if init != "policy" else
               {"policy": Scaled([1, 3])})
    want = (0.3, 0.6) if init != "policy" else (0.2, 0.7)
    with torch.device("meta"):
        model = ResidualMLP()
    replace_wrap.convert(model, **({"every": 2} if init != "policy" else {}), **options)
    model.to_empty(device="cpu")
    sites = [m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)]
    ids = [id(p) for s in sites for p in s.parameters()]
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert ids == [id(p) for s in sites for p in s.parameters()]  # in place: an optimizer keeps them
    for s in sites:
        a, b = s.coefficients()
        torch.testing.assert_close((a.item(), b.item()), want)
    x = ResidualMLP.example()
    layer, prev, nxt = model.blocks[1].fc1, model.blocks[0].fc1, model.blocks[2].fc1
    torch.testing.assert_close(layer.weight, want[0] * prev.weight + want[1] * nxt.weight)
    assert torch.isfinite(model(x)).all()


def test_reset_parameters_of_a_stateful_rule_is_refused_unchanged():
    model = replace_wrap.convert(ResidualMLP(), every=2, config=replace_wrap.ReplaceConfig(rule="ema"))
    site = model.blocks[1].replacement
    before = {k: v.clone() for k, v in site.state_dict().items()}
    with torch.no_grad():
        site.a.fill_(0.9)
    with pytest.raises(replace_wrap.CompatibilityError, match=r"rule 'ema' keeps a state \(shadow_0.* Load a checkpoint"):
        site.reset_parameters()
    assert site.a.item() == pytest.approx(0.9)
    assert all(torch.equal(v, before[k]) for k, v in site.state_dict().items() if k.startswith("shadow"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move_keeps_synthesis_and_trains():
    model = _set_scalars(replace_wrap.convert(tiny_hf_vit(), every=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(pixel_values=x).logits
    model.cuda()
    site = model.vit.layers[1].replacement
    assert site.a.device.type == "cuda" and site.a.dtype == torch.float32
    assert model.vit.layers[1].attention.q_proj.weight.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x.cuda()).logits.cpu(), want, atol=1e-4, rtol=1e-4)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(pixel_values=x.cuda(), labels=torch.tensor([0, 1]).cuda()).loss
    loss.backward()
    assert torch.isfinite(site.a.grad).all()
    replace_wrap.merge(model)
    assert model.vit.layers[1].attention.q_proj.weight.device.type == "cuda"


def _stack(fast_path: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(5)])
    replace_wrap.convert(net, every=2, fast_path=fast_path)
    return net


def test_second_order_gradients_are_refused_with_the_fix_and_fast_path_false_gives_them():
    # a gradient penalty: the lean kernels compute the scalars' gradient directly, which cannot be differentiated
    # again; the error says so before any second derivative is built, and names the setting that gives one
    x = torch.randn(8, 16, requires_grad=True)
    net = _stack()
    with pytest.raises(replace_wrap.CompatibilityError, match="create_graph=True.*fast_path=False"):
        torch.autograd.grad(net(x).sum(), x, create_graph=True)
    plain = _stack(fast_path=False)
    (gx,) = torch.autograd.grad(plain(x).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    a = plain[1].replacement.a
    # the penalty's gradient for a, against a finite difference of the penalty itself
    def penalty(value: float) -> float:
        with torch.no_grad():
            a.fill_(value)
        (g,) = torch.autograd.grad(plain(x).sum(), x, create_graph=False)
        return g.pow(2).sum().item()
    got, base = a.grad.item(), a.item()
    eps = 1e-3
    fd = (penalty(base + eps) - penalty(base - eps)) / (2 * eps)
    assert abs(got - fd) <= 1e-2 * abs(fd) + 1e-4, (got, fd)


def test_torch_func_grad_and_per_sample_vmap_take_the_generic_path():
    # torch.func transforms (grad, vmap) need autograd rules the lean kernels' Functions do not define: the
    # kernels step aside while a transform runs, and the gradients are those of an ordinary backward
    net, x = _stack(), torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in net.named_parameters()}
    loss = lambda p, xb: torch.func.functional_call(net, p, (xb,)).pow(2).sum()  # noqa: E731
    got = torch.func.grad(loss)(params, x)
    net.zero_grad()
    loss(dict(net.named_parameters()), x).backward()  # the lean kernels; 6 rows: every row read, exact
    for k, p in net.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-6)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for k, p in net.named_parameters():  # the per-sample gradients add up to the batch's
        torch.testing.assert_close(per_sample[k].sum(0), p.grad, rtol=1e-4, atol=1e-5)


def test_jit_trace_records_the_generic_path_and_follows_the_scalars():
    # torch.jit.trace (and the ONNX export that traces) cannot record the lean kernels' autograd Functions: the
    # kernels step aside while the tracer runs; the trace computes the synthesis from the live parameters
    for net, x in ((_stack(), torch.randn(5, 16)),
                   (replace_wrap.convert(torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(5)]), every=2),
                    torch.randn(2, 3, 6, 6))):
        traced = torch.jit.trace(net, (x,))
        x2 = torch.randn_like(x)
        torch.testing.assert_close(traced(x2), net(x2), rtol=0, atol=0)
        site = replace_wrap.report(net).replaced[0]
        with torch.no_grad():
            net.get_submodule(site.path).replacement.a.add_(0.5)  # the scalars are parameters of the trace
        torch.testing.assert_close(traced(x2), net(x2), rtol=0, atol=0)
        traced(x2).sum().backward()
        assert net.get_submodule(site.path).replacement.a.grad is not None
