"""Converted -> trained briefly -> merged -> ``torch.export`` (and ONNX when the exporter is installed).

After ``replace_wrap.merge`` the model is a plain model of the original architecture: its state_dict has the
original keys (so it loads into a freshly created model without replace_wrap), and it exports like any
other model. ONNX export uses the torch.export-based exporter, which needs the ``onnx`` and ``onnxscript``
packages; without them that step is skipped with a note.

    python examples/merge_and_export.py --out-dir exported
    python examples/merge_and_export.py --model vit_small_patch16_224 --steps 20
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import replace_wrap


def digits(img_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (n, 1, 8, 8)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).expand(
        -1, 3, -1, -1
    )
    return x.contiguous(), torch.tensor(d.target[:n])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="a timm ViT-family model name")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="training steps before merging")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--onnx",
        choices=("auto", "off", "require"),
        default="auto",
        help="ONNX export: when available (auto), never, or fail without the exporter",
    )
    p.add_argument("--out-dir", default="exported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if args.onnx == "require" and missing:  # fail before any work, not after training
        raise SystemExit(
            f"--onnx require: the ONNX exporter needs {' and '.join(missing)} (pip install onnx onnxscript)"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def create() -> torch.nn.Module:
        return timm.create_model(
            args.model, pretrained=False, num_classes=10, img_size=args.img_size, patch_size=args.patch_size
        )

    torch.manual_seed(args.seed)
    model = create()
    original_keys = list(model.state_dict())
    x, y = digits(args.img_size, args.steps * args.batch_size)

    # --8<-- [start:train]
    replace_wrap.convert(model, every=args.every)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size)):
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(replace_wrap.report(model))
    # --8<-- [end:train]

    # --8<-- [start:merge]
    model.eval()
    sample = x[:4]
    with torch.no_grad():
        converted = model(sample)
        replace_wrap.merge(model)  # every synthesized tensor becomes an ordinary parameter again
        merged = model(sample)
    assert list(model.state_dict()) == original_keys  # the original architecture's keys, in order
    print(f"merge: max |merged - converted| = {(merged - converted).abs().max().item():.1e}")

    torch.save(model.state_dict(), out / "merged.pt")
    fresh = create().eval()  # a new model from timm alone: no replace_wrap involved
    fresh.load_state_dict(torch.load(out / "merged.pt"))
    with torch.no_grad():
        print(
            f"reloaded into a fresh {args.model}: max |diff| = {(fresh(sample) - merged).abs().max().item():.1e}"
        )
    # --8<-- [end:merge]

    # --8<-- [start:export]
    program = torch.export.export(model, (sample,))
    torch.export.save(program, out / "model.pt2")
    with torch.no_grad():
        exported = torch.export.load(out / "model.pt2").module()(sample)
    print(
        f"torch.export: wrote {out / 'model.pt2'}; max |exported - merged| = "
        f"{(exported - merged).abs().max().item():.1e}"
    )
    # --8<-- [end:export]

    # --8<-- [start:onnx]
    if args.onnx == "off":
        print("ONNX: off")
    elif missing:
        print(f"ONNX: skipped, the exporter needs {' and '.join(missing)} (pip install onnx onnxscript)")
    else:
        onnx_program = torch.onnx.export(model, (sample,), dynamo=True)
        onnx_program.save(str(out / "model.onnx"))
        print(f"ONNX: wrote {out / 'model.onnx'}")
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out / "model.onnx"))
            (ort_out,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
            print(
                f"ONNX Runtime: max |onnx - merged| = {abs(torch.from_numpy(ort_out) - merged).max().item():.1e}"
            )
    # --8<-- [end:onnx]


if __name__ == "__main__":
    main()
