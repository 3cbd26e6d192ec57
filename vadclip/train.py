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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vadclip.cli import add_config_flags, as_dict, blame, flag_overrides, infer_dataset
from vadclip.compiled import compiled_forward
from vadclip.config import ConfigError, OptimConfig, VadClipConfig, apply_overrides, flatten, preset
from vadclip.data import DataError, VadDataset, epoch_batches, load_dataset
from vadclip.data.conventions import has_validation_split
from vadclip.data.dataset import describe
from vadclip.data.resident import batch_source
from vadclip.device import resolve_device
from vadclip.errors import VadClipError
from vadclip.evaluate import Evaluation, Predictions, evaluate
from vadclip.fused import SeedStack
from vadclip.io import atomic_write, atomic_write_text
from vadclip.losses import total_loss
from vadclip.metrics import FRACTIONS, MAP_LEVELS
from vadclip.model import VadCLIP, build_model, tokenizer
from vadclip.model.clip import frozen_text_tower
from vadclip.model.recompute import set_recompute
from vadclip.precision import apply_tf32, autocast, loss_scaler

CHECKPOINT_LAST, CHECKPOINT_BEST = "last.pt", "best.pt"


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    # train/..., val/..., test/..., lr, epoch, step (optimisation steps so far); val/test are the epoch-end evaluation,
    # or under eval.cadence=authors after in-loop ones (UCF) a copy of the epoch's last evaluation
    metrics: dict[str, float]
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
GroupCallback = Callable[[list[EpochRecord]], None]  # fit_fused: the records of every seed of one epoch


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


def checkpoint_path(path: Path | str) -> Path:
    """The file a checkpoint argument names: a folder means its last.pt."""
    path = Path(path)
    return path / CHECKPOINT_LAST if path.is_dir() else path


def weight_mismatch(model: VadCLIP, state: dict[str, torch.Tensor], shown: int = 3) -> str | None:
    """How `state` differs from the trainable weights of `model` (at most `shown` names of each kind), or None."""
    own = model.trainable_state_dict()
    shapes = [f"{k} {tuple(v.shape)} (this model {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    for what, names in (("shapes differ", shapes), ("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{what}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts) or None


def _config_differences(saved: Any, model: VadCLIP, shown: int = 4) -> str:
    """The model settings in which a checkpoint's saved (flat) config differs from `model`'s, as a clause ('' when
    none is known)."""
    if not isinstance(saved, dict):
        return ""

    def plain(v: Any) -> Any:  # a tuple may come back from a checkpoint as a list
        return list(v) if isinstance(v, tuple) else v

    own = flatten(model.cfg, "model.")
    keys = [k for k in own if k in saved and plain(saved[k]) != plain(own[k])]
    if not keys:
        return ""
    diff = ", ".join(f"{k}={saved[k]!r} (this run {own[k]!r})" for k in keys[:shown])
    return f"; it was saved with {diff}{' ...' if len(keys) > shown else ''}"


def check_weights(model: VadCLIP, state: dict[str, torch.Tensor], source: Path | str | None = None,
                  saved_config: Any = None) -> None:
    """One CheckpointError naming `source`, the differing weights and model settings (from the checkpoint's
    `saved_config`) when `state` does not fit `model`, instead of torch's page of size mismatches."""
    problem = weight_mismatch(model, state)
    if problem is not None:
        raise CheckpointError(f"{source or 'checkpoint'}: weights of another model configuration ({problem})"
                              f"{_config_differences(saved_config, model)}; expected a checkpoint of this config")


def load_weights(model: VadCLIP, state: dict[str, torch.Tensor], source: Path | str | None = None,
                 saved_config: Any = None) -> None:
    """Load trainable weights into `model`, checked first (`check_weights`)."""
    check_weights(model, state, source, saved_config)
    model.load_state_dict(state, strict=False)


def adamw(params: Sequence[torch.Tensor], optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """The authors' optimiser with `optim.adamw`'s kernel: torch's default choice, the foreach or the fused one (the
    same update to float32 rounding, `tests/test_speed.py`); fused where the device has no fused kernel: the default,
    with a warning."""
    try:
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                 foreach=True if optim.adamw == "foreach" else None,
                                 fused=True if optim.adamw == "fused" else None)
    except RuntimeError as err:
        warnings.warn(f"optim.adamw={optim.adamw}: {err}; using torch's default AdamW", RuntimeWarning, stacklevel=2)
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def make_model(cfg: VadClipConfig, data: VadDataset, device: torch.device,
               straightforward: bool = False) -> VadCLIP:
    """`straightforward`: the exact speed-ups off (see `VadCLIP`), for the bench and the equality tests."""
    clip = frozen_text_tower(cfg.clip.model, cfg.clip.weights, embed_dim=cfg.model.embed_dim)
    torch.manual_seed(cfg.seed)  # same initial weights for the same seed, whatever CLIP did
    model = build_model(cfg.model, data.class_prompts, clip, tokenizer(), straightforward)
    set_recompute(model, cfg.optim.recompute_activations)
    return model.to(device)


def _selection_score(metrics: dict[str, float], cfg: VadClipConfig) -> float:
    value = metrics.get(cfg.objective_key, float("nan"))
    return -math.inf if value is None or math.isnan(value) else value


def samples_per_step(cfg: VadClipConfig) -> int:
    """Training samples of one step as the authors count them: `batch_size` per side twice (balanced, ucf_train.py's
    `i * normal_loader.batch_size * 2`), else the batch (xd_train.py's `i * train_loader.batch_size`)."""
    return cfg.optim.batch_size * (2 if cfg.optim.sampler == "balanced" else 1)


def evaluates_after(i: int, steps: int, cfg: VadClipConfig) -> bool:
    """Whether an in-loop evaluation follows the 0-based step i of an epoch of `steps` steps (`eval.cadence`)."""
    e = cfg.eval
    if e.cadence == "authors":  # ucf_train.py: step = i * batch * 2; test when step % 1280 == 0 and step != 0
        seen = i * samples_per_step(cfg)  # samples before this step, counted from the epoch's step 0
        return e.eval_every_samples > 0 and seen > 0 and seen % e.eval_every_samples == 0
    # steps: after steps N, 2N, ...; the epoch's last step is left to the epoch-end evaluation (same weights)
    return e.eval_every_steps > 0 and (i + 1) % e.eval_every_steps == 0 and i + 1 < steps


def evaluates_at_epoch_end(cfg: VadClipConfig, in_loop: int) -> bool:
    """`steps`: every epoch end. `authors`: only after an epoch with no in-loop evaluation (xd_train.py's loop; or
    an epoch shorter than the interval, where ucf_train.py would reload a checkpoint it never saved)."""
    return cfg.eval.cadence == "steps" or in_loop == 0


def split_metrics(evaluation: dict[str, float]) -> dict[str, float]:
    """The val/ and test/ metrics of one evaluation record."""
    return {k: v for k, v in evaluation.items() if k.startswith(("val/", "test/"))}


def _evaluate_split(model: VadCLIP, data: VadDataset, split: str, cfg: VadClipConfig,
                    device: torch.device) -> tuple[dict[str, float], Evaluation | None]:
    videos = data.val if split == "val" else data.test
    if videos is None:
        return {}, None
    with autocast(cfg.optim, device):
        result = evaluate(model, videos, data.class_codes, length=cfg.model.visual_length, device=device,
                          score_branch=cfg.score_branch, selection_metric=cfg.selection_metric,
                          map_protocol=cfg.eval.map_protocol, topk_divisor=cfg.loss.topk_divisor)
    return {f"{split}/{k}": v for k, v in result.metrics.items()}, result


class BestCheckpoint:
    """The best weights so far by the selection score, in memory (`state`) and in best.pt; the in-loop
    (`eval.cadence`) and the epoch-end evaluations both go through `consider`."""

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

    def restore(self, state: dict[str, torch.Tensor], score: float, epoch: int) -> None:
        """A resumed run's best so far, written to best.pt at once: the run's folder holds it even when the resume
        came from another folder or from a last.pt alone."""
        self.state = {k: v.detach().clone() for k, v in state.items()}
        self.score, self.epoch = score, epoch
        atomic_save({"model": self.state, "epoch": epoch, "config": flatten(self.cfg)}, self.path)


def _last_is_best(ckpt: dict[str, Any], cfg: VadClipConfig) -> bool:
    """Whether a last.pt's weights are its run's best checkpoint: always with `eval.reload_best` (every epoch ends on
    the best weights), else when its own epoch-end evaluation set the best score (not a step-wise one before it)."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        saved = {}
    if saved.get("eval.reload_best", cfg.eval.reload_best):
        return True
    epoch, score, history = ckpt["epoch"], ckpt["best_score"], ckpt["history"]
    if ckpt["best_epoch"] != epoch or not history or _selection_score(history[-1], cfg) != score:
        return False
    stepwise = [e for e in ckpt.get("evaluations", []) if e.get("epoch") == epoch]
    return all(_selection_score(e, cfg) != score for e in stepwise)


@dataclass
class _Member:
    """One seed of a fit: its config, its model (whose trainable weights are its slice when seeds are fused), its
    best checkpoint and its output folder."""

    cfg: VadClipConfig
    model: VadCLIP
    best: BestCheckpoint
    out_dir: Path

    def evaluate(self, split: str, data: VadDataset, device: torch.device) -> tuple[dict[str, float],
                                                                                  Evaluation | None]:
        return _evaluate_split(self.model, data, split, self.cfg, device)

    def evaluate_both(self, data: VadDataset, device: torch.device) -> dict[str, float]:
        """One evaluation on the validation and the test split: what the histories hold, from which every
        selection protocol (best on val, best on test, last) can be derived afterwards."""
        return {**self.evaluate("val", data, device)[0], **self.evaluate("test", data, device)[0]}


class _Trainer:
    """The models, the optimiser and schedule, and the data of one `fit`: one seed, or the k seeds of one
    configuration fused into one vectorised model (`vadclip.fused.SeedStack`)."""

    def __init__(self, cfgs: Sequence[VadClipConfig], data: VadDataset, device: torch.device,
                 out_dirs: Sequence[Path]) -> None:
        self.cfg, self.data, self.device = cfgs[0], data, device
        models = []
        for cfg in cfgs:
            if len(cfgs) > 1:  # as `fit` seeds a lone seed before building its model
                seed_everything(cfg.seed)
            models.append(make_model(cfg, data, device))
        self.stack = SeedStack(models, self.cfg.loss) if len(models) > 1 else None
        self.members = [_Member(cfg, model, BestCheckpoint(model, cfg, out / CHECKPOINT_BEST), out)
                        for cfg, model, out in zip(cfgs, models, out_dirs)]
        params = (self.stack.trainable if self.stack is not None
                  else [p for p in models[0].parameters() if p.requires_grad])
        cfg = self.cfg
        self.optimizer = adamw(params, cfg.optim, device)
        self.scaler = loss_scaler(cfg.optim, device)
        apply_tf32(cfg.optim, device)
        self.forward = compiled_forward(models[0], device) if cfg.optim.compile else models[0]
        self.batch = batch_source(data.train, cfg.model.visual_length, device, cfg.data.on_device, cfg.data)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.optim.milestones),
                                                              cfg.optim.gamma)

    def resume(self, folders: Sequence[Path | str]) -> tuple[int, list[list[dict[str, float]]],
                                                             list[list[dict[str, float]]]]:
        """Restore weights, optimiser, schedule and best checkpoint of every seed (one checkpoint each); returns
        the epochs done, and per seed the history and the step-wise evaluations."""
        epochs, histories, evaluations, states = set(), [], [], []
        for member, resume in zip(self.members, folders):
            last = checkpoint_path(resume)
            ckpt = load_checkpoint(last, self.device, required=("model", "optimizer", "scheduler", "epoch",
                                                                "best_score", "best_epoch", "history"))
            load_weights(member.model, ckpt["model"], last, ckpt.get("config"))
            states.append(ckpt["optimizer"])
            member.best.restore(self._best_state(member, ckpt, last), ckpt["best_score"], ckpt["best_epoch"])
            epochs.add(ckpt["epoch"])
            histories.append(list(ckpt["history"]))
            evaluations.append(list(ckpt.get("evaluations", [])))
            scheduler, scaler = ckpt["scheduler"], ckpt.get("scaler", {})
        if len(epochs) != 1:
            raise CheckpointError(f"{', '.join(map(str, folders))}: the fused seeds' checkpoints are at different "
                                  f"epochs {sorted(epochs)}; expected one checkpoint of the whole group")
        if self.stack is None:
            self.optimizer.load_state_dict(states[0])
        else:
            self.stack.load_optimizer_states(self.optimizer, states)
        self.scheduler.load_state_dict(scheduler)
        if scaler:  # fp16's loss scale as it was (an empty dict: no scaler, or a checkpoint from before it)
            self.scaler.load_state_dict(scaler)
        return epochs.pop(), histories, evaluations

    def _best_state(self, member: _Member, ckpt: dict[str, Any], last: Path) -> dict[str, torch.Tensor]:
        """The weights of a resumed seed's best epoch: its best.pt beside `last` (checked to be that epoch's), else
        the weights that are provably the same (`_last_is_best`; the seed's untrained weights when no evaluation beat
        them), else one CheckpointError: those weights are lost, and the best epoch must not be misreported."""
        best_epoch, path = ckpt["best_epoch"], last.parent / CHECKPOINT_BEST
        if path.is_file():
            best = load_checkpoint(path, self.device)
            if best["epoch"] != best_epoch:
                raise CheckpointError(f"{path}: holds epoch {best['epoch']}, but {last} names epoch {best_epoch} as "
                                      f"the best; expected the best.pt written by the same run")
            check_weights(member.model, best["model"], path, best.get("config"))
            return best["model"]
        if best_epoch == 0:  # nothing beat the untrained weights: this seed's initial ones, rebuilt identically
            return member.best.state
        if _last_is_best(ckpt, member.cfg):
            return ckpt["model"]
        raise CheckpointError(f"{path}: not found; {last} names epoch {best_epoch} of {ckpt['epoch']} as the best, "
                              f"whose weights only best.pt holds; resume from the folder that holds both files")

    def _step(self, batches: list[list[np.ndarray]], step: int) -> list[dict[str, torch.Tensor]]:
        """One optimisation step of every seed on its own batch; each seed's loss terms."""
        cfg, data, device = self.cfg, self.data, self.device
        xs, ns, ys = [], [], []
        for seed_batches in batches:
            idx = seed_batches[step]
            feats, lengths = self.batch(idx)
            xs.append(feats)
            ns.append(lengths)
            ys.append(torch.from_numpy(data.train_labels[idx]).to(device))
        with autocast(cfg.optim, device):
            if self.stack is None:
                terms = total_loss(self.forward(xs[0], ns[0]), ns[0], ys[0], cfg.loss)
                loss = terms["loss"]
                per_seed = [terms]
            else:  # the sum of the seeds' losses: each slice's gradient is its own seed's
                fused = self.stack.losses(torch.stack(xs), torch.stack(ns), torch.stack(ys))
                loss = fused["loss"].sum()
                per_seed = [{k: v[i] for k, v in fused.items()} for i in range(len(self.members))]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # fp16: scaled, and the step skipped on inf/nan; else plain
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return per_seed

    def train_epoch(self, epoch: int, first_step: int, progress: bool) -> tuple[list[dict[str, float]], list[bool],
                                                                            list[list[dict[str, float]]]]:
        """One epoch of steps, then the schedule step. Per seed: the mean loss terms, seconds, lr and the global
        `step` (optimisation steps so far, counted from `first_step`), whether an in-loop evaluation (`eval.cadence`,
        `evaluates_after`) improved its best checkpoint, and those evaluations (val and test metrics at their global
        step)."""
        cfg, data, members = self.cfg, self.data, self.members
        for member in members:
            member.model.train()
        batches = []
        for member in members:
            rng = np.random.default_rng([member.cfg.seed, epoch])  # per-epoch stream: resume replays it exactly
            seed_batches = epoch_batches(data.train_labels[:, 0] > 0.5, cfg.optim.batch_size, cfg.optim.sampler, rng)
            if cfg.optim.max_steps_per_epoch:  # the first steps of the same permutation: a prefix of the full epoch
                seed_batches = seed_batches[:cfg.optim.max_steps_per_epoch]
            batches.append(seed_batches)
        steps = len(batches[0])
        sums: list[dict[str, float]] = [{} for _ in members]
        improved = [False] * len(members)
        evaluations: list[list[dict[str, float]]] = [[] for _ in members]
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not progress, leave=False)
        t0 = time.perf_counter()
        for step in bar:
            per_seed = self._step(batches, step)
            for i, terms in enumerate(per_seed):
                for k, v in terms.items():
                    sums[i][k] = sums[i].get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{per_seed[0]['loss'].item():.4f}")
            if evaluates_after(step, steps, cfg):
                for i, member in enumerate(members):
                    metrics = member.evaluate_both(data, self.device)
                    evaluations[i].append({"epoch": epoch + 1, "step": first_step + step + 1, **metrics})
                    improved[i] = member.best.consider(_selection_score(metrics, cfg), epoch + 1) or improved[i]
                    member.model.train()
        self.scheduler.step()
        seconds = time.perf_counter() - t0
        records = []
        for i in range(len(members)):
            record = {f"train/{k}": v / max(steps, 1) for k, v in sums[i].items()}
            record["train/seconds"] = seconds / len(members)  # a fused seed's share of the epoch
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["step"] = first_step + steps
            records.append(record)
        return records, improved, evaluations

    def save_last(self, i: int, epoch: int, history: list[dict[str, float]], evaluations: list[dict[str, float]],
                  ) -> None:
        """Seed i's last.pt: a single seed's checkpoint also when fused (its slice of the optimiser's state)."""
        member = self.members[i]
        optimizer = (self.optimizer.state_dict() if self.stack is None
                     else self.stack.seed_optimizer_state(self.optimizer, i))
        atomic_save({"model": member.model.trainable_state_dict(), "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                     "best_score": member.best.score,
                     "best_epoch": member.best.epoch, "history": history, "evaluations": evaluations,
                     "config": flatten(member.cfg)}, member.out_dir / CHECKPOINT_LAST)

    def final_metrics(self, i: int) -> tuple[dict[str, Any], Predictions | None]:
        """Seed i's best checkpoint re-evaluated: what metrics.json holds, and its test predictions."""
        member = self.members[i]
        load_weights(member.model, member.best.state)
        test_metrics, test = member.evaluate("test", self.data, self.device)
        val_metrics, _ = member.evaluate("val", self.data, self.device)
        cfg = member.cfg
        return {
            "selection": cfg.eval.selection,
            "selection_metric": cfg.selection_metric,
            "score_branch": cfg.score_branch,
            "map_protocol": cfg.eval.map_protocol,
            "best_epoch": member.best.epoch,
            "test": {k.split("/", 1)[1]: v for k, v in test_metrics.items()},
            "val": {k.split("/", 1)[1]: v for k, v in val_metrics.items()},
            "test_branch": None if test is None else test.branch,  # the branch the unprefixed test metrics are
        }, None if test is None else test.predictions


def fit(cfg: VadClipConfig, data: VadDataset | None = None, *, out_dir: str | Path,
        callbacks: Sequence[Callback] = (), resume: str | Path | None = None,
        progress: bool = True) -> FitResult:
    """Train VadCLIP; evaluate as `eval.cadence` says; keep the best checkpoint by `eval.selection`.

    Writes `out_dir/last.pt`, `best.pt` (trainable weights; load with weights_only=True),
    `config.json` and, at the end, `metrics.json` (the best checkpoint re-evaluated on test).
    `resume`: a checkpoint file or a folder holding last.pt and best.pt.
    """
    check_selection(cfg)
    seed_everything(cfg.seed)
    data = data if data is not None else load_dataset(cfg)
    def each(records: list[EpochRecord]) -> None:
        for callback in callbacks:
            callback(records[0])

    (result,) = _fit([cfg], data, [Path(out_dir)], [each], None if resume is None else [resume], progress)
    return result


FUSED_RECOMPUTE = ("optim.recompute_activations=true cannot train fused seeds: torch.utils.checkpoint does not run "
                   "under torch.func.vmap; fuse 1 seed per trial (fuse_seeds: 1) or keep the activations")
FUSED_COMPILE = ("optim.compile=true cannot train fused seeds: the fused seeds' forward is a torch.func.vmap over "
                 "functional_call, which the compiled forward does not replace; fuse 1 seed per trial (fuse_seeds: 1) "
                 "or train eager")


def fused_conflict(cfg: VadClipConfig) -> str | None:
    """Why seeds of `cfg` cannot be fused (the keys that conflict with fuse_seeds > 1), or None."""
    if cfg.optim.recompute_activations:
        return FUSED_RECOMPUTE
    return FUSED_COMPILE if cfg.optim.compile else None


def seed_folder(out_dir: str | Path, seed: int) -> Path:
    """Where `fit_fused` writes one seed's files (and where a resumed group finds them)."""
    return Path(out_dir) / f"seed-{seed}"


def fit_fused(cfgs: Sequence[VadClipConfig], data: VadDataset | None = None, *, out_dir: str | Path,
              callbacks: Sequence[GroupCallback] = (), resume: str | Path | None = None,
              progress: bool = True) -> list[FitResult]:
    """`fit` for the seeds of one configuration at once, as one vectorised model (`vadclip.fused`): each seed
    has its own initialisation, batch order, evaluations, best checkpoint and files (`seed_folder(out_dir, seed)`,
    the same files as `fit` writes). `callbacks` get the seeds' records of an epoch together. `resume`: a folder
    holding the seeds' folders. One config gives `fit`'s path (and numbers) exactly.
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ConfigError("fit_fused: no configs")
    seeds = [c.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"fit_fused: seeds {seeds} repeat; each fused seed needs its own")
    reference = {k: v for k, v in flatten(cfgs[0]).items() if k != "seed"}
    for cfg in cfgs[1:]:
        differ = sorted(k for k, v in flatten(cfg).items() if k != "seed" and reference.get(k) != v)
        if differ:
            raise ConfigError(f"fit_fused: seed {cfg.seed}'s config differs from seed {seeds[0]}'s in "
                              f"{', '.join(differ)}; fused seeds share everything but the seed")
    check_selection(cfgs[0])
    conflict = fused_conflict(cfgs[0]) if len(cfgs) > 1 else None
    if conflict:
        raise ConfigError(conflict)
    seed_everything(cfgs[0].seed)
    data = data if data is not None else load_dataset(cfgs[0])
    folders = [seed_folder(out_dir, s) for s in seeds]
    return _fit(cfgs, data, folders, callbacks, None if resume is None else [seed_folder(resume, s) for s in seeds],
                progress)


def check_selection(cfg: VadClipConfig) -> None:
    # a dataset with its own validation split (ubnormal) needs no held-out training videos
    if cfg.eval.selection == "val" and cfg.data.val_fraction <= 0 and not has_validation_split(cfg.style):
        raise ConfigError("eval.selection='val' needs data.val_fraction > 0 (or use selection 'test')")


def _fit(cfgs: Sequence[VadClipConfig], data: VadDataset, out_dirs: Sequence[Path], callbacks: Sequence[GroupCallback],
         resume: Sequence[str | Path] | None, progress: bool) -> list[FitResult]:
    """The loop of `fit` and `fit_fused`: one seed, or k seeds stepping together."""
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfgs[0].device)
    trainer = _Trainer(cfgs, data, device, out_dirs)
    members, k = trainer.members, len(cfgs)
    if resume is not None:
        start_epoch, histories, evaluations = trainer.resume(resume)
    else:
        start_epoch, histories, evaluations = 0, [[] for _ in members], [[] for _ in members]
    for member in members:
        atomic_write_text(json.dumps(flatten(member.cfg), indent=1, default=list), member.out_dir / "config.json")
        if resume is None:
            member.best.save(0)  # untrained weights until a first evaluation beats them
    started, in_callbacks = time.perf_counter(), 0.0
    for epoch in range(start_epoch, cfgs[0].optim.epochs):
        first_step = int(histories[0][-1].get("step", 0)) if histories[0] else 0
        records, improved, stepwise = trainer.train_epoch(epoch, first_step, progress)
        epoch_records = []
        for i, member in enumerate(members):
            record = records[i]
            if evaluates_at_epoch_end(member.cfg, len(stepwise[i])):
                record.update(member.evaluate_both(data, device))
                improved[i] = member.best.consider(_selection_score(record, member.cfg), epoch + 1) or improved[i]
            else:  # the authors' UCF loop tests in the loop only: the record repeats the epoch's last evaluation
                record.update(split_metrics(stepwise[i][-1]))
            if member.cfg.eval.reload_best:  # the authors continue each epoch from the best weights so far
                load_weights(member.model, member.best.state)
            record["epoch"] = epoch + 1
            histories[i].append(record)
            evaluations[i] += stepwise[i]
            trainer.save_last(i, epoch + 1, histories[i], evaluations[i])
            epoch_records.append(EpochRecord(epoch + 1, record, improved[i], member.out_dir, stepwise[i]))
        called = time.perf_counter()
        for callback in callbacks:
            callback(epoch_records)
        in_callbacks += time.perf_counter() - called
    finals = [trainer.final_metrics(i) for i in range(k)]
    for member, (result, _) in zip(members, finals):
        atomic_write_text(json.dumps(result, indent=1, allow_nan=True), member.out_dir / "metrics.json")
    seconds = (time.perf_counter() - started - in_callbacks) / k  # a fused seed's share
    return [FitResult(result, histories[i], members[i].out_dir, preds, members[i].model, evaluations[i], seconds)
            for i, (result, preds) in enumerate(finals)]


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
    fresh = not Path(args.out).exists()  # bad input must leave no empty --out folder behind
    try:
        cfg = config_from_args(args)
        if argv is None:  # a command line: portable kernels and BLAS, re-executed with them if need be
            from vadclip.portable import pin_cli

            kernels = pin_cli(cfg)
            if kernels is not None:
                print(f"portable kernels: {kernels.describe()}", flush=True)
        check_out_dir(Path(args.out), args.resume, args.overwrite)
        check_selection(cfg)  # before the data: a first load packs the feature cache (minutes on real data)
        data = load_dataset(cfg)
        print(describe(data), flush=True)  # once, here: not in fit, which every study trial runs
        result = fit(cfg, data, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
    except (VadClipError, FileNotFoundError) as err:
        if fresh and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(metrics_table(result.metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
