"""The one decoding path: options in one frozen record, an engine that searches, one `decode` function.

Every caller (`mt translate`, `mt eval`, `mt tune`, validation during training, the model card,
`mt attention`) turns source ids into hypotheses through `decode`, so they share one rule for
truncating over-long sources, one token budget per batch and one precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import torch

from mt.batching import make_batches, pad
from mt.config import Config, DecodeConfig, load_config
from mt.device import (
    PRECISIONS,
    check_precision,
    cpu_workers,
    decoding_precision,
    map_in_workers,
    pick_device,
    resolve_precision,
    slow_precision,
)
from mt.errors import CheckpointError, MTError
from mt.model import Transformer, build_model, cross_attention_weights
from mt.ops import forget_reduced
from mt.run_dir import RunDir, load_weights
from mt.search import STOPPING_RULES, Hypothesis, search
from mt.shortlist import Shortlist
from mt.stepping import Models
from mt.tokenizer import Tokenizer, load_tokenizer
from mt.vocab import BOS, EOS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode; `from_config` reads the `decode` section, `dataclasses.replace` varies it."""

    beam: int = 5  # 1 = greedy
    length_penalty: float = 1.0  # score = log P(y|x) / len(y) ** length_penalty
    max_len_a: float = 1.2  # a hypothesis has at most a * len(src) + b pieces
    max_len_b: int = 10
    nbest: int = 1  # hypotheses returned per sentence, best first
    no_repeat_ngram: int = 0  # > 0: no hypothesis repeats an n-gram of this size
    use_cache: bool = True  # False: the uncached reference decoder (tests, benchmarks)
    max_tokens: int = 6144  # source pieces x beam size per batch, padding included
    precision: str = "auto"  # the PyTorch engine's (auto | fp32 | bf16 | fp16 | int8 | fastest: mt.device)
    # sampling: each next piece drawn at random (beam ignored; nbest independent samples per sentence)
    sampling: bool = False
    temperature: float = 1.0  # < 1 sharpens the distribution, > 1 flattens it
    top_k: int = 0  # draw from the k most probable pieces only (0: all)
    top_p: float = 1.0  # ... from the smallest set holding this much probability (nucleus sampling)
    seed: int = 1  # the same seed, input and batching give the same samples
    # a multilingual model's output language (its tag starts the source; mt.translate); None: the
    # model's only target language
    tgt_lang: str | None = None
    shortlist: bool = False  # the output layer over the run's lexical shortlist only (mt.shortlist)
    beam_stop: str = "exact"  # when a beam-search sentence stops: exact | heuristic | k_finished (mt.search)
    workers: int = 0  # CPU batches decoded at once, each on its share of the threads (0: one per thread)

    @classmethod
    def from_config(cls, config: DecodeConfig, **changes) -> DecodeOptions:
        """The config's settings with `changes` applied; a change of None keeps the config's value."""
        names = {f.name for f in fields(cls)}
        options = cls(**{name: value for name, value in vars(config).items() if name in names})
        options = replace(options, **{name: value for name, value in changes.items() if value is not None})
        if options.beam < 1:
            raise MTError("the beam size must be at least 1")
        if options.beam_stop not in STOPPING_RULES:
            raise MTError(f"beam stop {options.beam_stop!r}: choose one of {', '.join(STOPPING_RULES)}")
        if options.precision not in PRECISIONS:
            raise MTError(f"precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if options.workers < 0:
            raise MTError(f"decode.workers {options.workers}: must be >= 0 (0: one per CPU thread)")
        if options.no_repeat_ngram < 0:
            raise MTError(f"no_repeat_ngram {options.no_repeat_ngram}: must be >= 0 (0 allows repeats)")
        if options.sampling:
            if options.temperature <= 0 or options.top_k < 0 or not 0 < options.top_p <= 1:
                raise MTError("sampling needs temperature > 0, top_k >= 0 and 0 < top_p <= 1")
            if options.nbest < 1:
                raise MTError(f"nbest {options.nbest}: must be at least 1")
        elif not 1 <= options.nbest <= options.beam:
            raise MTError(f"nbest {options.nbest}: must be between 1 and the beam size ({options.beam})")
        return options

    @property
    def rows_per_batch(self) -> int:
        """Sources per batch are bounded by `max_tokens` decoder rows: source pieces times beam size
        (times the samples per sentence, when sampling)."""
        return max(1, self.max_tokens // (self.nbest if self.sampling else self.beam))


class Engine(Protocol):
    """What decoding needs of a model: how long a source it reads, and a batched search."""

    device: torch.device
    max_source: int  # source pieces (without EOS) the model reads
    vocab_size: int  # target pieces
    has_shortlist: bool  # decode.shortlist can be honoured: a lexical shortlist (or vmap) came with the model

    def check(self, options: DecodeOptions) -> None:
        """A one-line error (MTError) for settings this engine cannot decode with; `search` checks too."""
        ...

    def search(
        self, sources: list[list[int]], options: DecodeOptions, prefixes: list[list[int]] | None = None
    ) -> list[list[Hypothesis]]:
        """Sources no longer than `max_source` -> per source its `options.nbest` hypotheses, in order;
        each hypothesis of source i starts with `prefixes[i]`, when given."""
        ...


class TorchEngine:
    """`Transformer`(s) on a device: sorted batches of similar-length sources, mt's own search.

    Several models (with `weights`) are an ensemble: every step averages their log-probabilities.
    """

    def __init__(
        self,
        model: Transformer | list[Transformer],
        device: torch.device,
        weights: list[float] | None = None,
        shortlist: Shortlist | None = None,
    ):
        members = model if isinstance(model, list) else [model]
        for member in members:  # int8/bf16 weights are made from the weights as they are now (validation in training)
            forget_reduced(member)
        self.models, self.device = Models([m.eval() for m in members], weights), device
        self.shortlist = shortlist
        self._warned: set[str] = set()  # precisions already warned to run slowly on this CPU
        self.model = members[0]
        self.max_source = self.models.max_positions - 1
        self.vocab_size = self.model.output_weight.size(0)

    @property
    def has_shortlist(self) -> bool:
        return self.shortlist is not None

    def check(self, options: DecodeOptions) -> None:
        if options.shortlist and self.shortlist is None:
            raise MTError("decode.shortlist: this model has no shortlist (build one: mt shortlist RUN_DIR)")
        precision = resolve_precision(self.device, options.precision)
        check_precision(self.device, precision)
        slow = slow_precision(self.device, precision)
        if slow and precision not in self._warned:
            log.warning(slow)
            self._warned.add(precision)

    def search(
        self, sources: list[list[int]], options: DecodeOptions, prefixes: list[list[int]] | None = None
    ) -> list[list[Hypothesis]]:
        self.check(options)
        lengths = [len(s) + 1 for s in sources]
        generator = torch.Generator(self.device).manual_seed(options.seed) if options.sampling else None

        def decode_batch(batch: list[int]) -> list[list[Hypothesis]]:
            src = pad([sources[i] for i in batch], suffix=[EOS]).to(self.device)
            forced = [prefixes[i] for i in batch] if prefixes else None
            models = self.models.restricted(self._candidates(src, forced)) if options.shortlist else self.models
            with decoding_precision(self.device, options.precision):
                return search(models, src, options, forced, generator)

        batches = list(make_batches(lengths, lengths, options.rows_per_batch))
        # samples follow the seed only when the batches draw from the generator in order
        workers = 1 if options.sampling else cpu_workers(options.workers, self.device)
        if workers > 1:  # the longest first, so that no long batch is left to run alone at the end
            batches.sort(key=lambda batch: -max(lengths[i] for i in batch))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        for batch, found in zip(batches, map_in_workers(decode_batch, batches, workers)):
            for index, hyps in zip(batch, found):
                results[index] = hyps
        return results

    def _candidates(self, src: torch.Tensor, prefixes: list[list[int]] | None) -> torch.Tensor:
        """The shortlist's target ids for a batch, with the pieces of its target prefixes."""
        candidates = self.shortlist.candidates(src)
        forced = [piece for prefix in prefixes or [] for piece in prefix]
        if forced:
            candidates = torch.unique(torch.cat([candidates, torch.tensor(forced, device=candidates.device)]))
        return candidates

    def score(self, sources: list[list[int]], targets: list[list[int]], options: DecodeOptions) -> list[list[float]]:
        """Teacher-forced log-probability of each target piece and of the closing EOS, per pair.

        The probabilities search uses: log-softmax over the whole vocabulary, in `options.precision`.
        """
        lengths = [max(len(s), len(t)) + 1 for s, t in zip(sources, targets)]
        results: list[list[float]] = [[] for _ in sources]
        # rows_per_batch tokens: the (tokens, vocabulary) log-probabilities are what costs memory here
        for batch in make_batches(lengths, lengths, options.rows_per_batch):
            src = pad([sources[i] for i in batch], suffix=[EOS]).to(self.device)
            tgt_in = pad([targets[i] for i in batch], prefix=[BOS]).to(self.device)
            tgt_out = pad([targets[i] for i in batch], suffix=[EOS]).to(self.device)
            chosen = torch.zeros(tgt_out.shape)
            for model, weight in zip(self.models.members, self.models.weights):
                with torch.inference_mode(), decoding_precision(self.device, options.precision):
                    log_probs = torch.log_softmax(model.logits(model(src, tgt_in)).float(), dim=-1)
                chosen += log_probs.gather(-1, tgt_out[..., None]).squeeze(-1).cpu() * weight
            for row, index in enumerate(batch):
                results[index] = chosen[row, : len(targets[index]) + 1].tolist()
        return results

    def cross_attention_of_layer(
        self, sources: list[list[int]], targets: list[list[int]], layer: int, options: DecodeOptions
    ) -> list[torch.Tensor]:
        """Teacher-forced cross-attention of decoder `layer` (of the first model), heads averaged:
        per pair (len(target) + 1, len(source) + 1), EOS last on both sides."""
        lengths = [max(len(s), len(t)) + 1 for s, t in zip(sources, targets)]
        results: list[torch.Tensor] = [torch.empty(0)] * len(sources)
        for batch in make_batches(lengths, lengths, options.rows_per_batch):
            src = pad([sources[i] for i in batch], suffix=[EOS]).to(self.device)
            tgt_in = pad([targets[i] for i in batch], prefix=[BOS]).to(self.device)
            weights = cross_attention_weights(self.model, src, tgt_in)[layer].mean(dim=1).float().cpu()
            for row, index in enumerate(batch):
                results[index] = weights[row, : len(targets[index]) + 1, : len(sources[index]) + 1]
        return results

    def cross_attention(self, source: list[int], tokens: list[int]) -> torch.Tensor:
        """Teacher-forced cross-attention of `tokens` over `source`: (layers, heads, len(tokens)+1, len(source)+1);
        of the first model of an ensemble."""
        src = torch.tensor([source + [EOS]], device=self.device)
        tgt_in = torch.tensor([[BOS] + tokens], device=self.device)
        return cross_attention_weights(self.model, src, tgt_in)[:, 0].cpu()


def decode(
    engine: Engine, sources: list[list[int]], options: DecodeOptions, prefixes: list[list[int]] | None = None
) -> list[list[Hypothesis]]:
    """Source piece ids (no EOS) -> the `options.nbest` best hypotheses of each, in input order.

    With `prefixes` (target piece ids per source), every hypothesis starts with its prefix and the
    search continues after it. A source longer than the engine reads is cut to that length, and a
    prefix to one piece less than a hypothesis may have, with a warning.
    """
    if not options.sampling and options.beam > engine.vocab_size - 2:  # PAD and BOS are never chosen
        raise MTError(f"beam {options.beam}: larger than the model's {engine.vocab_size - 2} choosable pieces")
    limit = engine.max_source
    for ids in sources:
        if len(ids) > limit:
            log.warning("input line of %d pieces truncated to %d (model.max_positions)", len(ids), limit)
    if prefixes is not None:
        if len(prefixes) != len(sources):
            raise MTError(f"{len(prefixes)} target prefixes for {len(sources)} sources")
        if any(len(ids) > limit - 1 for ids in prefixes):
            log.warning("target prefixes cut to %d pieces (model.max_positions)", limit - 1)
        prefixes = [ids[: limit - 1] for ids in prefixes] if any(prefixes) else None
    return engine.search([ids[:limit] for ids in sources], options, prefixes) if sources else []


@dataclass(frozen=True)
class PairScore:
    """How likely the model finds a given translation: its log-probability, as beam search scores it."""

    pieces: list[float]  # log P of each target piece given the ones before, the closing EOS last
    total: float  # their sum: log P(target | source)
    normalised: float  # total / (pieces + EOS) ** length_penalty, the score beam search ranks by


def score(
    engine: Engine, sources: list[list[int]], targets: list[list[int]], options: DecodeOptions
) -> list[PairScore]:
    """Forced scoring of target piece ids (no BOS/EOS) given source ids; each is cut to what the model reads."""
    limit = engine.max_source
    if any(len(ids) > limit for ids in [*sources, *targets]):
        log.warning("pairs longer than %d pieces (model.max_positions) are scored on their first %d", limit, limit)
    sources, targets = [ids[:limit] for ids in sources], [ids[:limit] for ids in targets]
    found = engine.score(sources, targets, options) if sources else []
    return [PairScore(p, sum(p), sum(p) / len(p) ** options.length_penalty) for p in found]


def load_model(run: RunDir, config: Config, tokenizer: Tokenizer, device: torch.device, checkpoint: str) -> Transformer:
    """Rebuild a run directory's model from its config and a checkpoint, checking it fits the tokenizer."""
    path = run.checkpoint(checkpoint)
    weights = load_weights(path, device)
    vocab = [tokenizer.src_vocab_size, tokenizer.tgt_vocab_size]
    if weights.vocab != vocab or weights.tokenizer != tokenizer.fingerprint():
        raise CheckpointError(
            f"{path}: trained with vocabulary sizes {weights.vocab} and another SentencePiece model "
            f"than {run}'s (sizes {vocab}); were run directories mixed up?"
        )
    model = build_model(config.model, *vocab, tokenizer.joint).to(device)
    try:
        model.load_state_dict(weights.model)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model in {run.config.name} ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval()


def open_engine(
    run: RunDir, config: Config, tokenizer: Tokenizer, checkpoint: str, device: str = "auto", kind: str = "auto"
) -> Engine:
    """The engine for a model directory: `kind` auto picks CTranslate2 for an `mt export` directory."""
    if kind not in ("auto", "torch", "ctranslate2"):
        raise MTError(f"--engine {kind!r}: use auto, torch or ctranslate2")
    if kind == "ctranslate2" or (kind == "auto" and run.is_export()):
        from mt.ct2 import CTranslate2Engine

        return CTranslate2Engine(Path(run), config, tokenizer, device)
    torch_device = pick_device(device)
    model = load_model(run, config, tokenizer, torch_device, checkpoint)
    shortlist = Shortlist.load(run.shortlist, tokenizer.fingerprint()) if run.shortlist.is_file() else None
    return TorchEngine(model, torch_device, shortlist=shortlist)


def open_ensemble(
    runs: list[RunDir],
    tokenizer: Tokenizer,
    checkpoint: str | None,
    device: str = "auto",
    kind: str = "auto",
    weights: list[float] | None = None,
) -> TorchEngine:
    """Several run directories as one engine that averages their log-probabilities at every step.

    Every model must read and write the pieces of `tokenizer` (the first run's): the same
    SentencePiece model on each side. `checkpoint` None: each run's own `decode.checkpoint`.
    """
    if kind == "ctranslate2" or any(run.is_export() for run in runs):
        raise MTError("an ensemble needs run directories of mt's own model: CTranslate2 exports cannot be ensembled")
    torch_device = pick_device(device)
    models = []
    for run in runs:
        config = load_config(run.config)
        member = load_tokenizer(run, config.tokenizer.joint)
        for side, mine, first in (
            ("source", member.src_path, tokenizer.src_path),
            ("target", member.tgt_path, tokenizer.tgt_path),
        ):
            if mine.read_bytes() != first.read_bytes():
                raise MTError(
                    f"{run}: its {side} SentencePiece model differs from {runs[0]}'s; the models of an "
                    "ensemble must share their vocabularies (train them with the same tokenizer)"
                )
        models.append(load_model(run, config, member, torch_device, checkpoint or config.decode.checkpoint))
    # the members share the first run's pieces, so its shortlist (built from its corpus) serves them all
    first = runs[0].shortlist
    shortlist = Shortlist.load(first, tokenizer.fingerprint()) if first.is_file() else None
    return TorchEngine(models, torch_device, weights, shortlist)
