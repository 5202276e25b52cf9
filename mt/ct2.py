"""CTranslate2 (the optional extra `mt[ct2]`): export a run directory's model, and decode with an export.

The exported directory holds CTranslate2's model and vocabularies plus copies of the run's config
and SentencePiece model(s), so `mt translate OUT` works on it like on a run directory: its
`CTranslate2Engine` is one of the two engines behind `mt.decoding.decode`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mt.config import Config, load_config
from mt.decoding import DecodeOptions, load_model
from mt.device import cpu_workers
from mt.errors import CheckpointError, MTError
from mt.files import atomic_write_text
from mt.model import Transformer
from mt.run_dir import RunDir, model_dir
from mt.search import Hypothesis, length_limits
from mt.shortlist import Shortlist
from mt.tokenizer import Tokenizer, load_tokenizer


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise MTError("CTranslate2 export needs ctranslate2: pip install 'mt[ct2]'") from None
    return ctranslate2


def _model_spec(model: Transformer, src_vocab: list[str], tgt_vocab: list[str]):
    """CTranslate2's TransformerSpec holding `model`'s weights (same layout: fused q/k/v, pre- or post-norm)."""
    from ctranslate2.specs import transformer_spec

    c = model.config
    pre_norm = c.norm == "pre"
    if c.position == "rope":
        # rotary on all head channels; ours pairs channel i with i + Dh/2, not with its neighbour
        rotary = {"rotary_dim": 0, "rotary_interleave": False}
        spec = transformer_spec.TransformerSpec(
            transformer_spec.TransformerEncoderSpec(c.encoder_layers, c.heads, pre_norm=pre_norm, **rotary),
            transformer_spec.TransformerDecoderSpec(c.decoder_layers, c.heads, pre_norm=pre_norm, **rotary),
        )
    else:
        spec = transformer_spec.TransformerSpec.from_config(
            (c.encoder_layers, c.decoder_layers), c.heads, pre_norm=pre_norm
        )
    spec.config.layer_norm_epsilon = model.encoder[0].attn_block.norm.eps
    spec.config.add_source_eos = True  # mt ends every source with EOS; decoding starts from <s> (BOS)

    def array(tensor: torch.Tensor):
        return tensor.detach().float().cpu().numpy()

    def linear(target, module: torch.nn.Linear) -> None:
        target.weight = array(module.weight)
        if module.bias is not None:
            target.bias = array(module.bias)

    def norm(target, module: torch.nn.LayerNorm) -> None:
        target.gamma, target.beta = array(module.weight), array(module.bias)

    for stack, embedding in ((spec.encoder, model.src_embed), (spec.decoder, model.tgt_embed)):
        embeddings = stack.embeddings[0] if isinstance(stack.embeddings, list) else stack.embeddings
        embeddings.weight = array(embedding.weight)
        stack.scale_embeddings = math.sqrt(model.dim)
        if c.position == "learned":
            stack.position_encodings.encodings = array(model.position_embed.weight)
        elif c.position == "sinusoidal":
            stack.position_encodings.encodings = array(model.positions)
        elif hasattr(stack, "position_encodings"):
            # CTranslate2's encoder always adds a table (sinusoidal if none is given); rotary models add none
            stack.position_encodings.encodings = np.zeros((model.max_positions, model.dim), dtype=np.float32)

    def self_attention_and_ffn(target, layer, attention_block) -> None:
        linear(target.self_attention.linear[0], layer.self_attn.qkv_proj)
        linear(target.self_attention.linear[1], layer.self_attn.out_proj)
        norm(target.self_attention.layer_norm, attention_block.norm)
        linear(target.ffn.linear_0, layer.ffn.fc1)
        linear(target.ffn.linear_1, layer.ffn.fc2)
        norm(target.ffn.layer_norm, layer.ffn_block.norm)

    for target, layer in zip(spec.encoder.layer, model.encoder):
        self_attention_and_ffn(target, layer, layer.attn_block)
    for target, layer in zip(spec.decoder.layer, model.decoder):
        self_attention_and_ffn(target, layer, layer.self_block)
        linear(target.attention.linear[0], layer.cross_attn.q_proj)
        linear(target.attention.linear[1], layer.cross_attn.kv_proj)
        linear(target.attention.linear[2], layer.cross_attn.out_proj)
        norm(target.attention.layer_norm, layer.cross_block.norm)
    if c.norm == "pre":
        norm(spec.encoder.layer_norm, model.encoder_norm)
        norm(spec.decoder.layer_norm, model.decoder_norm)
    spec.decoder.projection.weight = array(model.output_weight)
    spec.register_source_vocabulary(src_vocab)
    spec.register_target_vocabulary(tgt_vocab)
    return spec


def export_ctranslate2(
    run_dir: Path, out: Path, quantization: str = "int8", checkpoint: str | None = None, force: bool = False
) -> Path:
    """Convert a run directory's model to a CTranslate2 model directory `out`."""
    ctranslate2 = _ctranslate2()
    run, out = model_dir(run_dir), Path(out)
    if out.exists() and not force:
        raise MTError(f"{out}: exists; use --force to replace it")
    config = load_config(run.config)
    checkpoint = checkpoint or config.decode.checkpoint
    tokenizer = load_tokenizer(run, config.tokenizer.joint)
    model = load_model(run, config, tokenizer, torch.device("cpu"), checkpoint)

    def pieces(processor) -> list[str]:
        return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]

    class MtConverter(ctranslate2.converters.Converter):
        def _load(self):
            return _model_spec(model, pieces(tokenizer.src), pieces(tokenizer.tgt))

    with tempfile.TemporaryDirectory() as scratch:
        vmap = None
        if run.shortlist.is_file():  # the shortlist as CTranslate2's vocabulary map (translate with use_vmap)
            vmap = Path(scratch) / "vmap.txt"
            shortlist = Shortlist.load(run.shortlist, tokenizer.fingerprint())
            atomic_write_text(vmap, vocabulary_map(shortlist, pieces(tokenizer.src), pieces(tokenizer.tgt)))
        try:
            MtConverter().convert(
                str(out), vmap=None if vmap is None else str(vmap), quantization=quantization, force=True
            )
        except (ValueError, RuntimeError) as exc:
            raise MTError(f"CTranslate2 conversion failed: {exc}") from None
    exported = RunDir(out)
    shutil.copy(run.config, exported.config)
    if run.shortlist.is_file():
        shutil.copy(run.shortlist, exported.shortlist)
    for path in run.tokenizer_files(config.tokenizer.joint):
        shutil.copy(path, out / path.name)
    info = {"engine": "ctranslate2", "quantization": quantization, "from": str(run_dir), "checkpoint": checkpoint}
    atomic_write_text(exported.export_info, json.dumps(info, indent=2) + "\n")
    return out


def vocabulary_map(shortlist: Shortlist, src_pieces: list[str], tgt_pieces: list[str]) -> str:
    """CTranslate2's vmap text: `source piece<TAB>target pieces` per line; the line with an empty
    source lists the pieces every batch may use."""
    lines = ["\t" + " ".join(tgt_pieces[i] for i in shortlist.frequent)]
    for source, row in enumerate(shortlist.per_source):
        targets = [tgt_pieces[i] for i in row.tolist() if i >= 0]
        if targets and source < len(src_pieces):
            lines.append(f"{src_pieces[source]}\t{' '.join(targets)}")
    return "".join(line + "\n" for line in lines)


class CTranslate2Engine:
    """An `mt export` directory loaded into CTranslate2; mt's decoding path batches, sorts and detokenizes."""

    def __init__(self, model_dir: Path, config: Config, tokenizer: Tokenizer, device: str = "auto", threads: int = 0):
        ctranslate2 = _ctranslate2()
        if not RunDir(model_dir).is_export():
            raise CheckpointError(f"{model_dir}: not a CTranslate2 export of mt (see `mt export`)")
        ct2_device = "cuda" if device in ("auto", "cuda") and ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.device = torch.device(ct2_device)
        self.model_dir, self.threads = str(model_dir), threads or torch.get_num_threads()
        self._translators: dict[int, object] = {}  # by decode.workers (CTranslate2's inter_threads)
        self.translator(DecodeOptions.from_config(config.decode))  # a broken export fails here, not mid-way
        self.max_positions = config.model.max_positions
        self.max_source = self.max_positions - 1
        self.has_shortlist = (Path(model_dir) / "vmap.txt").is_file()  # as CTranslate2's vmap
        self.src_pieces = [tokenizer.src.id_to_piece(i) for i in range(tokenizer.src_vocab_size)]
        self.vocab_size = tokenizer.tgt_vocab_size
        self.tgt_pieces = [tokenizer.tgt.id_to_piece(i) for i in range(tokenizer.tgt_vocab_size)]
        self.piece_id = tokenizer.tgt.piece_to_id

    def translator(self, options: DecodeOptions):
        """CTranslate2's translator running `options.workers` batches at once, each on its share of the
        threads (on 2 CPU cores two 1-thread batches decode 1.2-1.7x faster than one 2-thread batch)."""
        workers = min(cpu_workers(options.workers, self.device), self.threads)
        if workers not in self._translators:
            self._translators[workers] = _ctranslate2().Translator(
                self.model_dir,
                device=self.device.type,
                inter_threads=workers,
                intra_threads=max(1, self.threads // workers),
            )
        return self._translators[workers]

    def check(self, options: DecodeOptions) -> None:
        """A one-line error for settings a CTranslate2 export cannot decode with."""
        if options.sampling:
            raise MTError(
                "--sampling needs a run directory of mt's own model: CTranslate2's samples do not follow "
                "a seed (its issue #1757), so they could not be reproduced"
            )
        if options.precision in ("bf16", "fp16", "int8"):
            raise MTError(
                f"precision {options.precision}: a CTranslate2 export computes in the type it was exported "
                "with (mt export --quantization)"
            )
        if options.shortlist and not self.has_shortlist:
            raise MTError("decode.shortlist: this export has no vocabulary map (export a run that has a shortlist)")

    def search(
        self, sources: list[list[int]], options: DecodeOptions, prefixes: list[list[int]] | None = None
    ) -> list[list[Hypothesis]]:
        self.check(options)
        # CTranslate2 takes one length limit per call; ours is per sentence (pieces with EOS), so
        # sentences sharing a limit go together, and every group is queued at once so that the
        # translator's workers (inter_threads) decode them side by side
        lengths = torch.tensor([len(ids) for ids in sources])
        forced = torch.tensor([len(p) for p in prefixes]) if prefixes else None
        limits = length_limits(lengths, forced, options, self.max_positions).tolist()
        translator, queued = self.translator(options), []
        for limit in sorted(set(limits)):
            group = [i for i, value in enumerate(limits) if value == limit]
            results = translator.translate_batch(
                [[self.src_pieces[i] for i in sources[index]] for index in group],
                target_prefix=[[self.tgt_pieces[i] for i in prefixes[index]] for index in group] if prefixes else None,
                length_penalty=options.length_penalty,
                no_repeat_ngram_size=options.no_repeat_ngram,
                max_decoding_length=max(limit - 1, 1),  # CTranslate2 counts pieces without EOS
                max_batch_size=options.rows_per_batch,
                batch_type="tokens",
                return_scores=True,
                use_vmap=options.shortlist,
                beam_size=options.beam,
                num_hypotheses=options.nbest,
                asynchronous=True,
            )
            queued.append((group, results))
        found: list[list[Hypothesis]] = [[] for _ in sources]
        for group, results in queued:
            for index, pending in zip(group, results):
                r = pending.result()
                found[index] = [
                    self._hypothesis(tokens, score, options) for tokens, score in zip(r.hypotheses, r.scores)
                ]
        self._score_forced_ends(sources, found, limits, options)
        return found

    def _score_forced_ends(
        self, sources: list[list[int]], found: list[list[Hypothesis]], limits: list[int], options: DecodeOptions
    ) -> None:
        """CTranslate2 stops a hypothesis at the length limit without the EOS that mt's own search forces
        (and scores) there: rescore those hypotheses, rare, with their EOS, so both engines agree."""
        cut = [
            (i, rank) for i, hyps in enumerate(found) for rank, h in enumerate(hyps) if len(h.tokens) + 1 >= limits[i]
        ]
        if not cut:
            return
        log_probs = self.score([sources[i] for i, _ in cut], [found[i][rank].tokens for i, rank in cut], options)
        for (i, rank), pieces in zip(cut, log_probs):
            tokens, total = found[i][rank].tokens, sum(pieces)
            found[i][rank] = Hypothesis(tokens, total / (len(tokens) + 1) ** options.length_penalty, total)
        for i in {i for i, _ in cut}:
            found[i].sort(key=lambda h: h.score, reverse=True)

    def score(self, sources: list[list[int]], targets: list[list[int]], options: DecodeOptions) -> list[list[float]]:
        """Teacher-forced log-probability of each target piece and of the closing EOS, per pair."""
        results = self.translator(options).score_batch(
            [[self.src_pieces[i] for i in ids] for ids in sources],
            [[self.tgt_pieces[i] for i in ids] for ids in targets],
            max_batch_size=options.rows_per_batch,
            batch_type="tokens",
        )
        return [list(r.log_probs) for r in results]

    def _hypothesis(self, pieces: list[str], score: float, options: DecodeOptions) -> Hypothesis:
        """CTranslate2 returns the normalised score; the log-probability is that times length ** penalty."""
        tokens = [self.piece_id(p) for p in pieces]
        return Hypothesis(tokens, score, score * (len(tokens) + 1) ** options.length_penalty)
