"""Validation during training: loss and perplexity over the validation split, BLEU/chrF of its decoding."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from mt.batching import make_batches
from mt.config import Config
from mt.corpus_cache import EncodedCorpus
from mt.decoding import DecodeOptions, TorchEngine, decode
from mt.device import autocast
from mt.evaluate import corpus_scores
from mt.loss import TranslationLoss
from mt.model import Transformer
from mt.progress import progress_bar
from mt.tokenizer import Tokenizer
from mt.vocab import PAD


def validation_options(config: Config) -> DecodeOptions:
    """The model's decoding defaults, with the validation beam, in the training precision (so BLEU and
    loss are measured in the same arithmetic)."""
    t = config.train
    return replace(DecodeOptions.from_config(config.decode, beam=t.valid_beam, nbest=1), precision=t.precision)


@torch.no_grad()
def validate(
    model: Transformer, corpus: EncodedCorpus, tokenizer: Tokenizer, config: Config, device: torch.device
) -> dict[str, float]:
    """Loss/perplexity over the whole split; BLEU/chrF (beam `train.valid_beam`) on its first `valid_sentences`.

    `corpus` is the validation split as prepared for training (with its reference texts).
    """
    model.eval()
    objective = TranslationLoss(model, config.train.label_smoothing)
    loss_sum = nll_sum = tokens = 0.0
    batches = make_batches(corpus.src_lengths, corpus.tgt_lengths, config.train.max_tokens)
    for indices in progress_bar(batches, desc="validation loss", unit="batch", leave=False):
        src, tgt_in, tgt_out = (x.to(device) for x in corpus.batch(indices))
        with autocast(device, config.train.precision):
            loss, nll = objective(src, tgt_in, tgt_out)
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
        tokens += int((tgt_out != PAD).sum())
    count = min(config.train.valid_sentences or len(corpus), len(corpus))
    sources = [corpus.src_sentence(i) for i in range(count)]
    hyps = decode(TorchEngine(model, device), sources, validation_options(config))
    scores = corpus_scores(tokenizer.decode_tgt([found[0].tokens for found in hyps]), corpus.tgt_texts()[:count])
    return {
        "valid_loss": loss_sum / tokens,
        "valid_ppl": math.exp(min(nll_sum / tokens, 50)),
        "valid_bleu": scores["bleu"],
        "valid_chrf": scores["chrf"],
    }


def describe(scores: dict[str, float]) -> str:
    """`validate`'s scores as the one line training logs."""
    loss, ppl, bleu, chrf = (scores[f"valid_{name}"] for name in ("loss", "ppl", "bleu", "chrf"))
    return f"valid loss {loss:.3f} ppl {ppl:.2f} BLEU {bleu:.2f} chrF {chrf:.2f}"
