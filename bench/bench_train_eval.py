"""Time (a) one training step and (b) one evaluation pass over a test set, with the exact speed-ups
against the straightforward version (the authors' way), in one run; prints both ratios. (c): what
`optim.recompute_activations` costs a training step (the same step, activations recomputed).

Straightforward = the text encoder over all 77 positions, class embeddings re-encoded for every test
video, one forward per test video, the distance adjacency rebuilt every forward, local
attention masked over the full length, every sample read from disk every step. Ours = EOT
truncation, class embeddings once per pass, chunks of many videos batched, a fixed adjacency,
non-overlapping windows run as a batch of short sequences (windows of pure padding once per
slot), features in memory. Fast and slow alternate, best of --repeats each. Both give the same
numbers (tests).

    python bench/bench_train_eval.py [--preset xd] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch

from vadclip.config import preset
from vadclip.data import collate, epoch_batches, load_dataset
from vadclip.evaluate import predict
from vadclip.losses import total_loss
from vadclip.train import make_model


def interleaved_best(fast, slow, repeats: int) -> tuple[float, float]:
    """Best of `repeats` for each, alternating fast and slow so that drift in the machine's speed
    (shared CPUs) hits both alike; one warm-up each."""
    fast(), slow()
    times: dict[str, list[float]] = {"fast": [], "slow": []}
    for _ in range(repeats):
        for name, fn in (("fast", fast), ("slow", slow)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return min(times["fast"]), min(times["slow"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="xd", help="model settings of this preset (ViT-B-16 text tower, d=512)")
    p.add_argument("--batch", type=int, default=16, help="training samples per step")
    p.add_argument("--test-videos", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    half = args.test_videos // 2
    common = {"data.dataset": "synthetic", "data.synthetic.train_normal": 16, "data.synthetic.train_abnormal": 16,
              "data.synthetic.test_normal": half, "data.synthetic.test_abnormal": half,
              "data.synthetic.max_length": 300, "optim.batch_size": args.batch, "optim.sampler": "mixed"}
    fast_cfg = preset(args.preset, overrides={**common, "data.in_memory": True})
    slow_cfg = preset(args.preset, overrides={**common, "data.in_memory": False})
    fast_data, slow_data = load_dataset(fast_cfg), load_dataset(slow_cfg)
    fast_model = make_model(fast_cfg, fast_data, torch.device("cpu"))
    slow_model = make_model(fast_cfg, fast_data, torch.device("cpu"), straightforward=True)
    slow_model.load_state_dict(fast_model.state_dict())
    idx = epoch_batches(fast_data.train_labels[:, 0] > 0.5, args.batch, "mixed", np.random.default_rng(0))[0]
    length = fast_cfg.model.visual_length

    def trainer(model, data):
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6)

        def step() -> None:
            model.train()
            feats, lengths = collate(data.train, idx, length)
            x, n = torch.from_numpy(feats), torch.from_numpy(lengths)
            terms = total_loss(model(x, n), n, torch.from_numpy(data.train_labels[idx]), fast_cfg.loss)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        return step

    def evaluator(model, data, batched: bool):
        return lambda: predict(model, data.test, length, "cpu", batched=batched)

    train_fast, train_slow = interleaved_best(trainer(fast_model, fast_data), trainer(slow_model, slow_data),
                                              args.repeats)
    recompute_cfg = preset(args.preset, overrides={**common, "optim.recompute_activations": True})
    recompute_model = make_model(recompute_cfg, fast_data, torch.device("cpu"))
    recompute_model.load_state_dict(fast_model.state_dict())
    train_kept, train_recomputed = interleaved_best(trainer(fast_model, fast_data),
                                                    trainer(recompute_model, fast_data), args.repeats)
    eval_fast, eval_slow = interleaved_best(evaluator(fast_model, fast_data, True),
                                            evaluator(slow_model, slow_data, False), args.repeats)
    print(f"preset {args.preset}: CLIP {fast_cfg.clip.model} text tower, d={fast_cfg.model.embed_dim}, "
          f"L={length}, {len(fast_data.class_prompts)} classes, batch {args.batch}, "
          f"{len(fast_data.test)} test videos, {torch.get_num_threads()} threads")
    print(f"(a) training step:   straightforward {train_slow * 1e3:8.1f} ms   ours {train_fast * 1e3:8.1f} ms   "
          f"ratio {train_slow / train_fast:5.2f}x")
    print(f"(b) evaluation pass: straightforward {eval_slow * 1e3:8.1f} ms   ours {eval_fast * 1e3:8.1f} ms   "
          f"ratio {eval_slow / eval_fast:5.2f}x")
    print(f"(c) training step:   activations kept {train_kept * 1e3:8.1f} ms   "
          f"recomputed {train_recomputed * 1e3:8.1f} ms   cost {train_recomputed / train_kept:5.2f}x")


if __name__ == "__main__":
    main()
