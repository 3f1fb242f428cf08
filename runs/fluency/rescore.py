"""Fluency and loops of recorded reading-eval answers (issue 23 part 4): judge perplexity under
SmolLM2-135M-Instruct (eval_harness.evals.fluency) and the 3-gram×3 loop rate on Gemma-3 tokens.
Usage: python runs/fluency/rescore.py OUT.json SAMPLES.jsonl [SAMPLES.jsonl ...]"""
import json, statistics, sys
from collections import defaultdict
from pathlib import Path
from eval_harness.evals.fluency import FluencyJudge, has_loop
from nla_space.backbone import _load_tokenizer, embedded_folder

tok = _load_tokenizer(embedded_folder("gemma3-270m"))
judge = FluencyJudge()
out = {"judge": judge.spec, "loop": "a token 3-gram (Gemma-3 tokenizer) occurring 3+ times", "runs": {}}
for path in sys.argv[2:]:
    groups = defaultdict(list)
    for ln in Path(path).read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            groups[f"{r.get('strategy', 'greedy')}_k{r.get('k', 1)}"].append(r)
    for name, rows in groups.items():
        answers = [r["verbalization"] for r in rows]
        ppl = [x for x in judge.perplexity(answers) if x is not None]
        src = [x for x in judge.perplexity([r["text"] for r in rows]) if x is not None]
        ids = [r.get("token_ids") or tok(a, add_special_tokens=False)["input_ids"] for r, a in zip(rows, answers)]
        loops = [a for a, i in zip(answers, ids) if has_loop(i)]
        out["runs"][f"{Path(path).stem}:{name}"] = {
            "n": len(rows), "judge_ppl_mean": round(statistics.mean(ppl), 2), "judge_ppl_median": round(statistics.median(ppl), 2),
            "input_judge_ppl_median": round(statistics.median(src), 2), "repeat3_rate": round(len(loops) / len(rows), 4),
            "loops": loops[:10]}
        print(name, path, {k: v for k, v in out["runs"][f"{Path(path).stem}:{name}"].items() if k != "loops"}, flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
