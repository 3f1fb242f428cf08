"""Probe (issue 23): seconds per training step (batch 16, corpus windows ≤ 64 tokens) at layers 3 and 13,
float32 against bfloat16 autocast, on this machine."""
import json, time, torch
from pathlib import Path
from nla_space.backbone import load_backbone
from nla_space.verbalizers.patch import ResidualPatch, text_rows, token_ce, attach, PatchSpec
from eval_harness.data.text_corpus import read_corpus
torch.set_num_threads(2)
bb = load_backbone("embedded:gemma3-270m")
rows = [r for r in text_rows(bb, [x["text"] for x in read_corpus(Path("runs/corpus/v1.jsonl"), "train")[:64]], 64) if r]
pm = attach(bb, PatchSpec(layer=3, layers=[3, 13]), trainable=True)
params = [p for p in pm.parameters() if p.requires_grad]
out = {}
for ell in (3, 13):
    for mode in ("float32", "bf16_autocast"):
        ts = []
        for i in range(3):
            batch = rows[16 * i : 16 * (i + 1)]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
                loss = token_ce(bb, ResidualPatch(bb, ell), batch)
            loss.backward()
            ts.append(time.perf_counter() - t)
            for p in params: p.grad = None
        out[f"L{ell}_{mode}"] = {"s_per_step": [round(x, 2) for x in ts], "loss": round(float(loss), 4)}
        print(f"L{ell}_{mode}", out[f"L{ell}_{mode}"], flush=True)
Path("runs/probe_layers/step_time.json").write_text(json.dumps(out, indent=1))
