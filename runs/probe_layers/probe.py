"""Probe (issue 23): how well does the patch read v at each layer of Gemma-3-270M before any training,
and with the layer-13 adapter transferred (LoRA off on blocks below the layer read)?
Also: the time of one training step (batch 16) at layers 3 and 13, float32 vs bf16 autocast."""
import json, sys, time, torch
from pathlib import Path
from nla_space.backbone import load_backbone
from nla_space.verbalizers.patch import ResidualPatch, text_rows, token_ce, attach, PatchSpec
from eval_harness.data.text_corpus import read_corpus
from eval_harness.train.patch import val_ce

torch.set_num_threads(2)
out = Path("runs/probe_layers/probe.json")
res = json.loads(out.read_text()) if out.is_file() else {}
bb = load_backbone("embedded:gemma3-270m")
rows = [r for r in text_rows(bb, [x["text"] for x in read_corpus(Path("runs/corpus/v1.jsonl"), "val")], 64) if r][:64]
LAYERS = [3, 5, 7, 9, 11, 13, 15]

def save():
    out.write_text(json.dumps(res, indent=1))

for ell in LAYERS:
    key = f"zero_shot_L{ell}"
    if key in res: continue
    t = time.perf_counter(); res[key] = {**val_ce(bb, ResidualPatch(bb, ell), rows, 16), "s": round(time.perf_counter() - t, 1)}
    print(key, res[key], flush=True); save()

pm = attach(bb, PatchSpec(layer=13), folder=Path("runs/patch/gemma3-L13/best"))
lora_mods = [(int(n.split("layers.")[1].split(".")[0]), m) for n, m in pm.named_modules() if hasattr(m, "_disable_adapters") and "layers." in n]
for ell in LAYERS:
    key = f"L13_adapter_L{ell}"
    if key in res: continue
    for k, m in lora_mods: m._disable_adapters = k < ell
    t = time.perf_counter(); res[key] = {**val_ce(bb, ResidualPatch(bb, ell), rows, 16), "s": round(time.perf_counter() - t, 1)}
    for k, m in lora_mods: m._disable_adapters = False
    print(key, res[key], flush=True); save()
