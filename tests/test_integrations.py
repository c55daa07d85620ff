"""Training libraries around a converted model: the scalars' helpers and callbacks, the HF Trainer with plain
loaders and resume, Lightning (1 process and DDP on 2), Accelerate (1 process and DDP on 2)."""

from __future__ import annotations

import csv
import math
import types

import pytest
import torch

import replace_wrap
from conftest import ROOT, load_example, run_python
from toys import ResidualMLP

EXAMPLES = ROOT / "examples"


# --- scalars / print_trainable_parameters ----------------------------------------------------------------


def test_scalars_are_the_sites_values_without_a_report():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    with torch.no_grad():
        model.blocks[1].replacement.a.fill_(0.25)
    assert replace_wrap.scalars(model) == {"blocks.1": (0.25, 0.5), "blocks.3": (0.5, 0.5)}
    per_tensor = replace_wrap.convert(ResidualMLP(), every=2, scalars="tensor", rule="convex")
    a, b = replace_wrap.scalars(per_tensor)["blocks.1"]
    n = len(per_tensor.blocks[1].replacement.tensor_names)
    assert len(a) == len(b) == n and all(math.isclose(x + y, 1.0, abs_tol=1e-6) for x, y in zip(a, b))
    from replace_wrap.observe import scalar_logs

    logs = scalar_logs(per_tensor, "rw")
    assert len(logs) == 2 * 2 * n and logs["rw/blocks.1/a/0"] == a[0]
    with pytest.raises(replace_wrap.NotConvertedError, match="convert it first"):
        replace_wrap.scalars(ResidualMLP())


def test_print_trainable_parameters(capsys):
    plain = ResidualMLP()
    total = sum(p.numel() for p in plain.parameters())
    replace_wrap.print_trainable_parameters(plain)
    assert capsys.readouterr().out.strip() == f"trainable params: {total:,} || all params: {total:,} || trainable%: 100.0000"
    model = replace_wrap.convert(ResidualMLP(), every=2)
    model.proj.requires_grad_(False)
    replaced = sum(p.numel() for i in (1, 3) for p in plain.blocks[i].parameters())
    kept = total - replaced + 4
    trainable = kept - sum(p.numel() for p in model.proj.parameters())
    replace_wrap.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,} || all params: {kept:,} || trainable%: {100 * trainable / kept:.4f} || "
        f"replaced blocks: 2 (4 scalars, {replaced:,} values synthesized)"
    )


# --- Hugging Face Trainer ----------------------------------------------------------------------------------


def _llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return replace_wrap.convert(transformers.LlamaForCausalLM(cfg), every=2)


def _data(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": (ids := torch.randint(3, 32, (12,), generator=g)), "labels": ids} for _ in range(n)]


def _trainer(model, out, callbacks=(), **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to="none", save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_steps=4, **kw,
    )
    return Trainer(model=model, args=args, train_dataset=_data(), callbacks=list(callbacks))


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 32)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def test_trainer_checkpoint_loads_plainly_everywhere_and_resumes_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, pipeline

    from replace_wrap.integrations.hf import ScalarsCallback

    model = _llama()
    trainer = _trainer(model, tmp_path / "run")
    recorder = _Recorder()  # stands for TensorBoard / W&B: the Trainer calls them before callbacks added later
    trainer.add_callback(recorder)
    trainer.add_callback(ScalarsCallback(trainer))
    trainer.train()
    # the scalars were logged at every logging step, through the callbacks that run first too
    logged = [e for e in trainer.state.log_history if "replace_wrap/model.layers.1/a" in e]
    assert len(logged) == trainer.state.global_step == 4
    final = replace_wrap.scalars(model)
    assert logged[-1]["replace_wrap/model.layers.1/a"] == final["model.layers.1"][0] != 0.5
    assert any("replace_wrap/model.layers.3/b" in r for r in recorder.logs)

    trainer.save_model(tmp_path / "final")
    _tokenizer(tmp_path / "final")
    ids = torch.tensor([[5, 9, 4]])  # what the tokenizer makes of "w5 w9 w4" (no BOS added)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # the plain loader of the ecosystem
    assert type(plain) is LlamaForCausalLM and not any(".replacement." in k for k in plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, expected)
    generator = pipeline("text-generation", model=str(tmp_path / "final"), device="cpu")
    text = generator("w5 w9 w4", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text.split() == [f"w{t}" for t in greedy[0, 3:].tolist()]
    again = replace_wrap.from_pretrained(LlamaForCausalLM, tmp_path / "final")
    assert replace_wrap.scalars(again) == final
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, expected)

    # resume from the step-2 checkpoint into a model built from other weights: ends where the run ended
    resumed = _llama(seed=1)
    _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    sa, sb = model.state_dict(), resumed.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trainer_loads_a_sharded_checkpoint_of_a_converted_model_exactly_and_refuses_an_unconverted_one(tmp_path):
    # Trainer resume and load_best_model_at_end load a checkpoint above max_shard_size shard by shard
    # (load_sharded_checkpoint: load_state_dict(shard, strict=False) each); a shard may hold a replaced block's
    # synthesized values without its scalars, which used to be refused as an unconverted state dict
    trainer_module = pytest.importorskip("transformers.trainer")
    model = _trained_llama()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    twin = _llama(seed=1)
    trainer_module.load_sharded_checkpoint(twin, tmp_path / "sharded", strict=False)  # what the Trainer calls
    _same_states(model.state_dict(), twin.state_dict())
    ids = torch.tensor([[5, 9, 4, 7]])
    with torch.no_grad():
        assert torch.equal(twin.eval()(input_ids=ids).logits, model(input_ids=ids).logits)

    plain = _llama(seed=2)
    replace_wrap.merge(plain)  # an unconverted model's sharded checkpoint: refused before any shard loads
    plain.save_pretrained(tmp_path / "plain", max_shard_size="20KB")
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    with pytest.raises(replace_wrap.StateDictError, match=r"no scalars.*no shard was loaded"):
        trainer_module.load_sharded_checkpoint(twin, tmp_path / "plain", strict=False)
    _same_states(before, twin.state_dict())


@pytest.mark.parametrize("utils_first", [False, True], ids=["utils-after-convert", "utils-before-convert"])
def test_load_sharded_checkpoint_of_trainer_utils_is_checked_without_the_trainer_module(utils_first):
    # transformers.trainer_utils.load_sharded_checkpoint is public API of its own: called directly, with the
    # trainer module never imported, it loaded shards until one holding synthesized values without their
    # scalars, then refused that one (a half-loaded model)
    pytest.importorskip("transformers")
    proc = run_python("-c", _SHARDED_WITHOUT_TRAINER.replace("UTILS_FIRST", str(utils_first)), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True", "True"], proc.stdout


_SHARDED_WITHOUT_TRAINER = """
import sys, tempfile, torch, transformers, replace_wrap
if UTILS_FIRST:
    import transformers.trainer_utils
def llama(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return replace_wrap.convert(transformers.LlamaForCausalLM(cfg), every=2).eval()
model = llama(0)
with torch.no_grad():
    model.model.layers[1].replacement.a.fill_(0.3)
d = tempfile.mkdtemp()
model.save_pretrained(d, max_shard_size="20KB")
import transformers.trainer_utils as tu
print("transformers.trainer" in sys.modules)
print(getattr(tu.load_sharded_checkpoint, "__replace_wrap__", False))
twin = llama(1)
tu.load_sharded_checkpoint(twin, d, strict=False)
ids = torch.tensor([[5, 9, 4, 7]])
with torch.no_grad():
    print(torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits))
"""


class _Recorder:
    def __init__(self):
        self.logs: list[dict] = []

    def __getattr__(self, event):  # every TrainerCallback event; only on_log records
        def call(args, state, control, logs=None, **kw):
            if event == "on_log" and logs is not None:
                self.logs.append(dict(logs))

        return call


def test_trainer_callback_without_the_trainer_warns_where_it_cannot_reach():
    pytest.importorskip("transformers")
    from replace_wrap.integrations.hf import ScalarsCallback

    model = replace_wrap.convert(ResidualMLP(), every=2)
    callback = ScalarsCallback()
    state = types.SimpleNamespace(global_step=3, log_history=[{"loss": 1.0}])
    logs = {"loss": 1.0}
    with pytest.warns(UserWarning, match=r"ScalarsCallback\(trainer\)"):
        callback.on_log(types.SimpleNamespace(report_to=["wandb"]), state, None, logs=logs, model=model)
    assert logs["replace_wrap/blocks.1/a"] == 0.5 and state.log_history[-1]["replace_wrap/blocks.3/b"] == 0.5


# --- Lightning -----------------------------------------------------------------------------------------------


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _same_states(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lightning_trains_logs_checkpoints_and_resumes_exactly(tmp_path, one_thread):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    result = load_example("lightning_train").main(["--epochs", "2", "--limit", "256", "--out", str(tmp_path)])
    continuous = torch.load(tmp_path / "continuous.pt", weights_only=True)
    _same_states(continuous, torch.load(tmp_path / "resumed.pt", weights_only=True))
    assert "model.2.fc1.weight" in continuous and "model.2.replacement.a" in continuous  # plain + scalars
    rows = [r for r in _read_csv(result["metrics"]) if r.get("replace_wrap/model.2/a")]
    assert len(rows) == 8  # 4 batches per epoch, 2 epochs, every step logged
    assert float(rows[-1]["replace_wrap/model.4/b"]) == continuous["model.4.replacement.b"].item() != 0.5


@pytest.mark.timeout(180)
def test_lightning_ddp_two_processes(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    proc = run_python(
        str(EXAMPLES / "lightning_train.py"), "--epochs", "2", "--limit", "256", "--devices", "2", "--strategy",
        "ddp", "--out", str(tmp_path), timeout=170, OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    states = [torch.load(tmp_path / f"{n}_rank{r}.pt", weights_only=True) for n in ("continuous", "resumed") for r in (0, 1)]
    for other in states[1:]:
        _same_states(states[0], other)  # the ranks agree, and resuming from epoch 1 ends at the same weights
    assert states[0]["model.2.replacement.a"].item() != 0.5


# --- Accelerate ----------------------------------------------------------------------------------------------


def _check_accelerate_run(out, ranks: int) -> None:
    runs = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]
    final = runs[0]["final"]
    assert "2.replacement.a" in final and "2.1.weight" in final  # unwrapped: scalars and synthesized values
    for run in runs:
        _same_states(final, run["final"])
        _same_states(final, run["resumed"])
    assert final["2.replacement.a"].item() != 0.5


def test_accelerate_prepare_trains_and_resumes(tmp_path, one_thread):
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    from accelerate.state import AcceleratorState

    try:
        result = load_example("accelerate_ddp").main(["--steps", "6", "--out", str(tmp_path)])
    finally:
        AcceleratorState._reset_state(True)  # the Accelerator's state is a process-wide singleton
    assert result["world"] == 1 and result["losses"][-1] < result["losses"][0]
    _check_accelerate_run(tmp_path, 1)


@pytest.mark.timeout(180)
def test_accelerate_ddp_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    proc = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "accelerate_ddp.py"), "--steps", "6", "--out", str(tmp_path), timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "DistributedType.MULTI_CPU on 2 process(es)" in proc.stdout
    _check_accelerate_run(tmp_path, 2)


# --- Accelerate offloading: refused with the next step, never a raw device error ------------------------------

_REFUSED_OFFLOAD = r"cannot run offloaded.*plain loader.*LlamaForCausalLM\.from_pretrained\(directory, device_map"
_DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "disk",
             "model.layers.3": "cpu", "model.layers.4": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
             "lm_head": "cpu"}


def _trained_llama():
    model = _llama().eval()
    with torch.no_grad():  # scalars away from their init, so a wrong synthesis would show
        model.model.layers[1].replacement.a.fill_(0.3)
        model.model.layers[3].replacement.b.fill_(0.8)
    return model


def test_from_pretrained_refuses_offloading_device_maps_and_loads_the_others_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _trained_llama()
    model.save_pretrained(tmp_path / "ckpt")
    x = torch.tensor([[3, 5, 7, 11, 13, 17]])
    with torch.no_grad():
        ref = model(input_ids=x).logits
    load = lambda **kw: replace_wrap.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "ckpt", **kw)  # noqa: E731
    # An explicit map is refused before anything is read: the cpu entries next to device 0 would be offloaded
    # (and this machine needs no GPU for the refusal)
    with pytest.raises(replace_wrap.CompatibilityError, match=r"offloads \['model.layers.0', 'model.layers.2'\]"):
        load(device_map=_DISK_MAP, offload_folder=str(tmp_path / "off"))
    with pytest.raises(replace_wrap.CompatibilityError, match=r"offloads \['model.embed_tokens', 'lm_head'\]"):
        load(device_map={"model.embed_tokens": "cpu", "model": 0, "lm_head": "cpu"})
    with pytest.raises(replace_wrap.CompatibilityError, match=_REFUSED_OFFLOAD):  # "auto": known once placed
        load(device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "off2"))
    # Maps that keep every module on a real device load the converted model exactly
    for device_map in ("cpu", {"model": "cpu", "lm_head": "cpu"}):
        twin = load(device_map=device_map).eval()
        assert replace_wrap.scalars(twin) == replace_wrap.scalars(model)
        with torch.no_grad():
            torch.testing.assert_close(twin(input_ids=x).logits, ref, rtol=0, atol=0)
    # The next step the message names: the plain loader offloads and predicts the same
    plain = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=_DISK_MAP, offload_folder=str(tmp_path / "off3")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, ref)


def test_accelerate_offload_hooks_are_refused_naming_the_neighbour_and_merge_offloads(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    import copy

    model = _trained_llama()
    x = torch.tensor([[3, 5, 7, 11, 13, 17]])
    with torch.no_grad():
        ref = model(input_ids=x).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offloaded = [accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu"),
                 accelerate.disk_offload(copy.deepcopy(model), str(tmp_path / "disk"), execution_device="cpu")]
    for off in offloaded:
        with pytest.raises(replace_wrap.CompatibilityError, match=(
            r"block between 'model.layers.0' and 'model.layers.2'\) synthesizes 'input_layernorm.weight' from "
            r"model.layers.0.input_layernorm.weight, which is on the meta device: offloaded by accelerate.*"
            r"replace_wrap.merge\(model\) first")), torch.no_grad():
            off(input_ids=x)
        assert "LlamaRMSNorm((32,), eps=1e-06)" in repr(off)  # printing an offloaded model never synthesizes
    _same_states(before, model.state_dict())  # the model offloaded copies of is untouched
    plain = accelerate.cpu_offload(replace_wrap.merge(copy.deepcopy(model)), execution_device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, ref)


def test_meta_neighbours_of_a_model_partly_loaded_are_refused_and_a_model_wholly_on_meta_still_runs():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = _llama()
    ids = torch.tensor([[3, 5, 7]])
    assert model(input_ids=ids.to("meta")).logits.is_meta  # shapes only: synthesized on meta, as before
    assert model.model.layers[1].input_layernorm.weight.is_meta
    # Half loaded: the first neighbour is real, the rest is not (init_empty_weights, then a partial load)
    model.model.layers[0].to_empty(device="cpu")
    text = repr(model)  # printing synthesizes nothing, so a half-loaded model prints
    assert "(input_layernorm): LlamaRMSNorm((32,), eps=1e-06)" in text
    with pytest.raises(replace_wrap.CompatibilityError, match=(
        r"synthesizes 'input_layernorm.weight' from model.layers.2.input_layernorm.weight, which is on the meta "
        r"device while the other neighbour or the block's scalars are not.*never \(wholly\) loaded.*to_empty")):
        model.model.layers[1].input_layernorm.weight
    assert isinstance(model, transformers.LlamaForCausalLM)
