"""Command-line flags that become config overrides, shared by `python -m vadclip.train` and `python -m study.run`.

Each override remembers the flag it came from, so an invalid value is blamed on that flag, not on a preset or
a study YAML.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vadclip.config import ConfigError
from vadclip.data.conventions import list_files
from vadclip.errors import Parser as Parser  # its home is vadclip.errors (the data layer's CLIs use it too)
from vadclip.errors import VadClipError

DATA_STYLES = ("ucf", "xd", "sht", "ubnormal")  # real datasets, recognised by their official list file names


@dataclass(frozen=True)
class Override:
    key: str  # dotted config key
    value: Any
    flag: str  # as the user wrote it, e.g. `--set model.window=8`, `--max-epochs 2`


def add_config_flags(parser: argparse.ArgumentParser, epochs_flag: str = "--epochs") -> None:
    """--dataset, --lists, --features, --clip-weights, the epochs flag and repeatable --set KEY=VALUE."""
    parser.add_argument("--dataset", help="synthetic | ucf | xd | sht | ubnormal (default: inferred from --lists, "
                                          "else the preset)")
    parser.add_argument("--lists", help="the authors' list/ folder (official file names)")
    parser.add_argument("--features", help="where the feature .npy files were unpacked")
    parser.add_argument("--clip-weights", help="local open_clip or OpenAI ViT-B/16 checkpoint")
    parser.add_argument(epochs_flag, dest="epochs", type=positive_int, help="epochs per run")
    parser.set_defaults(epochs_flag=epochs_flag)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides, repeatable, e.g. --set model.window=16 --set optim.lr=1e-4")


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type for counts where 0 switches a thing off."""
    return _int_at_least(text, 0)


def parse_set(items: Sequence[str]) -> list[Override]:
    """`KEY=VALUE` strings; a key given twice keeps the last value (as every repeated flag does)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out.append(Override(key.strip(), value.strip(), f"--set {item}"))
    return out


def flag_overrides(args: argparse.Namespace) -> list[Override]:
    """The overrides given by `add_config_flags`'s flags (and --seed/--device where a CLI has them)."""
    out = []
    for dest, key in (("lists", "data.lists"), ("features", "data.features"), ("clip_weights", "clip.weights"),
                      ("epochs", "optim.epochs"), ("seed", "seed"), ("device", "device")):
        value = getattr(args, dest, None)
        if value is not None:
            flag = args.epochs_flag if dest == "epochs" else "--" + dest.replace("_", "-")
            out.append(Override(key, value, f"{flag} {value}"))
    return out + parse_set(args.set)


def infer_dataset(dataset: str | None, lists: str | None) -> str | None:
    """The dataset a run uses: --dataset, else the one whose official list files are in --lists; None when
    neither is given (the preset decides). `--lists` without a recognisable list file is an error, so a real
    folder is never recorded while synthetic data is used."""
    if dataset is not None or lists is None:
        return dataset
    folder = Path(lists)
    found = [style for style in DATA_STYLES if (folder / list_files(style)["train"]).is_file()]
    if len(found) == 1:
        return found[0]
    expected = ", ".join(list_files(s)["train"] for s in DATA_STYLES)
    what = f"{', '.join(list_files(s)['train'] for s in found)}" if found else "none"
    raise ConfigError(f"--lists {lists}: holds {what} of {expected}, expected exactly one; pass --dataset "
                      f"{' | '.join(DATA_STYLES)}")


def as_dict(overrides: Sequence[Override]) -> dict[str, Any]:
    return {o.key: o.value for o in overrides}


def blame(flags: Sequence[Override], build: Callable[[list[Override]], Any]) -> str:
    """The flag(s) that make a build fail: each one that fails alone, else all of them (a combination)."""
    alone = []
    for flag in flags:
        try:
            build([flag])
        except VadClipError:
            alone.append(flag.flag)
    return " ".join(alone or [f.flag for f in flags])
