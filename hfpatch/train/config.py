"""The trainer's settings: one typed declaration each, read from defaults, a config file and the CLI.

Every setting is declared once, in ``SETTINGS``: config key, default, type and limits, help,
command-line flag, and the InternEvo key(s) it is read from. The click options of
``hfpatch train``, the flat accessors (``cfg.seq_len``), validation and the InternEvo key
mapping are all generated from that table; a new setting is one more ``Setting(...)``.

Precedence: defaults < config file < command-line options < ``--set KEY=VALUE``. A config
file is InternEvo-shaped (``parallel=dict(tensor=dict(size=2, mode="isp"), ...)``,
``data=dict(seq_len=...)``, ``model=dict(...)``, ``lr = ...``); names in UPPER_CASE or
starting with ``_`` are file-local variables. ``model=dict(...)`` holds the trainer keys
(``checkpoint``, ``compile``, ``dtype``, ...); every other key there overrides the
model's transformers config. InternEvo's own files are read too (``internevo.py`` says how).
"""

from __future__ import annotations

import ast
import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import hub, internevo
from .errors import ConfigError
from .pyconfig import read_config_file

NUMBER = (int, float)
DTYPES = ("auto", "float32", "float64", "bfloat16")
OVERFLOW = ("auto", "error", "split", "truncate")
TENSOR_MODES = ("isp", "mtp", "msp", "fsp")  # InternEvo's; only isp may have size > 1 here


@dataclass(frozen=True)
class InternEvoKey:
    """An InternEvo key read into a setting; ``convert(value, its section in the file, key)`` -> ours."""

    path: str
    convert: Callable[[Any, Mapping[str, Any], str], Any] | None = None


@dataclass(frozen=True)
class Setting:
    key: str  # dotted config key
    default: Any
    types: tuple[type, ...]
    help: str
    name: str = ""  # flat accessor, cfg.<name>; default: the key's last part
    flag: str | None = None  # `hfpatch train` option ("--seq-len", "--packed/--padded"); None: file / --set only
    metavar: str | None = None
    default_help: str | None = None  # the default as --help shows it, where not the value itself
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    # InternEvo keys read into it: for a sequence setting, one per element, in order
    internevo: tuple[str | InternEvoKey, ...] = ()
    convert: Callable[[Any, str], Any] | None = None  # other spellings of a value (file and --set), e.g. "torch.bfloat16"
    hub: str | None = None  # "model" / "dataset": a hub repo id resolves through the local HF cache

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.key.rsplit(".", 1)[-1])

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))

    @property
    def flag_name(self) -> str | None:
        return self.flag.split("/")[0] if self.flag else None

    def check(self, value: Any, where: str) -> Any:
        """``value`` validated; ``where`` names the key as the user wrote it."""
        if value is None and self.default is None:
            return None
        if self.convert is not None:
            value = self.convert(value, where)
        kinds = " or ".join(t.__name__ for t in self.types)
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            raise ConfigError(f"{where} must be {kinds}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{where} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{where} must be <= {self.maximum}, got {value!r}")
        return value


SETTINGS: tuple[Setting, ...] = (
    Setting("model_path", None, (str,), "start from this HF checkpoint dir (or a hub id in the local HF cache)",
            flag="--model-path", metavar="DIR", default_help="the zoo's tiny random-init config", hub="model",
            internevo=(InternEvoKey("ckpt.load_ckpt_info", internevo.starting_weights),)),
    Setting("allow_missing_weights", False, (bool,), "with --model-path: train even if the checkpoint lacks weights "
            "of the model (they keep their random init)", flag="--allow-missing-weights/--no-allow-missing-weights",
            default_help="refused"),
    Setting("data.train_folder", None, (str,), "jsonl / parquet / datasets dir, or a dataset in the local HF cache; "
            "llava: image+text jsonl; flux: dir of .safetensors latents", name="data_path", flag="--data", metavar="PATH",
            default_help="the embedded pydoc corpus; llava, flux: synthetic", hub="dataset"),
    Setting("data.tokenizer_path", None, (str,), "tokenizer dir (or a hub id in the local HF cache)", name="tokenizer_path",
            flag="--tokenizer", metavar="DIR", default_help="the model's own, else the embedded BPE", hub="model"),
    Setting("data.text_field", "text", (str,), "text field/column of the data", flag="--text-field", metavar="NAME"),
    Setting("data.seq_len", 512, (int,), "packed row length", flag="--seq-len", minimum=2),
    Setting("data.micro_num", 4, (int,), "micro-batches per step, i.e. gradient accumulation", flag="--micro-num", minimum=1),
    # InternEvo packs micro_bsz x seq_len tokens into one row; here they are micro_bsz rows of seq_len: same tokens a step
    Setting("data.micro_bsz", 1, (int,), "packed rows per micro-batch", flag="--micro-bsz", minimum=1),
    Setting("data.use_packed_dataset", True, (bool,), "varlen packed rows, or padded batches of the same documents",
            name="packed", flag="--packed/--padded", default_help="packed"),
    Setting("data.overflow", "auto", (str,), "documents longer than seq_len", flag="--overflow", choices=OVERFLOW,
            default_help="auto: split the embedded corpus, error otherwise"),
    Setting("parallel.tensor.size", 1, (int,), "ISP sequence parallel size", name="sp", flag="--sp", minimum=1),
    Setting("parallel.tensor.mode", "isp", (str,), "tensor group mode; only isp (Intern Sequence Parallel) may have "
            "size > 1", name="tensor_mode", choices=TENSOR_MODES),
    Setting("parallel.weight.size", 1, (int,), "weight parallel (FSDP2) size", name="wp", flag="--wp", minimum=1),
    Setting("parallel.zero1.size", -1, (int,), "InternEvo's ZeRO-1 group; checked against the world size", name="zero1"),
    Setting("parallel.pipeline.size", 1, (int,), "pipeline parallelism is not supported", name="pipeline_size", choices=(1,)),
    Setting("total_steps", 30, (int,), "optimizer steps", flag="--steps", minimum=1, internevo=("data.total_steps",)),
    Setting("lr", 3e-3, NUMBER, "peak learning rate", flag="--lr", minimum=0, internevo=("adam.lr",)),
    Setting("min_lr", None, NUMBER, "final cosine learning rate", default_help="lr/10", minimum=0,
            internevo=("lr_scheduler.eta_min",)),
    Setting("warmup_steps", None, (int,), "linear warmup steps", flag="--warmup-steps", minimum=0,
            default_help="warmup_ratio x steps, else 10% of steps"),
    Setting("warmup_ratio", None, NUMBER, "linear warmup as a fraction of total_steps (floored, as InternEvo)",
            minimum=0, maximum=1, internevo=("lr_scheduler.warmup_ratio",)),
    Setting("weight_decay", 0.01, NUMBER, "AdamW weight decay (not on biases and norms)", minimum=0,
            internevo=("adam.weight_decay",)),
    Setting("adam_betas", (0.9, 0.95), (tuple, list), "AdamW betas", internevo=("adam.adam_beta1", "adam.adam_beta2")),
    Setting("adam_eps", 1e-8, NUMBER, "AdamW epsilon", minimum=0, internevo=("adam.adam_eps",)),
    Setting("clip_grad_norm", 1.0, NUMBER, "0 disables clipping (the norm is still reported)", minimum=0,
            internevo=("hybrid_zero_optimizer.clip_grad_norm",)),
    Setting("seed", 42, (int,), "seed for init and data order", flag="--seed"),
    Setting("model.dtype", "auto", (str,), "parameter dtype", name="dtype", flag="--dtype", choices=DTYPES,
            default_help="auto: bf16 compute over float32 weights on GPU, float32 on CPU", convert=internevo.dtype),
    Setting("model.checkpoint", False, (bool, int, float), "recompute activations in backward; a config value in "
            "[0, 1] checkpoints that fraction of the decoder layers, the first ones (as InternEvo)", name="activation_checkpointing",
            flag="--activation-checkpointing/--no-activation-checkpointing", minimum=0, maximum=1, default_help="off"),
    Setting("model.compile", None, (bool,), "torch.compile each decoder layer (FA4 inside its graph, "
            "under ISP eager between two; a SwiGLU MLP as hfpatch's own, between two; MoE and state-space layers: "
            "their MLP and norms)", flag="--compile/--no-compile",
            default_help="auto: on a GPU, unless activations are offloaded or the MLP tiled"),
    Setting("model.fused_loss", None, (bool,), "fuse the output projection into the cross entropy: logits a chunk "
            "at a time (--loss-chunk sets its tokens), gradients formed in forward, no recompute",
            flag="--fused-loss/--no-fused-loss", default_help="auto: on a GPU"),
    Setting("model.attention_backend", "auto", (str,), "varlen attention kernel", flag="--attention-backend",
            choices=("auto", "fa4", "flash_attn", "torch_varlen", "reference"),
            default_help="auto: the fastest that can run here; `hfpatch env` says which"),
    Setting("model.init_std", 0.02, NUMBER, "std of the random init", minimum=0),
    Setting("long_context", False, (bool,), "the long-sequence preset: activation checkpointing, activation offload "
            "and the MLP tiled in 8192-token chunks, each unless set otherwise", flag="--long-context/--no-long-context",
            default_help="off"),
    Setting("offload_activations", None, (bool,), "the checkpointed layer inputs wait in pinned host memory "
            "(copied on a side stream, prefetched in backward); needs activation checkpointing",
            flag="--offload-activations/--no-offload-activations", default_help="with --long-context"),
    Setting("tile_mlp", None, (int,), "run each dense MLP this many tokens at a time, recomputed in backward: its "
            "intermediate activations never exist whole; 0 = off", flag="--tile-mlp", metavar="TOKENS", minimum=0,
            default_help="8192 with --long-context, else 0"),
    Setting("cpu_offload", False, (bool,), "FSDP2 keeps parameters, gradients and optimizer state in host memory "
            "(the optimizer steps on the CPU)", flag="--cpu-offload/--no-cpu-offload", default_help="off"),
    Setting("reshard_after_forward", True, (bool,), "FSDP2 frees each layer's gathered compute-dtype weights after "
            "forward and gathers them again in backward; off keeps them (+2 bytes a parameter, one cast pass a step "
            "less)", flag="--reshard-after-forward/--no-reshard-after-forward",
            default_help="on"),
    Setting("weight_copy", True, (bool,), "one rank computing in bf16 (auto dtype on a GPU): the model keeps "
            "bfloat16 copies of its weights and the optimizer updates the float32 masters, instead of FSDP2 casting "
            "and copying every weight each step (faster; +2 bytes a parameter)", flag="--weight-copy/--no-weight-copy",
            default_help="on"),
    Setting("isp_overlap", 0, (int,), "ISP: exchange the heads in N groups so each group's all-to-alls overlap "
            "another group's attention; 0 = one exchange", flag="--isp-overlap", metavar="N", minimum=0),
    Setting("loss_chunk", 0, (int,), "compute the LM loss this many tokens at a time, so the logits of a long sequence "
            "never exist whole (language models, LLaVA); 0 = off", flag="--loss-chunk", metavar="TOKENS", minimum=0),
    Setting("out", None, (str,), "run directory for checkpoints, metrics.jsonl, loss.png", flag="--out", metavar="DIR",
            default_help="runs/MODEL", internevo=(InternEvoKey("ckpt.save_ckpt_folder", internevo.save_folder),)),
    Setting("checkpoint_every", 0, (int,), "save every N steps; 0 = only at the end", flag="--checkpoint-every", minimum=0,
            internevo=("ckpt.checkpoint_every",)),
    Setting("save_checkpoints", True, (bool,), "write checkpoints (False: none, not even at the end)",
            internevo=("ckpt.enable_save_ckpt",)),
    Setting("keep_checkpoints", 2, (int,), "complete checkpoints to keep", flag="--keep-checkpoints", minimum=1),
    Setting("resume", "auto", (str,), "auto (newest checkpoint in --out), never, or a checkpoint path", flag="--resume",
            metavar="auto|never|PATH", internevo=(InternEvoKey("ckpt.auto_resume", internevo.auto_resume),)),
    Setting("export", None, (str,), "write an HF-format checkpoint (safetensors + tokenizer) here at the end",
            flag="--export", metavar="DIR"),
    Setting("log_every", 10, (int,), "progress line interval when stderr is not a terminal", minimum=1),
)
BY_KEY = {s.key: s for s in SETTINGS}
BY_NAME = {s.name: s for s in SETTINGS}
# InternEvo key -> (setting, element index for a sequence setting or None, converter)
BY_INTERNEVO = {
    (entry.path if isinstance(entry, InternEvoKey) else entry): (
        s, i if len(s.internevo) > 1 else None, entry.convert if isinstance(entry, InternEvoKey) else None)
    for s in SETTINGS for i, entry in enumerate(s.internevo)
}
SECTIONS = {".".join(s.path[:i]) for s in SETTINGS for i in range(1, len(s.path))}
OPEN_SECTION = "model"  # its other keys override the model's transformers config
# InternEvo lets a parallel size be written as a bare int: tensor=2.
SIZE_SHORTHAND = {s.key.rsplit(".", 1)[0] for s in SETTINGS if s.key.startswith("parallel.") and s.key.endswith(".size")}
# InternEvo sections holding keys read here: walked key by key
_INTERNEVO_SECTIONS = {p.rsplit(".", 1)[0] for p in (*BY_INTERNEVO, *internevo.NEUTRAL, *internevo.HONOURED) if "." in p}


@dataclass(frozen=True)
class Source:
    """Where a value came from, for --print-config and messages."""

    origin: str  # "default", the config file's name, "command line" or "--set"
    key: str = ""  # the key or flag as written there
    note: str = ""  # the value as written, when converted; the hub id a path resolved from

    @property
    def from_file(self) -> bool:
        return self.origin not in ("default", "command line", "--set")

    def __str__(self) -> str:
        text = {"default": "default", "command line": self.key, "--set": f"--set {self.key}"}.get(
            self.origin, f"{self.origin}: {self.key}")
        return f"{text} ({self.note})" if self.note else text


def defaults() -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for setting in SETTINGS:
        *parents, leaf = setting.path
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(setting.default)
    return tree


def _did_you_mean(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(prefix + k for k in sorted(known))}"


def _known_under(section: str) -> list[str]:
    prefix = f"{section}." if section else ""
    keys = {k[len(prefix):].split(".")[0] for k in (*BY_KEY, *BY_INTERNEVO, *internevo.NEUTRAL) if k.startswith(prefix)}
    return sorted(keys)


class _Resolution:
    """The tree being built, with the source of every value and the InternEvo keys with no effect."""

    def __init__(self) -> None:
        self.tree = defaults()
        self.sources: dict[str, Source] = {s.key: Source("default") for s in SETTINGS}
        self.ignored: list[str] = []
        self.effective: set[str] = set()  # top-level names of the file that had an effect

    def set(self, setting: Setting, value: Any, source: Source, index: int | None = None, written: Any = None) -> None:
        """Store ``value`` (validated) with its source; ``written``: the value as the file wrote it, if converted."""
        if index is not None:  # one element of a sequence setting (adam_beta1 of adam_betas)
            items = list(self.node_of(setting)[setting.path[-1]])
            items[index] = value
            value = written = tuple(items)
            previous = self.sources[setting.key]
            if previous.origin == source.origin and previous.key != setting.key:  # the other element, same file
                source = Source(source.origin, f"{previous.key}, {source.key}")
        checked = setting.check(value, (setting.flag_name or setting.key) if source.origin == "command line" else source.key)
        written = value if written is None else written
        if source.from_file and checked != written and isinstance(written, (str, int, float, bool)):
            source = Source(source.origin, source.key, f"{written!r}")
        self.node_of(setting)[setting.path[-1]] = checked
        self.sources[setting.key] = source
        if source.from_file:
            self.effective.add(source.key.split(".")[0])

    def node_of(self, setting: Setting) -> dict[str, Any]:
        node = self.tree
        for part in setting.path[:-1]:
            node = node[part]
        return node

    def set_internevo(self, path: str, value: Any, section: Mapping[str, Any], source: Source) -> None:
        """An InternEvo key read into its setting (``section``: the file's dict holding it)."""
        setting, index, convert = BY_INTERNEVO[path]
        converted = convert(value, section, path) if convert else value
        if converted is internevo.IGNORED:
            self.ignored.append(path)
        else:
            self.set(setting, converted, source, index, written=value)

    def override_model(self, key: str, value: Any, source: Source) -> None:
        self.tree[OPEN_SECTION][key] = value
        self.sources[f"{OPEN_SECTION}.{key}"] = source
        if source.from_file:
            self.effective.add(OPEN_SECTION)

    def apply(self, dotted: str, value: Any, source: Source) -> None:
        """One ``section.key=value`` (or a whole ``section=dict(...)``)."""
        if dotted in BY_KEY:
            self.set(BY_KEY[dotted], value, source)
        elif dotted in BY_INTERNEVO:
            self.set_internevo(dotted, value, {}, source)
        elif dotted in SIZE_SHORTHAND and isinstance(value, int) and not isinstance(value, bool):
            self.apply(f"{dotted}.size", value, source)
        elif dotted in SECTIONS and dotted != OPEN_SECTION:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a dict(...), got {value!r}")
            for key, item in value.items():
                self.apply(f"{dotted}.{key}", item, _child(source, str(key)))
        elif dotted == OPEN_SECTION and isinstance(value, Mapping):
            for key, item in value.items():
                self.apply(f"{dotted}.{key}", item, _child(source, str(key)))
        elif dotted.startswith(OPEN_SECTION + "."):
            first, *rest = dotted[len(OPEN_SECTION) + 1:].split(".")
            for part in reversed(rest):
                value = {part: value}
            self.override_model(first, value, source)
        else:
            section, _, leaf = dotted.rpartition(".")
            prefix = f"{section}." if section else ""
            raise ConfigError(f"unknown config key {dotted!r}" + _did_you_mean(leaf, _known_under(section), prefix))


def _child(source: Source, key: str) -> Source:
    return source if source.origin in ("command line",) else Source(source.origin, f"{source.key}.{key}")


def _read_file(state: _Resolution, names: Mapping[str, Any], filename: str, family: Callable[[], str]) -> None:
    """Every setting of a config file, its InternEvo keys translated (see internevo.py)."""
    is_internevo = internevo.is_internevo(names)

    def walk(section: Mapping[str, Any], prefix: str) -> None:
        for key, value in section.items():
            path = f"{prefix}{key}"
            source = Source(filename, path)
            if path in BY_KEY:
                state.set(BY_KEY[path], value, source)
            elif path in BY_INTERNEVO:
                state.set_internevo(path, value, section, source)
            elif (internevo.check_neutral(path, value, names) or value in internevo.HONOURED.get(path, ())
                  or path in internevo.INFORMATIONAL):
                continue
            elif path in SIZE_SHORTHAND and isinstance(value, int) and not isinstance(value, bool):
                state.apply(f"{path}.size", value, Source(filename, f"{path}"))
            elif path == OPEN_SECTION and isinstance(value, Mapping):
                read_model(value)
            elif isinstance(value, Mapping) and (path in SECTIONS or path in _INTERNEVO_SECTIONS):
                walk(value, f"{path}.")
            elif internevo.no_effect(path):
                state.ignored.append(path)
            elif path in SECTIONS:
                raise ConfigError(f"{path} must be a dict(...), got {value!r}")
            else:
                state.apply(path, value, source)  # raises: unknown key, with a did-you-mean

    def read_model(model: Mapping[str, Any]) -> None:
        ours = {k: v for k, v in model.items() if f"{OPEN_SECTION}.{k}" in BY_KEY}
        walk(ours, f"{OPEN_SECTION}.")
        rest = {k: v for k, v in model.items() if k not in ours}
        if is_internevo:
            needs_family = any(k in internevo.MODEL_TO_HF for k in rest)
            overrides, ignored = internevo.model_section(rest, family() if needs_family else "")
            state.ignored.extend(ignored)
        else:
            overrides = [(key, key, value) for key, value in rest.items()]
        for written, key, value in overrides:
            state.override_model(key, value, Source(filename, f"{OPEN_SECTION}.{written}"))

    walk({k: v for k, v in names.items() if not (k.isupper() or k.startswith("_"))}, "")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``'data.seq_len=256'`` -> ``('data.seq_len', 256)``; true / false as on a shell; non-literals stay strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    if raw.strip().lower() in ("true", "false"):
        return key.strip(), raw.strip().lower() == "true"
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


@dataclass(frozen=True)
class TrainConfig:
    """Resolved settings, flat (``cfg.seq_len``), as the trainer uses them."""

    model_name: str
    tree: dict[str, Any] = field(repr=False)  # the nested form, saved with each run
    sources: dict[str, Source] = field(default_factory=dict, repr=False)
    ignored: tuple[str, ...] = ()  # InternEvo keys of the config file with no effect here

    def __getattr__(self, name: str) -> Any:
        setting = BY_NAME.get(name)
        if setting is None:
            raise AttributeError(name)
        node: Any = self.tree
        for part in setting.path:
            node = node[part]
        return node

    # -- derived values ----------------------------------------------------------------

    @property
    def final_lr(self) -> float:
        return float(self.min_lr) if self.min_lr is not None else float(self.lr) / 10

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.total_steps)
        if self.warmup_ratio is not None:
            return int(self.total_steps * self.warmup_ratio)  # as InternEvo's FineTuneCosineAnnealingWarmupLR
        return max(1, round(0.1 * self.total_steps))

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.model_name

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.tree[OPEN_SECTION].items() if f"{OPEN_SECTION}.{k}" not in BY_KEY}

    def describe_sources(self) -> dict[str, str]:
        return {key: str(source) for key, source in self.sources.items()}


def resolve_config(
    model_name: str,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    assignments: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Defaults, then the file, then ``overrides`` (dotted keys: the CLI options), then ``--set`` assignments."""
    state = _Resolution()
    if config_file is not None:
        names = read_config_file(config_file)
        _read_file(state, names, Path(config_file).name, lambda: _family(model_name))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            flag = BY_KEY[dotted].flag if dotted in BY_KEY else None
            state.apply(dotted, value, Source("command line", flag or dotted))
    for text in assignments:
        key, value = parse_assignment(text)
        state.apply(key, value, Source("--set", key))
    _check(state)
    _resolve_hub_ids(state)
    ignored = tuple(dict.fromkeys(_collapse(state.ignored, state.effective)))
    return TrainConfig(model_name=model_name, tree=state.tree, sources=state.sources, ignored=ignored)


def _family(model_name: str) -> str:
    from hfpatch import zoo

    return zoo.resolve(model_name).family


def _check(state: _Resolution) -> None:
    """Rules between settings."""
    tree = state.tree
    betas = tree["adam_betas"]
    if len(betas) != 2 or not all(isinstance(b, NUMBER) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
    tensor = tree["parallel"]["tensor"]
    if tensor["size"] > 1 and tensor["mode"] != "isp":
        size_source = state.sources["parallel.tensor.size"]
        if size_source.origin == "command line" and state.sources["parallel.tensor.mode"].origin != "--set":
            # --sp is the ISP size by definition; only a --set of the mode outranks it
            tensor["mode"] = "isp"
            state.sources["parallel.tensor.mode"] = size_source
        else:
            raise ConfigError(
                f"parallel.tensor.mode must be one of isp when parallel.tensor.size > 1, got {tensor['mode']!r} with size "
                f"{tensor['size']}: the tensor group here is Intern Sequence Parallel; InternEvo's {tensor['mode']!r} "
                f"tensor parallelism is not supported")


def _resolve_hub_ids(state: _Resolution) -> None:
    for setting in SETTINGS:
        value = state.node_of(setting)[setting.path[-1]]
        if setting.hub and value is not None:
            source = state.sources[setting.key]
            label = setting.flag_name if source.origin == "command line" else source.key
            local = hub.local_path(value, setting.hub, label)
            if local != value:
                state.node_of(setting)[setting.path[-1]] = local
                state.sources[setting.key] = Source(source.origin, source.key, f"{value} from the HF cache")


def _collapse(ignored: list[str], effective: set[str]) -> list[str]:
    """An InternEvo section none of whose keys had an effect is listed once, by its name."""
    return [top if (top := path.split(".")[0]) not in effective and top not in SECTIONS else path for path in ignored]


def ignored_warning(cfg: TrainConfig) -> str | None:
    if not cfg.ignored:
        return None
    return f"warning: ignored InternEvo settings with no effect here: {', '.join(cfg.ignored)}"


def check_world_size(cfg: TrainConfig, world: int) -> None:
    """Each parallel size must divide the number of processes."""
    hint = " (start more processes with --nproc N or torchrun)" if world == 1 else ""
    for name, flag, size in (("tensor", "--sp", cfg.sp), ("weight", "--wp", cfg.wp)):
        if world % size:
            raise ConfigError(f"parallel.{name}.size={size} ({flag}) does not divide the world size {world}{hint}")
    zero1 = cfg.zero1
    if zero1 > 1 and world % zero1:
        raise ConfigError(f"parallel.zero1.size={zero1} does not divide the world size {world}")
