"""One trainer on the tiny inputs of ``tests/test_distributed.py``, as a process of a ``torchrun`` run
(or alone, for the single-process baseline).

    python tests/dist_worker.py TRAINER ROOT OUT [--resume]
    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py TRAINER ROOT OUT [--resume]

``ROOT`` holds the inputs :func:`test_distributed.inputs` built. ``NLA_TEST_KILL_AFTER=K`` kills
rank 0 with SIGKILL right after its K-th checkpoint swap (a hard kill in the middle of a run).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

STEPS, EVERY = 6, 2


def toy_reward(texts, ids, closed, v, v_wrong, layer):  # the fraction of even token ids (no AR needed)
    r = torch.tensor([sum(t % 2 == 0 for t in row) / max(len(row), 1) for row in ids])
    return {"reward": r, "cos_true": r, "cos_wrong": torch.full_like(r, 0.5)}


def kill_after(k: int) -> None:
    from eval_harness import distributed
    from eval_harness.train import run_folder

    swap, count = run_folder._swap, [0]

    def swap_then_maybe_die(folder, write, marker):
        swap(folder, write, marker)
        if folder.name == run_folder.CHECKPOINT and distributed.world().is_main:
            count[0] += 1
            if count[0] >= k:
                os.kill(os.getpid(), signal.SIGKILL)

    run_folder._swap = swap_then_maybe_die


def main(trainer: str, root: Path, out: Path, resume: bool) -> None:
    from eval_harness.data.dataset import load_target_set
    from eval_harness.data.injection_targets import load_injection_targets
    from nla_space.backbone import load_backbone

    if os.environ.get("NLA_TEST_KILL_AFTER"):
        kill_after(int(os.environ["NLA_TEST_KILL_AFTER"]))
    steps = int(os.environ.get("NLA_TEST_STEPS", STEPS))
    if trainer == "train-patch":
        from eval_harness.train.patch import PatchTrainConfig, train_patch

        train_patch(load_backbone(str(root / "bb")), root / "corpus.jsonl", out, PatchTrainConfig(
            layer=(1, 2), steps=steps, batch_size=5, eval_every=EVERY, val_rows=8, r=4, alpha=8, lr=0.01), resume=resume)
    elif trainer == "train":
        from eval_harness.train.prefix import TrainConfig, train

        train(load_backbone(str(root / "bb")), load_target_set(root / "targets"), out, TrainConfig(
            lr=0.1, batch_size=7, num_prefix_tokens=2, max_steps=steps, val_every=EVERY, val_vectors=4, val_k=2, seed=7), resume=resume)
    elif trainer == "train-av-lora":
        from eval_harness.train.av_lora import AVTrainConfig, train_av

        train_av(load_backbone(str(root / "base")), load_injection_targets(root / "inj"), out, AVTrainConfig(
            max_steps=steps, val_every=EVERY, batch_size=5, lr=5e-3, val_frac=0.25, val_rows=12, lora_r=4, lora_alpha=8,
            lora_dropout=0.0), resume=resume)
    elif trainer == "train-ar":
        from eval_harness.train.ar import ARTrainConfig, train_ar

        train_ar(load_backbone(str(root / "base")), load_injection_targets(root / "inj"), out, ARTrainConfig(
            max_steps=steps, eval_every=EVERY, batch_size=7, lr=3e-3, head_lr=1e-2, eval_texts=4, lora_r=4, lora_alpha=8,
            lora_dropout=0.0), resume=resume)
    elif trainer == "train-grpo":
        from eval_harness.train.grpo import GRPOConfig, train_grpo

        train_grpo(load_backbone(str(root / "base")), load_injection_targets(root / "inj"), root / "sft" / "best", out, GRPOConfig(
            steps=steps, eval_every=EVERY, batch=3, group_size=2, max_new_tokens=4, lr=1e-2, eval_items=2, seed=1),
            resume=resume, reward_fn=toy_reward)
    else:
        raise SystemExit(f"unknown trainer {trainer}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), "--resume" in sys.argv[4:])
