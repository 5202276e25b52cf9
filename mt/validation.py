"""Validation during training: loss and perplexity over the validation split, BLEU/chrF of its decoding."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from mt.batching import make_batches
from mt.config import Config
from mt.corpus_cache import EncodedCorpus
from mt.decoding import DecodeOptions, TorchEngine, decode
from mt.device import autocast, training_precision
from mt.evaluate import corpus_scores
from mt.loss import TranslationLoss
from mt.model import Transformer
from mt.progress import progress_bar
from mt.tokenizer import Tokenizer
from mt.vocab import PAD


def validation_options(config: Config, precision: str) -> DecodeOptions:
    """The model's decoding defaults, with the validation beam, in the training's `precision` (so BLEU
    and loss are measured in the same number type; on the CPU decoding's own bf16, `decoding_precision`)."""
    options = DecodeOptions.from_config(config.decode, beam=config.train.valid_beam, nbest=1)
    return replace(options, precision=precision, shortlist=False)  # the whole output layer: exact scores


@torch.no_grad()
def validate(
    model: Transformer, corpus: EncodedCorpus, tokenizer: Tokenizer, config: Config, device: torch.device
) -> dict[str, float]:
    """Loss/perplexity over the whole split; BLEU/chrF (beam `train.valid_beam`) on its first `valid_sentences`.

    `corpus` is the validation split as prepared for training (with its reference texts).
    """
    model.eval()
    precision = training_precision(device, config.train.precision)
    objective = TranslationLoss(model, config.train.label_smoothing)
    loss_sum = nll_sum = tokens = 0.0
    batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, config.train.max_tokens)
    for indices in progress_bar(batches, desc="validation loss", unit="batch", leave=False):
        src, tgt_in, tgt_out = (x.to(device) for x in corpus.batch(indices))
        with autocast(device, precision):
            loss, nll = objective(src, tgt_in, tgt_out)
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        tokens += int((tgt_out != PAD).sum())
    # the first valid_sentences of each direction, decoded together
    chosen = [pairs[: config.train.valid_sentences or len(pairs)] for _, pairs in corpus.parts]
    sources = [corpus.src_sentence(i) for pairs in chosen for i in pairs]
    hyps = decode(TorchEngine(model, device), sources, validation_options(config, precision))
    texts, references = tokenizer.decode_tgt([found[0].tokens for found in hyps]), corpus.tgt_texts()
    scores = {"valid_loss": loss_sum / tokens, "valid_ppl": math.exp(min(nll_sum / tokens, 50))}
    each, start = {}, 0
    for (name, _), pairs in zip(corpus.parts, chosen):
        each[name] = corpus_scores(texts[start : start + len(pairs)], [references[i] for i in pairs])
        start += len(pairs)
    # a multilingual model is judged by the mean over its directions
    scores["valid_bleu"] = sum(s["bleu"] for s in each.values()) / len(each)
    scores["valid_chrf"] = sum(s["chrf"] for s in each.values()) / len(each)
    if len(corpus.parts) > 1 or corpus.parts[0][0]:
        for name, found in each.items():
            scores[f"valid_bleu_{name}"], scores[f"valid_chrf_{name}"] = found["bleu"], found["chrf"]
    return scores


def direction_scores(scores: dict[str, float], metric: str = "bleu") -> dict[str, float]:
    """The per-direction `metric` of a multilingual validation (`valid_bleu_de-en` -> {"de-en": ...})."""
    prefix = f"valid_{metric}_"
    return {key[len(prefix) :]: value for key, value in scores.items() if key.startswith(prefix)}


def describe(scores: dict[str, float]) -> str:
    """`validate`'s scores as the one line training logs."""
    loss, ppl, bleu, chrf = (scores[f"valid_{name}"] for name in ("loss", "ppl", "bleu", "chrf"))
    line = f"valid loss {loss:.3f} ppl {ppl:.2f} BLEU {bleu:.2f} chrF {chrf:.2f}"
    each = direction_scores(scores)
    return line + (f" (mean; {', '.join(f'{k} {v:.2f}' for k, v in each.items())})" if each else "")
