"""Writes tests/data/checkpoint_0_1: checkpoints saved by replace_wrap 0.1 (commit 3348fef, before the package layout
change). Run with that release first on sys.path: PYTHONPATH=<0.1 checkout> <venv python> make.py tests/data/checkpoint_0_1
"""
import sys, torch
from pathlib import Path
import replace_wrap
out = Path(sys.argv[1])
torch.manual_seed(0)
def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6)) for _ in range(5)])
net = replace_wrap.convert(make(), every=2, scalars="tensor")
with torch.no_grad():
    for p in net.parameters():
        p.add_(0.01 * torch.randn_like(p))
x = torch.randn(3, 6)
replace_wrap.save(net, out / "sequential")
torch.save({"x": x, "y": net(x).detach()}, out / "sequential" / "expected.pt")
from transformers import ViTConfig, ViTForImageClassification
cfg = ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4, num_labels=3)
torch.manual_seed(0)
vit = replace_wrap.convert(ViTForImageClassification(cfg), every=2)
with torch.no_grad():
    vit.vit.layers[1].replacement.a.add_(0.1)
vit.eval()
px = torch.randn(2, 3, 8, 8)
vit.save_pretrained(out / "hf_vit")
torch.save({"x": px, "y": vit(pixel_values=px).logits.detach()}, out / "hf_vit" / "expected.pt")
print("ok", replace_wrap.__version__)
