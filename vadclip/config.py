"""One typed config for the trainer, the studies and MLflow params.

Field defaults are the authors' code (nwpu-zxr/VadCLIP); presets (`ucf`, `xd`, `sht`, `ubnormal`, `synthetic`)
are data: dotted overrides on top of the defaults, each with an `official` (code) variant and, where the paper
gives one, a `paper` (paper text) variant. A study YAML overrides the same dotted names; MLflow params are
`flatten(config)`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from vadclip.errors import VadClipError

Temporal = Literal["none", "local", "global_tf", "gcn", "local+gcn", "global_tf+gcn", "local+global_tf"]
Branches = Literal["c", "a", "c+a"]
TEMPORAL: tuple[str, ...] = typing.get_args(Temporal)
BRANCHES: tuple[str, ...] = typing.get_args(Branches)


class ConfigError(VadClipError, ValueError):
    """A config key or value that is not allowed; the message names the key and what is allowed."""


@dataclass(frozen=True)
class ClipConfig:
    # open_clip model name; `ViT-B-16-quickgelu` is OpenAI's ViT-B/16 (the authors' CLIP, QuickGELU);
    # open_clip `ViT-B-16` is the same shape with exact GELU (for non-OpenAI checkpoints, e.g. LAION).
    # `vadclip-tiny` is a small random text tower for tests and the synthetic preset.
    model: str = "ViT-B-16-quickgelu"
    weights: str | None = None  # local open_clip or OpenAI checkpoint; None = random (loud warning)


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 512  # d: CLIP feature width
    visual_length: int = 256  # snippets per training sample / test chunk
    temporal: Temporal = "local+gcn"  # Table 5 rows; local+gcn = LGT-Adapter
    branches: Branches = "c+a"  # Table 6
    # Local module (local transformer encoder)
    local_layers: int = 1  # code: UCF 2, XD 1; paper: "a transformer encoder layer"
    heads: int = 1
    mlp_ratio: int = 4
    window: int = 64  # local window length (code/paper: UCF 8, XD 64)
    window_overlap: bool = False  # code: non-overlapping blocks; paper: overlapping windows
    position_embedding: bool = True  # code: learnable frame position embedding (not in paper)
    global_tf_layers: int = 1  # layers of the global transformer in the Table 5 ablations
    # Global module (GCN)
    gcn: Literal["two_stack", "single_weight"] = "two_stack"  # code: 2x2-layer stacks; paper Eq. 1
    similarity_threshold: float = 0.7  # Eq. 2 thresholding (value not in paper)
    similarity_filter: Literal["zero", "drop"] = "zero"  # code: weak -> 0 (still softmaxed); drop
    distance_kernel: Literal["exp", "softmax"] = "exp"  # code: exp(-|i-j|/s); paper Eq. 3 softmax
    sigma: float = math.e  # Eq. 3 sigma; code hard-codes e, paper says 1
    # A-branch prompts
    prompt: Literal["learnable", "handcrafted"] = "learnable"  # Table 7
    prompt_prefix: int = 10  # learnable context tokens before the class tokens
    prompt_postfix: int = 10  # ... and after; context length l = prefix + postfix (paper: 20)
    handcrafted_template: str = "a video frame of {}."
    visual_prompt: Literal["anomaly_focus", "average", "none"] = "anomaly_focus"  # Table 7
    visual_prompt_weights: Literal["logits", "sigmoid"] = "logits"  # code raw logits; paper A (Eq. 6)
    text_ffn_residual: Literal["prompted", "class"] = "prompted"  # code T=(t+V)+FFN; paper Eq. 7 +t
    temperature: float = 0.07  # tau, Eq. 8


@dataclass(frozen=True)
class LossConfig:
    cts_weight: float = 1e-4  # lambda, Eq. 10 (UCF 0.1, XD 1e-4)
    cts_form: Literal["abs_mean", "hinge_sum"] = "abs_mean"  # code mean|cos|; paper Eq. 9
    topk_divisor: int = 16  # k = floor(len / divisor) + 1 (code's rule)
    topk_fixed: int = 0  # > 0: a fixed k instead of the length rule


@dataclass(frozen=True)
class SyntheticConfig:
    style: Literal["ucf", "xd"] = "xd"
    train_normal: int = 48
    train_abnormal: int = 48
    test_normal: int = 16
    test_abnormal: int = 24
    crops: int = 2
    min_length: int = 24
    max_length: int = 300  # some videos exceed visual_length (pooling and chunking paths)
    noise: float = 1.0
    signal: float = 0.5  # per-snippet anomaly strength, in noise units: weak alone, clear in context


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["ucf", "xd", "sht", "ubnormal", "synthetic"] = "xd"
    lists: str | None = None  # the authors' list/ folder (official file names)
    features: str | None = None  # where the feature .npy files were unpacked
    cache_dir: str | None = None  # synthetic: where the generated layout is written
    test_crop: str = "default"  # default (UCF 5, XD 0, sht/ubnormal 0) | 0..9 | mean
    # training *videos* held out for model selection; ubnormal: 0, it validates on its own validation list
    val_fraction: float = 0.1
    in_memory: bool = True  # False = read every sample from disk each step (the authors' way)
    # in memory through a packed, memory-mapped cache built once per layout (vadclip.data.cache); False = read
    # every file at each load (the same float32 values). Unused when in_memory is False.
    feature_cache: bool = True
    cache_dtype: Literal["float32", "float16"] = "float32"  # of the cache: float16 halves it (lossy)
    on_device: bool = True  # CUDA: the training features resident on the GPU when they fit, else pinned host memory
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01  # AdamW default
    milestones: tuple[int, ...] = (3, 6, 10)
    gamma: float = 0.1
    epochs: int = 10
    batch_size: int = 96  # mixed: whole batch; balanced: per side (64 normal + 64 abnormal)
    sampler: Literal["balanced", "mixed"] = "mixed"  # UCF balanced, XD mixed
    max_steps_per_epoch: int = 0  # > 0: cap the steps of an epoch (smoke and bench runs at full scale); 0 = no cap
    recompute_activations: bool = False  # exact: less memory per trial, one more forward (vadclip/model/recompute.py)
    # speed (docs/speed.md); every default is the float32 eager path the exactness tests pin
    compile: bool = False  # torch.compile of the training forward (exact to rounding); no backend: eager, 1 warning
    precision: Literal["float32", "bf16", "fp16"] = "float32"  # autocast (training, evaluation); fp16 + loss scaler
    tf32: bool = False  # CUDA: TF32 matmuls and cuDNN convolutions; False = full float32 (cuDNN's TF32 off too)
    adamw: Literal["default", "foreach", "fused"] = "default"  # AdamW kernel; default = torch's choice (the authors')


@dataclass(frozen=True)
class EvalConfig:
    score_branch: Literal["auto", "c", "a", "best"] = "auto"  # auto: XD A-branch, the others C-branch
    selection: Literal["val", "test"] = "val"  # test = the authors' best-on-test protocol
    selection_metric: Literal["auto", "auc", "ap"] = "auto"  # auto: XD ap, the others (UCF, sht, ubnormal) auc
    # When to evaluate within an epoch (docs/deviations.md, "evaluation cadence"). `authors`: as ucf_train.py,
    # after 0-based iteration i of the epoch when i * samples per step % eval_every_samples == 0 and i > 0, and at
    # the epoch end only when the epoch had no such evaluation (xd_train.py: every epoch end). `steps`: after every
    # eval_every_steps steps (1-based) and at every epoch end.
    cadence: Literal["authors", "steps"] = "authors"
    eval_every_samples: int = 0  # cadence authors: > 0 evaluate every N training samples (UCF code: 1280)
    eval_every_steps: int = 0  # cadence steps: > 0 also evaluate every N steps
    reload_best: bool = True  # code reloads the best checkpoint at every epoch end
    map_protocol: Literal["official", "paper"] = "official"
    max_plot_videos: int = 4


@dataclass(frozen=True)
class VadClipConfig:
    preset: str = "xd"
    variant: Literal["official", "paper"] = "official"
    seed: int = 234
    device: str = "auto"  # auto = cuda when present
    # a CPU run on kernels pinned to give the same bits on any x86-64 machine (vadclip/portable.py); GPU runs ignore it
    portable_kernels: bool = False
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def style(self) -> str:
        """Label/class convention of the data: `ucf`, `xd`, `sht` or `ubnormal` (synthetic: its twin's)."""
        return self.data.synthetic.style if self.data.dataset == "synthetic" else self.data.dataset

    @property
    def score_branch(self) -> str:
        if self.eval.score_branch != "auto":
            return self.eval.score_branch
        if self.model.branches != "c+a":
            return self.model.branches
        return "a" if self.style == "xd" else "c"  # sht/ubnormal: as UCF, whose preset they take

    @property
    def selection_metric(self) -> str:
        if self.eval.selection_metric != "auto":
            return self.eval.selection_metric
        return auto_metric(self.style)

    @property
    def objective_key(self) -> str:
        """The evaluation key a trial selects its checkpoint by (and a search optimises): `val/<m>` or `test/<m>`."""
        return f"{self.eval.selection}/{self.selection_metric}"


def auto_metric(style: str) -> str:
    """A dataset's headline metric (eval.selection_metric auto, a study's metric auto): XD-Violence AP, the
    others (UCF-Crime, ShanghaiTech, UBnormal) frame AUC."""
    return "ap" if style == "xd" else "auc"


# ---------------------------------------------------------------- presets (data, not code)

_UCF = {
    "data.dataset": "ucf",
    "clip.model": "ViT-B-16-quickgelu",  # OpenAI's ViT-B/16, as the authors' code
    "model.local_layers": 2,
    "model.window": 8,
    "loss.cts_weight": 0.1,
    "optim.lr": 2e-5,
    "optim.milestones": (4, 8),
    "optim.batch_size": 64,
    "optim.sampler": "balanced",
    "eval.eval_every_samples": 1280,  # 10 steps of 64 + 64, from each epoch's step 0
    "eval.eval_every_steps": 10,  # read by eval.cadence=steps only
}
_XD: dict[str, Any] = {"data.dataset": "xd", "clip.model": "ViT-B-16-quickgelu"}
# About 15 s per run on 2 CPU cores; XD-style by default (the paper's ablations). d = 64 and 400
# training videos: at d = 128 with 200 videos the full model memorised the video labels (train BCE
# 0.2, test AUC ~0.6); here LGT reaches test AUC ~0.9 and the no-temporal baseline ~0.6.
_SYNTHETIC = {
    "data.dataset": "synthetic",
    "clip.model": "vadclip-tiny",
    "model.embed_dim": 64,
    "model.visual_length": 128,
    "model.window": 16,
    "loss.cts_weight": 1e-4,
    "data.synthetic.train_normal": 200,
    "data.synthetic.train_abnormal": 200,
    "data.synthetic.signal": 2.0,
    "optim.lr": 3e-4,
    "optim.epochs": 6,
    "optim.milestones": (5,),
    "optim.batch_size": 16,
    "optim.sampler": "mixed",
    "portable_kernels": True,  # its tables are the same on every x86-64 machine (docs/reproducibility.md)
    "eval.cadence": "steps",  # no in-loop evaluation by default (as XD's); eval.eval_every_steps probes count steps
}
# ShanghaiTech (weak split) and UBnormal: the UCF official hyper-parameters (surveillance benchmarks like
# UCF-Crime; no source gives VadCLIP's settings on them, docs/decisions.md). UBnormal trains on all its training
# videos and validates on its own validation list (frame ground truth), so none are held out.
_SHT = {**_UCF, "data.dataset": "sht"}
_UBNORMAL = {**_UCF, "data.dataset": "ubnormal", "data.val_fraction": 0.0}
# Paper text: hyper-parameters of Implementation Details plus every paper-text alternative.
_PAPER_SWITCHES = {
    "model.local_layers": 1,
    "model.window_overlap": True,
    "model.position_embedding": False,
    "model.gcn": "single_weight",
    "model.similarity_filter": "drop",
    "model.distance_kernel": "softmax",
    "model.sigma": 1.0,
    "model.visual_prompt_weights": "sigmoid",
    "model.text_ffn_residual": "class",
    "loss.cts_form": "hinge_sum",
    "eval.score_branch": "best",
    "eval.map_protocol": "paper",
    "eval.reload_best": False,
    "eval.eval_every_samples": 0,
    "eval.eval_every_steps": 0,
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ucf": {
        "official": _UCF,
        "paper": {**_UCF, **_PAPER_SWITCHES, "optim.lr": 1e-5, "optim.epochs": 10,
                  "optim.batch_size": 32},  # 64 per step = 32 normal + 32 abnormal
    },
    "xd": {
        "official": _XD,
        "paper": {**_XD, **_PAPER_SWITCHES, "optim.lr": 2e-5, "optim.epochs": 20,
                  "optim.batch_size": 64, "optim.milestones": (6, 12, 20)},
    },
    # the paper has no sht/ubnormal settings: `paper` is its text's switches with UCF-Crime's paper values, as
    # `official` is UCF-Crime's code values (docs/decisions.md)
    "sht": {"official": _SHT, "paper": {**_SHT, **_PAPER_SWITCHES, "optim.lr": 1e-5, "optim.epochs": 10,
                                        "optim.batch_size": 32}},
    "ubnormal": {"official": _UBNORMAL, "paper": {**_UBNORMAL, **_PAPER_SWITCHES, "optim.lr": 1e-5,
                                                  "optim.epochs": 10, "optim.batch_size": 32}},
    "synthetic": {
        "official": _SYNTHETIC,
        "paper": {**_SYNTHETIC, **_PAPER_SWITCHES},
    },
}


def preset(name: str, variant: str = "official", overrides: dict[str, Any] | None = None) -> VadClipConfig:
    """Build a config from a preset name, a variant and dotted overrides (`{"model.window": 16}`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    if variant not in PRESETS[name]:
        raise ConfigError(f"unknown variant {variant!r} for preset {name!r}; expected one of "
                          f"{sorted(PRESETS[name])}")
    values = {"preset": name, "variant": variant, **PRESETS[name][variant], **(overrides or {})}
    return apply_overrides(VadClipConfig(), values)


# ---------------------------------------------------------------- dotted access, validation


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(path: str, root: type = VadClipConfig) -> Any:
    """The type annotation of a dotted field; ConfigError naming the allowed keys if unknown."""
    cls, parts = root, path.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"unknown key {path!r}: {where} has {sorted(hints)}")
        tp = hints[part]
        if i < len(parts) - 1:
            if not (isinstance(tp, type) and is_dataclass(tp)):
                raise ConfigError(f"unknown key {path!r}: {'.'.join(parts[: i + 1])} is not a section")
            cls = tp
    return tp


def choices(path: str) -> tuple[str, ...] | None:
    """Allowed values of a Literal field, else None."""
    tp = field_type(path)
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


def coerce(path: str, value: Any) -> Any:
    """Convert `value` (possibly a CLI string) to the type of field `path`, or raise ConfigError."""
    tp = field_type(path)
    allowed = choices(path)
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"{path}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int)):
                raise TypeError
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            if isinstance(value, (int, float)):
                value = [value]
            return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{path}: cannot set a value of type {tp}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{path}: expected {name}{' or null' if optional else ''}, got {value!r}")


def get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def apply_overrides(cfg: VadClipConfig, overrides: dict[str, Any]) -> VadClipConfig:
    """Return a new config with dotted keys replaced (values coerced and validated)."""
    nested: dict[str, Any] = {}
    for path, value in overrides.items():
        node = nested
        parts = path.split(".")
        coerced = coerce(path, value)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = coerced

    def rebuild(obj: Any, changes: dict[str, Any], validate_root: bool) -> Any:
        kw = {k: rebuild(getattr(obj, k), v, False) if isinstance(v, dict) else v
              for k, v in changes.items()}
        return replace(obj, **kw)

    return rebuild(cfg, nested, True)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model.window": 64, ...}`: the form used for MLflow params and study overrides."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def from_flat(flat: dict[str, Any]) -> VadClipConfig:
    """Inverse of `flatten` (used to rebuild a config from a checkpoint or a Tune trial)."""
    return apply_overrides(VadClipConfig(), flat)


def _check_cadence(e: EvalConfig) -> None:
    """An in-loop interval that the cadence does not read, set alone, would be ignored: refuse it."""
    own, other = (("eval_every_samples", "eval_every_steps") if e.cadence == "authors"
                  else ("eval_every_steps", "eval_every_samples"))
    if getattr(e, other) > 0 and getattr(e, own) == 0:
        cadence = "steps" if e.cadence == "authors" else "authors"
        raise ConfigError(f"eval.{other}={getattr(e, other)} is read by eval.cadence={cadence!r} only, and "
                          f"eval.cadence is {e.cadence!r}; set eval.cadence={cadence} or eval.{own}")


def validate(cfg: VadClipConfig) -> None:
    """Cross-field rules; single-field rules are enforced by `coerce`."""
    m, o, d, loss = cfg.model, cfg.optim, cfg.data, cfg.loss
    positive = {"model.embed_dim": m.embed_dim, "model.visual_length": m.visual_length,
                "model.heads": m.heads, "model.mlp_ratio": m.mlp_ratio,
                "model.window": m.window, "optim.epochs": o.epochs, "optim.batch_size": o.batch_size,
                "loss.topk_divisor": loss.topk_divisor}
    for key, n in positive.items():
        if n < 1:
            raise ConfigError(f"{key} must be >= 1, got {n}")
    for key, value in {"model.sigma": m.sigma, "model.temperature": m.temperature}.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if m.window > m.visual_length:
        raise ConfigError(f"model.window ({m.window}) must be <= model.visual_length ({m.visual_length})")
    if not m.window_overlap and m.visual_length % m.window:
        raise ConfigError(f"model.window ({m.window}) must divide model.visual_length "
                          f"({m.visual_length}) for non-overlapping windows")
    if m.embed_dim % (2 * m.heads):
        raise ConfigError(f"model.embed_dim ({m.embed_dim}) must be divisible by 2*model.heads")
    for key in ("model.local_layers", "model.global_tf_layers", "model.prompt_prefix",
                "model.prompt_postfix", "loss.topk_fixed", "eval.eval_every_samples", "eval.eval_every_steps",
                "optim.max_steps_per_epoch"):
        if get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(cfg, key)}")
    _check_cadence(cfg.eval)
    if m.prompt_prefix + m.prompt_postfix > 60:
        raise ConfigError("model.prompt_prefix + model.prompt_postfix must leave room in CLIP's 77 tokens")
    if "local" in m.temporal and m.local_layers < 1:
        raise ConfigError(f"model.temporal={m.temporal!r} needs model.local_layers >= 1")
    if m.branches == "a" and m.visual_prompt == "anomaly_focus":
        raise ConfigError("model.visual_prompt='anomaly_focus' needs the C-branch (model.branches 'c+a'); "
                          "use 'average' or 'none' with branches='a'")
    if m.branches != "c+a" and cfg.eval.score_branch not in ("auto", m.branches):
        raise ConfigError(f"eval.score_branch={cfg.eval.score_branch!r} is not trained with "
                          f"model.branches={m.branches!r}")
    if "{}" not in m.handcrafted_template:
        raise ConfigError("model.handcrafted_template must contain '{}' for the class name")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.test_crop not in ("default", "mean") and not (d.test_crop.isdigit() and int(d.test_crop) < 10):
        raise ConfigError(f"data.test_crop: unknown value {d.test_crop!r}; allowed: default, mean, 0..9")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device: unknown value {cfg.device!r}; allowed: auto, cpu, cuda[:N]")
    if list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones must be increasing, got {list(o.milestones)}")
    if d.dataset == "synthetic" and (d.lists or d.features):  # never record a folder that is not read
        raise ConfigError(f"data.lists/data.features ({d.lists or d.features}) are set but data.dataset is "
                          "synthetic; pass --dataset ucf or --dataset xd")
    s = d.synthetic
    if not 1 <= s.min_length <= s.max_length:
        raise ConfigError(f"data.synthetic: need 1 <= min_length <= max_length, got {s.min_length}, "
                          f"{s.max_length}")
    if not 1 <= s.crops <= 10:
        raise ConfigError(f"data.synthetic.crops must be in 1..10, got {s.crops}")
