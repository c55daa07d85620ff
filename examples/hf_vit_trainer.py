"""Train a converted Hugging Face ViT with an unchanged ``transformers.Trainer``, save it, reload it.

The data are scikit-learn's handwritten digits (offline), upsampled to ``--image-size`` pixels, 3 channels.
The only replace_wrap lines are ``convert`` before training and ``from_pretrained`` to reload:
``trainer.save_model()`` writes the conversion into ``config.json``, so the checkpoint reloads exactly.

    python examples/hf_vit_trainer.py --output-dir /tmp/vit-digits            # about a minute on 2 cores
    python examples/hf_vit_trainer.py --steps 40 --depth 3 --width 32 --output-dir /tmp/vit-small  # quick (tests)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import replace_wrap


class Digits(torch.utils.data.Dataset):
    """scikit-learn digits as ViT inputs: ``{"pixel_values": (3, S, S) in [-1, 1], "labels": int}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def digits(image_size: int, n_eval: int = 300) -> tuple[Digits, Digits]:
    """Train and held-out splits, upsampled once (bilinear) and normalised."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) - 0.5) / 0.5
    x = x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return Digits(x[n_eval:], y[n_eval:]), Digits(x[:n_eval], y[:n_eval])


def build_model(image_size: int, depth: int, width: int, patch_size: int = 8) -> ViTForImageClassification:
    cfg = ViTConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=2 * width,
        image_size=image_size, patch_size=patch_size, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


@torch.no_grad()
def predict(model: torch.nn.Module, data: Digits) -> torch.Tensor:
    model.eval()
    return model(pixel_values=data.images).logits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.output_dir)

    train, held_out = digits(args.image_size)
    model = build_model(args.image_size, args.depth, args.width, args.patch_size)
    replace_wrap.convert(model, every=args.every)  # the one line before training
    print(replace_wrap.report(model).summary())

    # --- an unchanged Trainer -------------------------------------------------------------------------
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256, learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(out / "converted"))  # config.json carries the conversion record

    # --- reload: the same predictions, bit for bit ------------------------------------------------------
    reloaded = replace_wrap.from_pretrained(ViTForImageClassification, out / "converted")
    logits = predict(model, held_out)
    same = torch.equal(predict(reloaded, held_out), logits)

    # --- merge: a plain checkpoint of the original architecture ---------------------------------------
    replace_wrap.merge(model)
    model.save_pretrained(out / "merged")
    plain = ViTForImageClassification.from_pretrained(out / "merged")
    merged_diff = (predict(plain, held_out) - logits).abs().max().item()

    result = {
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "accuracy": (logits.argmax(-1) == held_out.labels).float().mean().item(),
        "reloaded_identical": same,
        "merged_max_abs_diff": merged_diff,
        "train_losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
