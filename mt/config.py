"""Typed configuration: dataclasses loaded from YAML, overridable with `--set section.key=value`.

Unknown keys and values of the wrong type are rejected with the full key name, so a typo in a
config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mt.errors import ConfigError
from mt.files import atomic_write_text
from mt.run_dir import BEST


@dataclass
class DataConfig:
    dir: str = "data/multi30k-de-en"  # holds {train,valid}.{src,tgt} as written by `mt data`
    src: str = "de"
    tgt: str = "en"
    train: str = "train"
    valid: str = "valid"
    test: str = "test"  # scored once with best.pt at the end of training (for the model card), when present
    max_length: int = 256  # training pairs longer than this (in pieces) on either side are skipped
    max_length_ratio: float = 9.0  # ... and pairs whose longer side has more than this x the pieces of the other
    errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8 in a corpus: fail naming the line, or replace
    # several directions in one model, e.g. [de-en, en-de, fr-en]: each from `dir` (a multi-way corpus
    # serves them all) or its own, `fr-en:data/other`; the source starts with a target-language tag
    # such as <2fr>. Empty: the one pair src-tgt, untagged
    directions: list[str] = field(default_factory=list)


@dataclass
class TokenizerConfig:
    type: Literal["unigram", "bpe"] = "bpe"  # bpe trains on the whole corpus in bounded memory (mt.tokenizer)
    vocab_size: int = 8000
    joint: bool = True  # one vocabulary for both languages (enables tied embeddings)
    character_coverage: float = 1.0
    max_sentences: int = 2_000_000  # sentences sampled to train a unigram model (BPE counts the words of all)
    # more text files (one sentence per line) the joint tokenizer also learns from, e.g. a language
    # a model fine-tuned from this one will read
    extra_text: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    encoder_layers: int = 3
    decoder_layers: int = 3
    d_model: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # inside the feed-forward block; costly on CPU, off as in fairseq
    norm: Literal["pre", "post"] = "pre"
    tie_embeddings: bool = True  # share source/target/output embeddings (joint vocabulary only)
    max_positions: int = 1024
    # sinusoidal/learned: absolute position vectors added to the embeddings; rope: rotary position
    # embedding of self-attention queries and keys, so attention sees relative distance only
    position: Literal["sinusoidal", "learned", "rope"] = "sinusoidal"


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 1
    device: str = "auto"
    max_tokens: int = 4096  # per batch and side, padding included
    update_freq: int = 1  # batches accumulated into one update (effective batch = max_tokens x update_freq)
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    warmup_steps: int = 1000
    adam_betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    max_epochs: int | None = None
    max_steps: int | None = None
    max_time: str | None = None  # wall-clock budget such as "20m", "1h30m", "90s"
    valid_sentences: int = 500  # validation BLEU on this many validation sentences (0 = all)
    valid_beam: int = 1  # beam size of validation BLEU (1 = greedy: cheap enough for short CPU budgets)
    log_every: int = 50  # steps between metrics-log lines
    valid_every: int = 0  # steps between validations (and checkpoints); 0 = at the end of each epoch only
    save_every: int = 500  # steps between checkpoints besides those at validations; 0 = only at validations
    keep_checkpoints: int = 5  # the last K step checkpoints stay in RUN_DIR/checkpoints (best.pt apart)
    patience: int = 0  # stop after this many validations without a better BLEU (ties: lower loss); 0 = never
    # directions are drawn with probability proportional to pairs ** (1 / T) each epoch: 1 keeps the
    # corpus proportions, larger values give small directions more turns (fairseq, M2M-100)
    direction_temperature: float = 5.0
    max_bad_steps: int = 5  # updates in a row with a non-finite loss or gradient before the run stops
    score_test: bool = True  # at the end, translate and score data.test (if present) for the model card
    # auto: bf16 on CUDA and on CPUs with bf16 matrix instructions (AVX-512 BF16, AMX), fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model and loss (falls back to eager where unsupported)
    tensorboard: bool = False  # also write the metrics as TensorBoard events to RUN_DIR/tensorboard/
    # a run directory or checkpoint whose weights and tokenizer a new run starts from (fine-tuning);
    # the run records the exact checkpoint file here
    init_from: str | None = None
    keep_optimizer: bool = False  # with init_from: carry its optimizer state and step counter over too


@dataclass
class DecodeConfig:
    beam: int = 5
    length_penalty: float = 1.0  # score = log P(y|x) / len(y) ** length_penalty
    max_len_a: float = 1.2  # a hypothesis has at most a * len(src) + b pieces
    max_len_b: int = 10
    max_tokens: int = 6144  # source pieces x beam size per decoding batch, padding included
    no_repeat_ngram: int = 0  # > 0: no hypothesis repeats an n-gram of this size
    checkpoint: str = BEST  # the weights `mt translate`/`mt eval` use (`mt tune` may pick averaged.pt)
    # the output layer over the run's lexical shortlist (RUN_DIR/shortlist.npz) only: faster, valid
    # BLEU -0.20..+0.13 over 17 Multi30k directions, -0.43 and -0.10 on en-de (README); off unless a config
    # (the de-en and multilingual presets) sets it, so earlier run directories translate as before
    shortlist: bool = False
    # auto: bf16 on CUDA, fp32 elsewhere; on the CPU bf16 and int8 (the CPU only) multiply in that type and
    # keep the rest in fp32: int8 1.75x fp32's beam 5 on AMD Zen 4 (AVX-512 VNNI), bf16 1.2x on Intel with
    # AMX, valid BLEU within 0.2 (README); fastest: the faster of these for the CPU at hand (bf16 with
    # AMX, int8 with VNNI, else fp32; auto on a GPU). The default stays auto: earlier run directories
    # translate as before
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8", "fastest"] = "auto"
    # when a beam-search sentence stops: once no open hypothesis can still beat its K-th finished one
    # (exact), would beat it by ending at the next step (heuristic: Hugging Face's rule), or once K
    # hypotheses have finished (k_finished: fairseq's and CTranslate2's rule); see mt/search.py.
    # The presets choose heuristic (1.23-1.28x exact's speed, 997-998 of 1,000 outputs the same:
    # README); the default stays exact, so run directories of earlier versions translate as before
    beam_stop: Literal["exact", "heuristic", "k_finished"] = "exact"
    # batches decoded at once on the CPU, each on its share of the threads (0: one per thread;
    # CTranslate2's inter_threads): small matrix products scale poorly across threads
    workers: int = 0


@dataclass(frozen=True)
class Direction:
    """One translation direction of a config and the corpus directory that holds it."""

    src: str
    tgt: str
    dir: str

    @property
    def name(self) -> str:
        return f"{self.src}-{self.tgt}"


_DIRECTION = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)-([A-Za-z][A-Za-z0-9_]*)(?::(.+))?$")


def parse_direction(text: str, default_dir: str, key: str = "data.directions") -> Direction:
    """`de-en` (from `default_dir`) or `de-en:DIR` -> Direction."""
    match = _DIRECTION.match(str(text).strip())
    if not match or match.group(1) == match.group(2):
        raise ConfigError(f"{key}: {text!r} is not a direction such as de-en or de-en:data/corpus")
    return Direction(match.group(1), match.group(2), match.group(3) or default_dir)


def directions(data: DataConfig) -> list[Direction]:
    """The config's directions: `data.directions`, or the one pair data.src-data.tgt."""
    if not data.directions:
        return [Direction(data.src, data.tgt, data.dir)]
    return [parse_direction(text, data.dir) for text in data.directions]


def target_languages(data: DataConfig) -> list[str]:
    """The languages a multilingual config translates into, in their first order; [] for a single pair."""
    return list(dict.fromkeys(d.tgt for d in directions(data))) if data.directions else []


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_describe(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if origin is tuple:
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{key}: expected a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, item_types))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. max_time: 3600
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _validate(config: Config) -> None:
    m, t, d = config.model, config.train, config.decode
    checks = [
        (min(m.encoder_layers, m.decoder_layers, m.heads, m.ffn_dim, m.d_model) > 0, "model sizes must be positive"),
        (m.heads > 0 and m.d_model % m.heads == 0, "model.d_model must be divisible by model.heads"),
        (m.position != "sinusoidal" or m.d_model % 2 == 0, "model.d_model must be even for sinusoidal positions"),
        (
            m.position != "rope" or m.heads <= 0 or (m.d_model // m.heads) % 2 == 0,
            "rotary positions need an even head size (model.d_model / model.heads)",
        ),
        (m.max_positions >= 2, "model.max_positions must be at least 2"),
        (
            all(0 <= p < 1 for p in (m.dropout, m.attention_dropout, m.activation_dropout)),
            "model dropouts must be in [0, 1)",
        ),
        (config.tokenizer.vocab_size >= 8, "tokenizer.vocab_size must be at least 8"),
        (
            config.tokenizer.joint or not config.tokenizer.extra_text,
            "tokenizer.extra_text needs a joint vocabulary (tokenizer.joint: true)",
        ),
        (
            config.tokenizer.joint or not config.data.directions,
            "data.directions needs a joint vocabulary (tokenizer.joint: true)",
        ),
        (t.direction_temperature > 0, "train.direction_temperature must be positive"),
        (t.max_tokens > 0, "train.max_tokens must be positive"),
        (t.update_freq >= 1, "train.update_freq must be at least 1"),
        (t.lr > 0 and t.warmup_steps >= 0, "train.lr must be positive, train.warmup_steps >= 0"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (min(t.valid_every, t.save_every, t.patience) >= 0, "train.valid_every/save_every/patience must be >= 0"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        (t.max_bad_steps >= 1, "train.max_bad_steps must be at least 1"),
        (t.log_every >= 1, "train.log_every must be at least 1"),
        (t.valid_beam >= 1, "train.valid_beam must be at least 1"),
        (config.data.max_length > 0, "data.max_length must be positive"),
        (config.data.max_length_ratio >= 0, "data.max_length_ratio must be >= 0 (0 disables the filter)"),
        (d.beam >= 1, "decode.beam must be at least 1"),
        (d.no_repeat_ngram >= 0, "decode.no_repeat_ngram must be >= 0 (0 allows repeats)"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be at least 1"),
        (t.max_epochs is None or t.max_epochs >= 1, "train.max_epochs must be at least 1"),
        (d.max_tokens > 0, "decode.max_tokens must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    names = [parse_direction(text, config.data.dir).name for text in config.data.directions]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.directions: {', '.join(repeated)} listed twice")
    if t.max_time is not None:
        parse_duration(t.max_time)


def config_from_dict(values: dict[str, Any]) -> Config:
    config = _build(Config, values or {}, "")
    _validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=5e-4` -> (["train", "lr"], 0.0005); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads "5e-4" as a string; accept it as the number it obviously is
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}".splitlines()[0]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part} is not a section")
        node[keys[-1]] = value
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        # an error about a value given with --set is named by that override, not by the file
        keys = set(re.findall(r"\b[a-z_]+\.[a-z_]+\b", str(exc)))
        given = next((text for text in overrides if text.split("=", 1)[0].strip() in keys), None)
        where = f"--set {given}: " if given else f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def check_resumable(saved: Config, given: Config, fixed: list[str], where: Path) -> list[str]:
    """Refuse a config that changes a `fixed` section (say, the model of a run that has checkpoints);
    returns the changed keys of the sections a continued run may change (data, train, decode)."""
    old, new = config_to_dict(saved), config_to_dict(given)
    for section in fixed:
        for key, value in new[section].items():
            if old[section].get(key) != value:
                raise ConfigError(
                    f"{where}: this run has {section}.{key}={old[section].get(key)!r}, "
                    f"the config asks for {value!r}; start a new run with another train.run_dir"
                )
    return [f"{s}.{k}" for s in ("data", "train", "decode") for k in new[s] if old[s].get(k) != new[s][k]]


def config_to_dict(config: Config) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    values["train"]["adam_betas"] = list(values["train"]["adam_betas"])
    return values


def save_config(config: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """'20m' -> 1200.0; accepts h/m/s parts ('1h30m', '90s') or bare seconds ('3600')."""
    match = _DURATION.match(str(text))
    if not match or not any(match.groups()):
        raise ConfigError(f"train.max_time: cannot read duration {text!r} (use e.g. 20m, 1h30m, 90s)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds
