"""The trainer's settings: schema with defaults, config file + CLI overrides, validation.

Precedence: schema defaults < config file < command-line options. A config file
is InternEvo-shaped (``parallel=dict(tensor=dict(size=2, mode="isp"), ...)``,
``data=dict(seq_len=..., micro_num=...)``, ``model=dict(...)``, ``lr = ...``).
Names in UPPER_CASE or starting with ``_`` are file-local variables, not settings.
``model=dict(...)`` holds three trainer keys (``checkpoint``, ``dtype``,
``init_std``); every other key there overrides the model's transformers config.
"""

from __future__ import annotations

import ast
import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .pyconfig import read_config_file

NUMBER = (int, float)
DTYPES = ("auto", "float32", "float64", "bfloat16")
OVERFLOW = ("auto", "error", "split", "truncate")


@dataclass(frozen=True)
class Option:
    default: Any
    types: tuple[type, ...]
    choices: tuple | None = None
    minimum: float | None = None
    help: str = ""


SCHEMA: dict[str, Any] = {
    "seed": Option(42, (int,), help="seed for init and data order"),
    "total_steps": Option(30, (int,), minimum=1, help="optimizer steps"),
    "lr": Option(3e-3, NUMBER, minimum=0, help="peak learning rate"),
    "min_lr": Option(None, NUMBER, minimum=0, help="final cosine learning rate (default lr/10)"),
    "warmup_steps": Option(None, (int,), minimum=0, help="linear warmup steps (default 10% of total_steps)"),
    "weight_decay": Option(0.01, NUMBER, minimum=0),
    "adam_betas": Option((0.9, 0.95), (tuple, list)),
    "adam_eps": Option(1e-8, NUMBER, minimum=0),
    "clip_grad_norm": Option(1.0, NUMBER, minimum=0, help="0 disables clipping (the norm is still reported)"),
    "loss_chunk": Option(0, (int,), minimum=0, help="tokens per chunk of the LM loss, whose logits never exist whole; 0 = off"),
    "model_path": Option(None, (str,), help="local HF checkpoint dir to start from"),
    "allow_missing_weights": Option(False, (bool,), help="train even if --model-path lacks some of the model's weights"),
    "out": Option(None, (str,), help="run directory (default runs/<model>)"),
    "checkpoint_every": Option(0, (int,), minimum=0, help="0: only at the end"),
    "keep_checkpoints": Option(2, (int,), minimum=1),
    "resume": Option("auto", (str,), help="auto | never | PATH"),
    "export": Option(None, (str,), help="write an HF checkpoint here at the end"),
    "log_every": Option(10, (int,), minimum=1, help="progress line interval when stderr is not a terminal"),
    "parallel": {
        "tensor": {"size": Option(1, (int,), minimum=1), "mode": Option("isp", (str,), choices=("isp",))},
        "weight": {"size": Option(1, (int,), minimum=1)},
        "zero1": {"size": Option(-1, (int,))},
        "pipeline": {"size": Option(1, (int,), choices=(1,), help="pipeline parallelism is not supported")},
    },
    "data": {
        "train_folder": Option(None, (str,), help="jsonl / parquet / datasets dir; llava: image+text jsonl; flux: .safetensors dir (default: embedded data)"),
        "tokenizer_path": Option(None, (str,), help="local tokenizer dir (default: embedded BPE)"),
        "text_field": Option("text", (str,)),
        "seq_len": Option(512, (int,), minimum=2),
        "micro_bsz": Option(1, (int,), minimum=1, help="packed rows per micro-batch"),
        "micro_num": Option(4, (int,), minimum=1, help="micro-batches per step (grad accumulation)"),
        "use_packed_dataset": Option(True, (bool,)),
        "overflow": Option("auto", (str,), choices=OVERFLOW, help="documents longer than seq_len"),
    },
    "model": {
        "checkpoint": Option(False, (bool,), help="activation checkpointing"),
        "compile": Option(None, (bool,), help="torch.compile each decoder layer (auto: on a GPU)"),
        "fused_loss": Option(None, (bool,), help="the output projection fused into the cross entropy (auto: on a GPU)"),
        "attention_backend": Option("auto", (str,), choices=("auto", "fa4", "flash_attn", "torch_varlen", "reference"),
                                    help="varlen attention kernel (auto: the fastest that can run here)"),
        "dtype": Option("auto", (str,), choices=DTYPES, help="auto: bf16 compute over float32 weights on GPU, float32 on CPU"),
        "init_std": Option(0.02, NUMBER, minimum=0),
    },
}
# Sections whose unknown keys are passed on instead of rejected.
OPEN_SECTIONS = {("model",)}
# InternEvo lets a parallel size be written as a bare int: tensor=2.
SIZE_SHORTHAND = {("parallel", name) for name in SCHEMA["parallel"]}


def defaults(schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    return {k: defaults(v) if isinstance(v, Mapping) else copy.deepcopy(v.default) for k, v in schema.items()}


def _did_you_mean(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(prefix + k for k in sorted(known))}"


def _check_value(path: str, option: Option, value: Any) -> Any:
    if value is None and option.default is None:
        return None
    if isinstance(value, bool) and bool not in option.types:
        raise ConfigError(f"{path} must be {_type_names(option)}, got {value!r}")
    if not isinstance(value, option.types):
        raise ConfigError(f"{path} must be {_type_names(option)}, got {value!r}")
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{path} must be one of {', '.join(map(str, option.choices))}, got {value!r}")
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f"{path} must be >= {option.minimum}, got {value!r}")
    return value


def _type_names(option: Option) -> str:
    return " or ".join(t.__name__ for t in option.types)


def merge(tree: dict[str, Any], updates: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA, where: tuple[str, ...] = ()) -> None:
    """Validate ``updates`` against ``schema`` and write them into ``tree``."""
    prefix = "".join(f"{w}." for w in where)
    for key, value in updates.items():
        path = prefix + str(key)
        if key not in schema:
            if where in OPEN_SECTIONS:
                tree[key] = value
                continue
            raise ConfigError(f"unknown config key {path!r}" + _did_you_mean(str(key), list(schema), prefix))
        spec = schema[key]
        if isinstance(spec, Mapping):
            if (*where, key) in SIZE_SHORTHAND and isinstance(value, int) and not isinstance(value, bool):
                value = {"size": value}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path} must be a dict(...), got {value!r}")
            merge(tree[key], value, spec, (*where, key))
        else:
            tree[key] = _check_value(path, spec, value)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one ``section.key=value`` override with the same validation as a file."""
    *parents, leaf = dotted.split(".")
    update: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        update = {parent: update}
    merge(tree, update)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``'data.seq_len=256'`` -> ``('data.seq_len', 256)``; non-literals stay strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def file_settings(path: str | Path) -> dict[str, Any]:
    """A config file's settings: every assigned name that is not a file-local variable."""
    names = read_config_file(path)
    return {k: v for k, v in names.items() if not (k.isupper() or k.startswith("_"))}


@dataclass(frozen=True)
class TrainConfig:
    """Resolved settings, flat, as the trainer uses them."""

    model_name: str
    tree: dict[str, Any] = field(repr=False)  # the nested form, saved with each run

    def __getattr__(self, name: str) -> Any:
        try:
            path = _FLAT[name]
        except KeyError:
            raise AttributeError(name) from None
        node: Any = self.tree
        for part in path:
            node = node[part]
        return node

    # -- derived values ----------------------------------------------------------------

    @property
    def sp(self) -> int:
        return self.tree["parallel"]["tensor"]["size"]

    @property
    def wp(self) -> int:
        return self.tree["parallel"]["weight"]["size"]

    @property
    def final_lr(self) -> float:
        return float(self.min_lr) if self.min_lr is not None else float(self.lr) / 10

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.total_steps)
        return max(1, round(0.1 * self.total_steps))

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.model_name

    @property
    def model_overrides(self) -> dict[str, Any]:
        reserved = SCHEMA["model"]
        return {k: v for k, v in self.tree["model"].items() if k not in reserved}


_FLAT = {
    **{k: (k,) for k, v in SCHEMA.items() if not isinstance(v, Mapping)},
    "zero1": ("parallel", "zero1", "size"),
    "data_path": ("data", "train_folder"),
    "tokenizer_path": ("data", "tokenizer_path"),
    "text_field": ("data", "text_field"),
    "seq_len": ("data", "seq_len"),
    "micro_bsz": ("data", "micro_bsz"),
    "micro_num": ("data", "micro_num"),
    "packed": ("data", "use_packed_dataset"),
    "overflow": ("data", "overflow"),
    "activation_checkpointing": ("model", "checkpoint"),
    "compile": ("model", "compile"),
    "fused_loss": ("model", "fused_loss"),
    "attention_backend": ("model", "attention_backend"),
    "dtype": ("model", "dtype"),
    "init_std": ("model", "init_std"),
}


def resolve_config(
    model_name: str,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    assignments: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Defaults, then the file, then ``overrides`` (dotted keys), then ``--set`` assignments."""
    tree = defaults()
    if config_file is not None:
        merge(tree, file_settings(config_file))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, dotted, value)
    for text in assignments:
        set_dotted(tree, *parse_assignment(text))
    betas = tree["adam_betas"]
    if len(betas) != 2 or not all(isinstance(b, NUMBER) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
    return TrainConfig(model_name=model_name, tree=tree)


def check_world_size(cfg: TrainConfig, world: int) -> None:
    """Each parallel size must divide the number of processes."""
    hint = " (start more processes with --nproc N or torchrun)" if world == 1 else ""
    for name, flag, size in (("tensor", "--sp", cfg.sp), ("weight", "--wp", cfg.wp)):
        if world % size:
            raise ConfigError(f"parallel.{name}.size={size} ({flag}) does not divide the world size {world}{hint}")
    zero1 = cfg.zero1
    if zero1 > 1 and world % zero1:
        raise ConfigError(f"parallel.zero1.size={zero1} does not divide the world size {world}")
