"""Trainer: `fit(config, data, callbacks)` and the CLI `python -m vadclip.train --preset synthetic`.

Knows nothing of Ray or MLflow: per-epoch results go to callbacks.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vadclip.cli import add_config_flags, as_dict, blame, flag_overrides, infer_dataset
from vadclip.config import ConfigError, VadClipConfig, apply_overrides, flatten, preset
from vadclip.data import DataError, VadDataset, collate, epoch_batches, load_dataset
from vadclip.device import resolve_device
from vadclip.errors import VadClipError
from vadclip.evaluate import Evaluation, Predictions, evaluate
from vadclip.io import atomic_write, atomic_write_text
from vadclip.losses import total_loss
from vadclip.metrics import FRACTIONS, MAP_LEVELS
from vadclip.model import VadCLIP, build_model, tokenizer
from vadclip.model.clip import frozen_text_tower
from vadclip.model.recompute import set_recompute

CHECKPOINT_LAST, CHECKPOINT_BEST = "last.pt", "best.pt"


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    metrics: dict[str, float]  # train/..., val/..., test/..., lr, epoch, step (optimisation steps so far)
    is_best: bool
    out_dir: Path  # holds last.pt and best.pt after this epoch
    evaluations: list[dict[str, float]] = field(default_factory=list)  # this epoch's step-wise evaluations


@dataclass
class FitResult:
    metrics: dict[str, Any]  # what metrics.json holds
    history: list[dict[str, float]]  # one record per epoch (EpochRecord.metrics)
    out_dir: Path
    test_predictions: Predictions | None = None
    model: VadCLIP | None = field(default=None, repr=False)
    evaluations: list[dict[str, float]] = field(default_factory=list)  # step-wise, each with epoch and step
    seconds: float = 0.0  # training and evaluation, i.e. without building the model and without the callbacks


Callback = Callable[[EpochRecord], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


class CheckpointError(DataError):
    """A checkpoint file that is truncated, corrupt or not ours (a DataError, so the CLIs report it)."""


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu",
                    required: Sequence[str] = ("model", "epoch")) -> dict[str, Any]:
    """The dict saved by `fit` (a folder means its last.pt); `required`: keys the caller needs."""
    import pickle

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_LAST
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    expected = f"expected a {CHECKPOINT_LAST} / {CHECKPOINT_BEST} written by vadclip.train"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message is a page of advice on weights_only=False
        raise CheckpointError(f"{path}: holds Python objects that a weights-only load refuses, not a "
                              f"checkpoint; {expected}") from e
    except Exception as e:  # damaged or foreign bytes raise a dozen types (OSError, KeyError, struct.error, ...)
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {reason}), the file is truncated, "
                              f"corrupt or not a checkpoint; {expected}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict; {expected}")
    missing = [k for k in required if k not in ckpt]
    if missing or not isinstance(ckpt.get("model", {}), dict):
        what = f"missing key(s) {', '.join(map(repr, missing))}" if missing else "'model' is not a state dict"
        raise CheckpointError(f"{path}: not a vadclip checkpoint ({what}); {expected}")
    return ckpt


def load_weights(model: VadCLIP, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def make_model(cfg: VadClipConfig, data: VadDataset, device: torch.device,
               straightforward: bool = False) -> VadCLIP:
    """`straightforward`: the exact speed-ups off (see `VadCLIP`), for the bench and the equality tests."""
    clip = frozen_text_tower(cfg.clip.model, cfg.clip.weights, embed_dim=cfg.model.embed_dim)
    torch.manual_seed(cfg.seed)  # same initial weights for the same seed, whatever CLIP did
    model = build_model(cfg.model, data.class_prompts, clip, tokenizer(), straightforward)
    set_recompute(model, cfg.optim.recompute_activations)
    return model.to(device)


def _selection_score(metrics: dict[str, float], cfg: VadClipConfig) -> float:
    value = metrics.get(f"{cfg.eval.selection}/{cfg.selection_metric}", float("nan"))
    return -math.inf if value is None or math.isnan(value) else value


def _evaluate_split(model: VadCLIP, data: VadDataset, split: str, cfg: VadClipConfig,
                    device: torch.device) -> tuple[dict[str, float], Evaluation | None]:
    videos = data.val if split == "val" else data.test
    if videos is None:
        return {}, None
    result = evaluate(model, videos, data.class_codes, length=cfg.model.visual_length, device=device,
                      score_branch=cfg.score_branch, selection_metric=cfg.selection_metric,
                      map_protocol=cfg.eval.map_protocol, topk_divisor=cfg.loss.topk_divisor)
    return {f"{split}/{k}": v for k, v in result.metrics.items()}, result


class BestCheckpoint:
    """The best weights so far by the selection score, in memory (`state`) and in best.pt; the step-wise
    (`eval.eval_every_steps`) and the epoch-wise evaluations both go through `consider`."""

    def __init__(self, model: VadCLIP, cfg: VadClipConfig, path: Path) -> None:
        self.model, self.cfg, self.path = model, cfg, path
        self.score, self.epoch = -math.inf, 0
        self.state = {k: v.clone() for k, v in model.trainable_state_dict().items()}

    def consider(self, score: float, epoch: int) -> bool:
        """Save the current weights if `score` beats the best so far; returns whether it did."""
        if not score > self.score:
            return False
        self.score, self.epoch = score, epoch
        self.save(epoch)
        return True

    def save(self, epoch: int) -> None:
        self.state = {k: v.detach().clone() for k, v in self.model.trainable_state_dict().items()}
        atomic_save({"model": self.state, "epoch": epoch, "config": flatten(self.cfg)}, self.path)


class _Trainer:
    """The model, its optimiser and schedule, and the data of one `fit`."""

    def __init__(self, cfg: VadClipConfig, data: VadDataset, device: torch.device, out_dir: Path) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.model = make_model(cfg, data, device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.optim.milestones),
                                                              cfg.optim.gamma)
        self.best = BestCheckpoint(self.model, cfg, out_dir / CHECKPOINT_BEST)

    def evaluate(self, split: str) -> tuple[dict[str, float], Evaluation | None]:
        return _evaluate_split(self.model, self.data, split, self.cfg, self.device)

    def evaluate_both(self) -> dict[str, float]:
        """One evaluation on the validation and the test split: what the histories hold, from which every
        selection protocol (best on val, best on test, last) can be derived afterwards."""
        return {**self.evaluate("val")[0], **self.evaluate("test")[0]}

    def resume(self, resume: str | Path) -> tuple[int, list[dict[str, float]], list[dict[str, float]]]:
        """Restore weights, optimiser, schedule and best checkpoint; returns the epochs done, the history and
        the step-wise evaluations."""
        ckpt = load_checkpoint(resume, self.device, required=("model", "optimizer", "scheduler", "epoch",
                                                              "best_score", "best_epoch", "history"))
        load_weights(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.best.score, self.best.epoch = ckpt["best_score"], ckpt["best_epoch"]
        folder = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        if (folder / CHECKPOINT_BEST).is_file():  # else the best stays the untrained weights
            self.best.state = load_checkpoint(folder / CHECKPOINT_BEST, self.device)["model"]
        return ckpt["epoch"], list(ckpt["history"]), list(ckpt.get("evaluations", []))

    def train_epoch(self, epoch: int, first_step: int, progress: bool) -> tuple[dict[str, float], bool,
                                                                            list[dict[str, float]]]:
        """One epoch of steps, then the schedule step: the mean loss terms, seconds, lr and the global `step`
        (optimisation steps so far, counted from `first_step`), whether a step-wise evaluation improved the best
        checkpoint, and those evaluations (val and test metrics at their global step)."""
        cfg, data, model = self.cfg, self.data, self.model
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])  # per-epoch stream: resume replays it exactly
        batches = epoch_batches(data.train_labels[:, 0] > 0.5, cfg.optim.batch_size, cfg.optim.sampler, rng)
        if cfg.optim.max_steps_per_epoch:  # the first steps of the same permutation: a prefix of the full epoch
            batches = batches[:cfg.optim.max_steps_per_epoch]
        sums: dict[str, float] = {}
        improved, every, evaluations = False, cfg.eval.eval_every_steps, []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not progress, leave=False)
        t0 = time.perf_counter()
        for step, idx in enumerate(bar, start=1):
            feats, lengths = collate(data.train, idx, cfg.model.visual_length)
            x, n = torch.from_numpy(feats).to(self.device), torch.from_numpy(lengths).to(self.device)
            y = torch.from_numpy(data.train_labels[idx]).to(self.device)
            terms = total_loss(model(x, n), n, y, cfg.loss)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            self.optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
            # the epoch-end evaluation follows the last step with the same weights: not evaluated twice
            if every and step % every == 0 and step < len(batches):
                metrics = self.evaluate_both()
                evaluations.append({"epoch": epoch + 1, "step": first_step + step, **metrics})
                improved = self.best.consider(_selection_score(metrics, cfg), epoch + 1) or improved
                model.train()
        self.scheduler.step()
        record = {f"train/{k}": v / max(len(batches), 1) for k, v in sums.items()}
        record["train/seconds"] = time.perf_counter() - t0
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["step"] = first_step + len(batches)
        return record, improved, evaluations

    def save_last(self, epoch: int, history: list[dict[str, float]], evaluations: list[dict[str, float]],
                  path: Path) -> None:
        atomic_save({"model": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best_score": self.best.score,
                     "best_epoch": self.best.epoch, "history": history, "evaluations": evaluations,
                     "config": flatten(self.cfg)}, path)

    def final_metrics(self) -> tuple[dict[str, Any], Predictions | None]:
        """The best checkpoint re-evaluated: what metrics.json holds, and its test predictions."""
        load_weights(self.model, self.best.state)
        test_metrics, test = self.evaluate("test")
        val_metrics, _ = self.evaluate("val")
        cfg = self.cfg
        return {
            "selection": cfg.eval.selection,
            "selection_metric": cfg.selection_metric,
            "score_branch": cfg.score_branch,
            "map_protocol": cfg.eval.map_protocol,
            "best_epoch": self.best.epoch,
            "test": {k.split("/", 1)[1]: v for k, v in test_metrics.items()},
            "val": {k.split("/", 1)[1]: v for k, v in val_metrics.items()},
            "test_branch": None if test is None else test.branch,  # the branch the unprefixed test metrics are
        }, None if test is None else test.predictions


def fit(cfg: VadClipConfig, data: VadDataset | None = None, *, out_dir: str | Path,
        callbacks: Sequence[Callback] = (), resume: str | Path | None = None,
        progress: bool = True) -> FitResult:
    """Train VadCLIP; evaluate every epoch; keep the best checkpoint by `eval.selection`.

    Writes `out_dir/last.pt`, `best.pt` (trainable weights; load with weights_only=True),
    `config.json` and, at the end, `metrics.json` (the best checkpoint re-evaluated on test).
    `resume`: a checkpoint file or a folder holding last.pt and best.pt.
    """
    if cfg.eval.selection == "val" and cfg.data.val_fraction <= 0:
        raise ConfigError("eval.selection='val' needs data.val_fraction > 0 (or use selection 'test')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = data if data is not None else load_dataset(cfg)
    trainer = _Trainer(cfg, data, device, out_dir)
    start_epoch, history, evaluations = trainer.resume(resume) if resume is not None else (0, [], [])
    atomic_write_text(json.dumps(flatten(cfg), indent=1, default=list), out_dir / "config.json")
    if resume is None:
        trainer.best.save(0)  # untrained weights until a first evaluation beats them
    started, in_callbacks = time.perf_counter(), 0.0
    for epoch in range(start_epoch, cfg.optim.epochs):
        first_step = int(history[-1].get("step", 0)) if history else 0
        record, improved, stepwise = trainer.train_epoch(epoch, first_step, progress)
        record.update(trainer.evaluate_both())
        improved = trainer.best.consider(_selection_score(record, cfg), epoch + 1) or improved
        if cfg.eval.reload_best:  # the authors continue each epoch from the best weights so far
            load_weights(trainer.model, trainer.best.state)
        record["epoch"] = epoch + 1
        history.append(record)
        evaluations += stepwise
        trainer.save_last(epoch + 1, history, evaluations, out_dir / CHECKPOINT_LAST)
        called = time.perf_counter()
        for callback in callbacks:
            callback(EpochRecord(epoch + 1, record, improved, out_dir, stepwise))
        in_callbacks += time.perf_counter() - called
    result, preds = trainer.final_metrics()
    atomic_write_text(json.dumps(result, indent=1, allow_nan=True), out_dir / "metrics.json")
    seconds = time.perf_counter() - started - in_callbacks
    return FitResult(result, history, out_dir, preds, trainer.model, evaluations, seconds)


# ---------------------------------------------------------------- CLI

METRIC_ROWS = (*FRACTIONS, *MAP_LEVELS, "map_avg")  # the paper's Tables 1-4 columns


def metrics_table(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    test = result["test"]
    rows = [[m, test.get(m), test.get(f"c_{m}"), test.get(f"a_{m}")] for m in METRIC_ROWS]
    branch = str(result.get("test_branch", "-")).upper()
    footer = (f"selection on {result['selection']} ({result['selection_metric']}, best epoch "
              f"{result['best_epoch']}); score branch {branch}; AP = sklearn average_precision_score; "
              f"mAP protocol {result['map_protocol']}")
    return tabulate(rows, headers=["test metric", "chosen", "C-branch", "A-branch"], floatfmt=".4f",
                    missingval="-") + "\n" + footer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vadclip.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="synthetic", help="ucf | xd | synthetic (default: inferred from --lists)")
    p.add_argument("--variant", default="official", help="official (authors' code) | paper (paper text)")
    add_config_flags(p, epochs_flag="--epochs")
    p.add_argument("--out", default="runs/train", help="output folder (checkpoints, metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out")
    p.add_argument("--resume", help="checkpoint file or folder to resume from")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> VadClipConfig:
    """The config of a CLI run; an invalid value is blamed on the flag(s) that set it."""
    base = preset(infer_dataset(args.dataset, args.lists) or args.preset, args.variant)
    flags = flag_overrides(args)
    try:
        return apply_overrides(base, as_dict(flags))
    except ConfigError as err:
        raise ConfigError(f"{blame(flags, lambda f: apply_overrides(base, as_dict(f)))}: {err}") from err


def check_out_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """An earlier run's files are not silently replaced (resuming into its own folder is fine)."""
    earlier = [n for n in ("metrics.json", CHECKPOINT_LAST, CHECKPOINT_BEST) if (out / n).exists()]
    if earlier and resume is None and not overwrite:
        raise ConfigError(f"--out {out}: holds an earlier run ({', '.join(earlier)}); pass --overwrite to "
                          "replace it, --resume to continue it, or choose another --out")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_out_dir(Path(args.out), args.resume, args.overwrite)
        result = fit(cfg, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
    except (VadClipError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(metrics_table(result.metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
