"""The `mt` command line: parses arguments and calls one library function per command.

Exit codes: 0 success (also a training run stopped by SIGINT/SIGTERM after saving a checkpoint),
2 bad input or a failed run (a one-line message on stderr; `mt --debug ...` shows the traceback)
or usage, 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from mt import __version__
from mt.errors import MTError, one_line
from mt.progress import configure_output, progress_bar

_options = {"debug": False}


class _Commands(typer.core.TyperGroup):
    """Every command's MTError, and an operating-system error (disk full, read-only, a file where a
    directory belongs), becomes one line `mt: error: ...` and exit code 2 (`--debug`: the traceback)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (MTError, OSError) as exc:
            if _options["debug"] or isinstance(exc, BrokenPipeError):
                raise
            typer.echo(f"mt: error: {one_line(exc)}", err=True)
            ctx.exit(2)


app = typer.Typer(
    cls=_Commands,
    help="Train, run and score Transformer translation models.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch or import parallel corpora into data/.", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("mt")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debugging details."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error, not just its message."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines; warnings and errors only."),
) -> None:
    _options["debug"] = debug
    configure_output(log, verbose, quiet)


def _report(reports: dict) -> None:
    for split, report in reports.items():
        log.info("%s: %d pairs (%d empty dropped)", split, report.pairs, report.dropped_empty)


@data_app.command("fetch")
def data_fetch(
    name: str | None = typer.Argument(None, help="Built-in corpus: multi30k."),
    pair: str | None = typer.Option(None, help="Source-target languages, e.g. de-en (the default)."),
    langs: str | None = typer.Option(
        None, help="multi30k: several languages, e.g. en,de,fr,cs: one multi-way directory for data.directions."
    ),
    source: str | None = typer.Option(
        None,
        help="Directory or URL mirroring the corpus files (multi30k; default $MT_MULTI30K_SOURCE or the public URL).",
    ),
    hf: str | None = typer.Option(None, "--hf", help="A Hugging Face Hub dataset with a `translation` column."),
    hf_config: str | None = typer.Option(None, "--hf-config", help="The Hub dataset's configuration name."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default data/NAME-SRC-TGT)."),
    force: bool = typer.Option(False, help="Replace existing files."),
) -> None:
    """Download a corpus into plain line-aligned files plus manifest.json.

    Examples: mt data fetch multi30k --pair de-en;
    mt data fetch multi30k --langs en,de,fr,cs   (data/multi30k: every direction of the four);
    mt data fetch --hf iwslt2017 --hf-config iwslt2017-de-en --pair de-en
    """
    from mt import data

    if hf is not None:
        if name is not None:
            raise MTError("give either a corpus NAME or --hf, not both")
        reports = data.fetch_hub(hf, pair or "de-en", hf_config, out, force)
    elif name == "multi30k":
        if pair and langs:
            raise MTError("give --pair or --langs, not both")
        reports = data.fetch_multi30k(pair, out, source, force, langs)
    else:
        raise MTError(f"unknown corpus {name!r}: use multi30k, or --hf NAME for a Hugging Face dataset")
    _report(reports)


@data_app.command("import")
def data_import(
    out: Path = typer.Option(..., "--out", "-o", help="Corpus directory to write, e.g. data/mycorpus."),
    split: str = typer.Option("train", help="Split name: train, valid or test."),
    src: Path | None = typer.Option(None, help="Source-language file (plain text or .gz), one sentence per line."),
    tgt: Path | None = typer.Option(None, help="Target-language file, line-aligned with --src."),
    tsv: Path | None = typer.Option(None, help="Tab-separated file: source<TAB>target per line."),
    pair: str | None = typer.Option(None, help="Languages, e.g. de-en (default: from the file suffixes)."),
    errors: str = typer.Option("strict", help="Invalid UTF-8: strict (fail, naming the line) or replace."),
    force: bool = typer.Option(False, help="Replace existing files."),
) -> None:
    """Import local parallel files.

    Example: mt data import --src train.de --tgt train.en --out data/mycorpus --split train
    """
    from mt import data

    if errors not in ("strict", "replace"):
        raise MTError(f"--errors {errors!r}: use strict or replace")
    _report(data.import_files(out, split, src, tgt, tsv, pair, errors, force))


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (configs/multi30k_de_en.yaml) or a run directory to resume."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run's newest checkpoint (an error if none)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: section.key=value (repeatable)."),
    max_epochs: int | None = typer.Option(None, help="Stop after this many epochs."),
    max_steps: int | None = typer.Option(None, help="Stop after this many updates."),
    max_time: str | None = typer.Option(None, help="Stop after this wall-clock time, e.g. 20m, 1h30m."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (eager where unsupported)."),
    errors: str | None = typer.Option(
        None, help="Invalid UTF-8 in the corpus: strict (fail, naming the line) or replace."
    ),
    init_from: str | None = typer.Option(
        None, help="Start a new run from this run directory's (or checkpoint's) weights and tokenizer: fine-tuning."
    ),
    keep_optimizer: bool = typer.Option(
        False, "--keep-optimizer", help="With --init-from: carry its optimizer state and update counter over too."
    ),
) -> None:
    """Train a model; the run directory (train.run_dir) gets config, tokenizer, checkpoints, metrics.

    Example: mt train configs/multi30k_de_en.yaml --max-time 20m --set train.lr=5e-4

    Fine-tuning: mt train new_data.yaml --init-from runs/base starts a new run directory
    (train.run_dir) from runs/base's best weights, reusing its tokenizer; optimizer, schedule and
    data position start fresh unless --keep-optimizer.

    Running it again on a run directory with checkpoints continues exactly where the newest one
    left off (so does `mt train RUN_DIR --resume`); SIGINT/SIGTERM stop after the current update
    with a checkpoint saved.

    On several GPUs or machines, start it with torchrun (DistributedDataParallel):
    torchrun --nproc-per-node 4 -m mt train configs/multi30k_de_en.yaml
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mt.config import load_config
    from mt.run_dir import RunDir
    from mt.train import train as run_training

    overrides = list(set_)
    if compile:
        overrides.append("train.compile=true")
    for key, value in (("max_epochs", max_epochs), ("max_steps", max_steps), ("max_time", max_time)):
        if value is not None:
            overrides.append(f"train.{key}={value}")
    if errors is not None:
        overrides.append(f"data.errors={errors}")
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
    if keep_optimizer:
        overrides.append("train.keep_optimizer=true")
    if config.is_dir():  # a run directory: its own config, written by the run
        overrides.insert(0, f"train.run_dir={config}")
        config = RunDir(config).config
    cfg = load_config(config, overrides)
    with logging_redirect_tqdm(loggers=[log]):
        run_training(cfg, resume)


@app.command()
def average(
    run_dir: Path = typer.Argument(..., help="Run directory with step checkpoints."),
    last: int = typer.Option(5, "--last", help="Average the newest N step checkpoints."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write, e.g. RUN_DIR/averaged.pt."),
    force: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """Average the weights of a run's last N checkpoints into one (often +0.5-1 BLEU over the last).

    Example: mt average runs/multi30k_de_en --last 5 -o runs/multi30k_de_en/averaged.pt;
    then mt translate runs/multi30k_de_en --checkpoint averaged.pt
    """
    from mt.run_dir import RunDir, average_last, save_checkpoint

    if output.exists() and not force:
        raise MTError(f"{output}: exists; use --force to replace it")
    averaged = average_last(RunDir(run_dir), last)
    save_checkpoint(output, averaged)
    log.info("averaged %s into %s", ", ".join(Path(p).name for p in averaged.averaged or []), output)


# decoding options `mt translate` and `mt eval` share
SHORTLIST_OPTION = typer.Option(
    None, "--shortlist/--no-shortlist", help="Output layer over the run's lexical shortlist (default: config)."
)
BEAM_STOP_OPTION = typer.Option(
    None, help="When a sentence's beam stops: exact, heuristic or k_finished (default: decode.beam_stop)."
)
WORKERS_OPTION = typer.Option(
    None,
    help="CPU batches decoded at once, each on its share of the threads (default: decode.workers; 0: one per thread).",
)
PRECISION_OPTION = typer.Option(
    None,
    help="Arithmetic of run directories: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 (fast on CPUs with "
    "bf16 matrix instructions), fp16, int8 (the CPU's matrix products in int8), fastest (bf16 on CPUs with AMX, "
    "int8 with AVX-512 VNNI, else fp32; auto on a GPU). Default: decode.precision.",
)


@app.command()
def translate(
    run_dirs: list[Path] = typer.Argument(..., help="Model directory written by `mt train`; several: an ensemble."),
    beam: int | None = typer.Option(None, help="Beam size (1 = greedy; default from the model's config)."),
    length_penalty: float | None = typer.Option(None, help="Score = log P / length ** this (default from config)."),
    nbest: int = typer.Option(1, help="Print the N best hypotheses per line as `index<TAB>score<TAB>text`."),
    no_repeat_ngram: int | None = typer.Option(None, help="Never repeat an n-gram of this size (0 = allow)."),
    checkpoint: str | None = typer.Option(
        None, help="Checkpoint in the run directory or a path (default: decode.checkpoint of its config, best.pt)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    engine: str = typer.Option("auto", help="auto (ctranslate2 for a directory from `mt export`), torch, ctranslate2."),
    weight: list[float] = typer.Option([], "--weight", help="Ensemble weight of each model, in order (repeatable)."),
    prefix_file: Path | None = typer.Option(None, help="Target prefixes, one per input line: each output starts so."),
    tsv: bool = typer.Option(False, "--tsv", help="Input lines are source<TAB>target prefix."),
    sampling: bool = typer.Option(False, "--sampling", help="Draw each piece at random instead of searching."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (< 1 sharper, > 1 flatter)."),
    top_k: int = typer.Option(0, help="Sample from the k most probable pieces only (0 = all)."),
    top_p: float = typer.Option(1.0, help="Sample from the smallest set of pieces with this much probability."),
    seed: int = typer.Option(1, help="Random seed of --sampling: the same seed gives the same output."),
    alignment: bool = typer.Option(
        False, "--alignment", help="Append ' ||| ' and word alignments 'i-j' (source i, target j) to each line."
    ),
    alignment_layer: int | None = typer.Option(
        None, help="Decoder layer whose cross-attention aligns (default: the second to last)."
    ),
    src_lang: str | None = typer.Option(None, help="Input language (a warning when the model never learnt it)."),
    tgt_lang: str | None = typer.Option(None, help="Output language of a multilingual model (required if several)."),
    pivot: str | None = typer.Option(None, help="Translate into this language first, then on into --tgt-lang."),
    pivot_model: Path | None = typer.Option(
        None, help="With --pivot: the model of the second pass (default: the same model)."
    ),
    shortlist: bool | None = SHORTLIST_OPTION,
    beam_stop: str | None = BEAM_STOP_OPTION,
    workers: int | None = WORKERS_OPTION,
    precision: str | None = PRECISION_OPTION,
) -> None:
    """Translate stdin to stdout, one output line per input line (blank in, blank out).

    Examples: echo "Ein Mann fährt Fahrrad." | mt translate runs/multi30k_de_en --beam 5;
    mt translate exported/multi30k_de_en_int8 < input.de > output.en   (a CTranslate2 export);
    mt translate runs/seed1 runs/seed2 < input.de   (an ensemble: log-probabilities averaged every step);
    printf 'Ein Hund rennt.\tA dog\n' | mt translate runs/multi30k_de_en --tsv   (a target prefix);
    mt translate runs/multi30k_de_en --sampling --top-p 0.9 --nbest 4 --seed 7 < input.de;
    mt translate runs/multi30k_de_en --alignment < input.de   ("A dog runs . ||| 0-0 1-1 2-2 3-3");
    mt translate runs/multi30k_multilingual --tgt-lang fr < input.de   (a multilingual model: output in French);
    mt translate runs/multi30k_multilingual --src-lang de --tgt-lang fr --pivot en < input.de   (through English)
    """
    from mt.translate import Translator, check_languages, pivot_chunks, read_chunks, split_tabs, with_prefix_file

    _check_translate_inputs(tsv, prefix_file, pivot, pivot_model, alignment)
    translator = Translator(run_dirs, checkpoint, device, engine, weight or None)
    second = translator if pivot_model is None or pivot is None else Translator(pivot_model, None, device, engine)
    check_languages(translator, second, src_lang, tgt_lang, pivot)
    # the search settings both passes of a pivot share; the output-only ones go to the last pass
    search = dict(
        beam=beam,
        length_penalty=length_penalty,
        shortlist=shortlist,
        beam_stop=beam_stop,
        workers=workers,
        precision=precision,
    )
    sample = {"sampling": True, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    options = second.options(
        **search, nbest=nbest, no_repeat_ngram=no_repeat_ngram, **(sample if sampling else {}), tgt_lang=tgt_lang
    )
    chunks = read_chunks(sys.stdin)
    if tsv:
        chunks = split_tabs(chunks)
    elif prefix_file is not None:
        chunks = with_prefix_file(chunks, prefix_file)
    layer = (
        (alignment_layer if alignment_layer is not None else translator.default_align_layer()) if alignment else None
    )
    # a file translated into a file gets a bar; typing, or reading translations on the terminal, does not
    into_file = not sys.stdin.isatty() and not sys.stdout.isatty()
    bar = progress_bar(desc="translating", unit=" lines", **({} if into_file else {"disable": True}))
    if pivot is not None:
        first = translator.options(**search, tgt_lang=pivot)
        results = pivot_chunks(translator, second, chunks, first, options)
    else:
        results = translator.translate_chunks(chunks, options, layer)
    _print_translations(results, nbest, bar)


def _check_translate_inputs(
    tsv: bool, prefix_file: Path | None, pivot: str | None, pivot_model: Path | None, alignment: bool
) -> None:
    if tsv and prefix_file is not None:
        raise MTError("give --tsv or --prefix-file, not both")
    if pivot is None and pivot_model is not None:
        raise MTError("--pivot-model needs --pivot LANG (the language between the two models)")
    if pivot is not None and (tsv or prefix_file is not None or alignment):
        raise MTError("--pivot translates twice: it cannot take target prefixes or print alignments")


def _print_translations(results, nbest: int, bar) -> None:
    """One line per translation on stdout (`index<TAB>score<TAB>text` with --nbest), flushed per input line."""
    from mt.alignment import format_alignment

    for index, translations in enumerate(results):
        for t in translations:
            text = t.text if t.alignment is None else f"{t.text} ||| {format_alignment(t.alignment)}"
            sys.stdout.write(text + "\n" if nbest == 1 else f"{index}\t{t.score:.4f}\t{text}\n")
        sys.stdout.flush()
        bar.update()
    bar.close()


@app.command()
def score(
    run_dirs: list[Path] = typer.Argument(..., help="Model directory written by `mt train`; several: an ensemble."),
    src: Path = typer.Option(..., help="Source sentences, one per line (plain or .gz)."),
    tgt: Path = typer.Option(..., help="Their translations to score, line-aligned with --src."),
    length_penalty: float | None = typer.Option(None, help="For the normalised score (default: the config's)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of tab-separated."),
    checkpoint: str | None = typer.Option(None, help="Checkpoint (default: decode.checkpoint of its config)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
    weight: list[float] = typer.Option([], "--weight", help="Ensemble weight of each model, in order (repeatable)."),
    tgt_lang: str | None = typer.Option(None, help="Language of --tgt, for a multilingual model (its tag)."),
) -> None:
    """Score given translations: per line `normalised<TAB>total<TAB>per-piece log-probabilities`.

    normalised = total / (pieces + EOS) ** length_penalty, the score beam search ranks by; the total
    is log P(translation | source), its last piece the closing EOS. To rank candidates or filter a
    noisy corpus. Example: mt score runs/multi30k_de_en --src test.de --tgt test.en > scores.tsv
    """
    import json

    from mt.data import read_lines
    from mt.translate import Translator

    sources, targets = read_lines(src), read_lines(tgt)
    if len(sources) != len(targets):
        raise MTError(f"{src} has {len(sources)} lines, {tgt} has {len(targets)}: they must be line-aligned")
    translator = Translator(run_dirs, checkpoint, device, weights=weight or None)
    options = translator.options(length_penalty=length_penalty, tgt_lang=tgt_lang)
    for found in translator.score(sources, targets, options):
        pieces = [round(p, 4) for p in found.pieces]
        if as_json:
            typer.echo(json.dumps({"normalised": found.normalised, "total": found.total, "pieces": pieces}))
        else:
            typer.echo(f"{found.normalised:.4f}\t{found.total:.4f}\t{' '.join(f'{p:.4f}' for p in pieces)}")


@app.command()
def tune(
    run_dirs: list[Path] = typer.Argument(..., help="Run directory written by `mt train`; several: an ensemble."),
    checkpoint: list[str] = typer.Option([], help="Checkpoint to try (repeatable; default best.pt), e.g. averaged.pt."),
    beam: list[int] = typer.Option([4, 5], help="Beam size to try (repeatable)."),
    length_penalty: list[float] = typer.Option([0.6, 1.0, 1.4], help="Length penalty to try (repeatable)."),
    max_sentences: int = typer.Option(0, help="Use only the first N validation sentences (0 = all)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the table; leave config.yaml alone."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
    weight: list[float] = typer.Option([], "--weight", help="Ensemble weight of each model, in order (repeatable)."),
    direction: str | None = typer.Option(
        None, help="A multilingual model: tune on this direction (e.g. de-en) only, not the mean of all."
    ),
) -> None:
    """Choose the decoding defaults (checkpoint, beam, length penalty) by validation BLEU and store them.

    Example: mt average runs/multi30k_de_en --last 3 -o runs/multi30k_de_en/averaged.pt;
    mt tune runs/multi30k_de_en --checkpoint best.pt --checkpoint averaged.pt

    An ensemble (several run directories, the first one's validation set) is tuned the same way;
    its table is printed, nothing is stored.
    """
    from mt.run_dir import BEST, RunDir
    from mt.tuning import format_tuning, tune_decoding

    if min(beam) < 1:
        raise MTError("--beam must be at least 1")
    store = not dry_run and len(run_dirs) == 1
    chosen = checkpoint or [BEST]
    rows, best = tune_decoding(
        run_dirs, chosen, beam, length_penalty, device, max_sentences, store, weight or None, direction
    )
    typer.echo(format_tuning(rows, best))
    if store:
        log.info(
            "stored in %s: decode.checkpoint=%s beam=%d length_penalty=%g",
            RunDir(run_dirs[0]).config,
            best["checkpoint"],
            best["beam"],
            best["length_penalty"],
        )


@app.command()
def card(
    run_dir: Path = typer.Argument(..., help="Run directory written by `mt train`."),
    test: bool = typer.Option(True, help="Translate and score the corpus's test split, when it has one."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
) -> None:
    """Write the model card RUN_DIR/README.md again (training writes it when it finishes).

    Example: mt card runs/multi30k_de_en
    """
    from mt.config import load_config
    from mt.device import pick_device
    from mt.model_card import facts_from_files, test_scores, write_model_card
    from mt.run_dir import model_dir

    run = model_dir(run_dir)
    scores = test_scores(run.path, load_config(run.config), device) if test else None
    log.info("wrote %s", write_model_card(run.path, pick_device(device), facts_from_files(run), scores))


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory with metrics.jsonl."),
    out: Path | None = typer.Option(None, "--out", "-o", help="PNG to write (default RUN_DIR/learning_curves.png)."),
) -> None:
    """Draw learning curves (train/valid loss, valid BLEU and chrF, learning rate) into a PNG.

    Example: mt plot runs/multi30k_de_en   (needs matplotlib: pip install 'mt\\[plot]')
    """
    from mt.plots import plot_learning_curves

    written = plot_learning_curves(run_dir, out or run_dir / "learning_curves.png")
    log.info("wrote %s", written)


@app.command()
def attention(
    run_dir: Path = typer.Argument(..., help="Model directory written by `mt train`."),
    sentence: str = typer.Argument(..., help="Source sentence to translate."),
    out: Path | None = typer.Option(None, "--out", "-o", help="PNG to write (default RUN_DIR/attention.png)."),
    layer: int = typer.Option(-1, help="Decoder layer (0 = first, -1 = last)."),
    head: int | None = typer.Option(None, help="One attention head (default: the mean over heads)."),
    all_heads: bool = typer.Option(False, "--all-heads", help="A grid with every head of the layer."),
    beam: int | None = typer.Option(None, help="Beam size (default from the model's config)."),
    checkpoint: str | None = typer.Option(
        None, help="Checkpoint in the run directory or a path (default: decode.checkpoint of its config, best.pt)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
    force: bool = typer.Option(False, help="Replace the PNG if it exists."),
    tgt_lang: str | None = typer.Option(None, help="Output language of a multilingual model."),
) -> None:
    """Translate a sentence and draw the cross-attention (output pieces x source pieces) as a heatmap.

    Example: mt attention runs/multi30k_de_en "Ein Hund läuft über die Wiese." --all-heads -o dog.png
    (needs matplotlib: pip install 'mt\\[plot]')
    """
    from mt.plots import plot_layer_attention
    from mt.translate import Translator

    out = out or run_dir / "attention.png"
    if out.exists() and not force:
        raise MTError(f"{out}: exists; use --force to replace it")
    translator = Translator(run_dir, checkpoint, device, engine="torch")
    weights, src_pieces, tgt_pieces, text = translator.attention(
        sentence, translator.options(beam=beam, tgt_lang=tgt_lang)
    )
    written = plot_layer_attention(weights, src_pieces, tgt_pieces, text, out, layer, head, all_heads)
    typer.echo(text)
    log.info("wrote %s", written)


@app.command()
def serve(
    models: list[Path] = typer.Argument(..., help="Run directories or `mt export` directories, one per language pair."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback only unless told otherwise)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(
        None, envvar="MT_API_KEY", help="Require this key (api_key field, X-API-Key or Bearer header)."
    ),
    cors: str | None = typer.Option(None, help="Allow browser pages of this origin (e.g. https://example.org)."),
    checkpoint: str | None = typer.Option(None, help="Checkpoint of each run (default: its decode.checkpoint)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
    max_wait_ms: float = typer.Option(5.0, help="How long a request waits for others to share its batch."),
    max_segments: int = typer.Option(128, help="Segments per request at most."),
    max_chars: int = typer.Option(2000, help="Characters per segment at most."),
    max_body_bytes: int = typer.Option(1 << 20, help="Request body size at most."),
    precision: str | None = PRECISION_OPTION,
) -> None:
    """Serve models over HTTP: LibreTranslate's API, mt's /v1/translate, a web page with attention.

    Example: mt serve runs/multi30k_de_en --port 8000, then open http://127.0.0.1:8000/
    (API documentation at /docs). Concurrent requests are decoded together in batches.
    SIGTERM or Ctrl-C: stop accepting, answer the requests in progress, exit 0.
    (needs FastAPI and uvicorn: pip install 'mt\\[serve]')
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MTError("mt serve needs FastAPI and uvicorn: pip install 'mt[serve]'") from None
    from mt.server import create_app, serve
    from mt.serving import ServeLimits
    from mt.translate import Translator

    if min(max_segments, max_chars, max_body_bytes) < 1 or max_wait_ms < 0:
        raise MTError("--max-segments, --max-chars and --max-body-bytes must be positive, --max-wait-ms >= 0")
    limits = ServeLimits(max_body_bytes, max_segments, max_chars, max_wait_ms=max_wait_ms)
    translators = [Translator(path, checkpoint, device, precision=precision) for path in models]
    serve(create_app(translators, limits, api_key, cors), host, port)


@app.command()
def shortlist(
    run_dir: Path = typer.Argument(..., help="Run directory written by `mt train` (with its encoded corpus)."),
    per_source: int = typer.Option(50, help="Target pieces kept for each source piece."),
    frequent: int = typer.Option(200, help="The most frequent target pieces, always allowed."),
) -> None:
    """Build the run's lexical shortlist again (training builds one when it ends): RUN_DIR/shortlist.npz.

    With `mt translate RUN_DIR --shortlist` (or decode.shortlist: true) the output layer scores only the
    target pieces the batch's source pieces co-occur with most in training, and the frequent ones.
    """
    from mt.shortlist import write_shortlist

    if per_source < 1 or frequent < 0:
        raise MTError("--per-source must be at least 1, --frequent at least 0")
    log.info("wrote %s", write_shortlist(run_dir, per_source, frequent))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Model directory written by `mt train`."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the exported model to."),
    format: str = typer.Option("ctranslate2", "--format", help="Export format: ctranslate2."),
    quantization: str = typer.Option(
        "int8", help="CTranslate2 weights: int8, int8_float32, int8_float16, int16, float16, bfloat16, float32."
    ),
    checkpoint: str | None = typer.Option(
        None, help="Checkpoint in the run directory or a path (default: decode.checkpoint of its config, best.pt)."
    ),
    force: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """Export a model for the CTranslate2 inference engine (pip install 'mt\\[ct2]').

    Example: mt export runs/multi30k_de_en --quantization int8 -o exported/de_en_int8;
    then: mt translate exported/de_en_int8 < input.de
    """
    from mt.ct2 import export_ctranslate2

    if format != "ctranslate2":
        raise MTError(f"--format {format!r}: only ctranslate2 is supported")
    log.info("wrote %s", export_ctranslate2(run_dir, output, quantization, checkpoint, force))


@app.command("eval")
def evaluate(
    run_dirs: list[Path] | None = typer.Argument(
        None, help="Model directory to translate --src with; several: an ensemble."
    ),
    src: Path | None = typer.Option(None, help="Source file to translate (with RUN_DIR)."),
    ref: Path = typer.Option(..., help="Reference translations, line-aligned."),
    hyp: list[Path] = typer.Option([], help="Hypothesis file to score (repeatable; instead of RUN_DIR + --src)."),
    paired_bs: bool = typer.Option(
        False, "--paired-bs", help="Compare the --hyp files (the first is the baseline) by paired bootstrap resampling."
    ),
    samples: int = typer.Option(1000, help="Bootstrap resamples for --paired-bs."),
    beam: int | None = typer.Option(None, help="Beam size when translating (default from the model's config)."),
    checkpoint: str | None = typer.Option(None, help="Checkpoint when translating (default: decode.checkpoint)."),
    output: Path | None = typer.Option(None, help="Also write the translations of --src here."),
    force: bool = typer.Option(False, help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps."),
    weight: list[float] = typer.Option([], "--weight", help="Ensemble weight of each model, in order (repeatable)."),
    src_lang: str | None = typer.Option(None, help="Language of --src (a warning when the model never learnt it)."),
    tgt_lang: str | None = typer.Option(None, help="Output language of a multilingual model (required if several)."),
    pivot: str | None = typer.Option(None, help="Translate into this language first, then on into --tgt-lang."),
    shortlist: bool | None = SHORTLIST_OPTION,
    beam_stop: str | None = BEAM_STOP_OPTION,
    workers: int | None = WORKERS_OPTION,
    precision: str | None = PRECISION_OPTION,
) -> None:
    """Score translations with sacreBLEU (BLEU, chrF, TER) and print the signatures.

    Examples: mt eval runs/multi30k_de_en --src data/multi30k-de-en/test.de --ref data/multi30k-de-en/test.en;
    mt eval --hyp base.en --hyp new.en --ref data/multi30k-de-en/test.en --paired-bs;
    mt eval runs/multi30k_multilingual --tgt-lang fr --src data/multi30k/test.de --ref data/multi30k/test.fr
    """
    from mt.data import read_lines
    from mt.evaluate import score_report
    from mt.files import atomic_write_text
    from mt.translate import Translator, check_languages, translate_file

    if paired_bs and samples < 1:
        raise MTError("--samples must be at least 1")
    if output is not None and output.exists() and not force:
        raise MTError(f"{output}: exists; use --force to replace it")
    if hyp:
        if run_dirs or src is not None:
            raise MTError("give either --hyp or RUN_DIR with --src, not both")
        systems = {str(path): read_lines(path) for path in hyp}
    elif run_dirs and src is not None:
        translator = Translator(run_dirs, checkpoint, device, weights=weight or None)
        check_languages(translator, translator, src_lang, tgt_lang, pivot)
        hyps = translate_file(
            translator,
            src,
            translator.options(
                beam=beam,
                tgt_lang=tgt_lang,
                shortlist=shortlist,
                beam_stop=beam_stop,
                workers=workers,
                precision=precision,
            ),
            pivot,
        )
        if output is not None:
            atomic_write_text(output, "".join(h + "\n" for h in hyps))
        systems = {" + ".join(str(path) for path in run_dirs): hyps}
    else:
        raise MTError("give --hyp, or RUN_DIR and --src")
    typer.echo(score_report(systems, read_lines(ref), samples if paired_bs else 0, as_json))


def main() -> None:
    try:
        app()
    except MTError as exc:
        if _options["debug"]:
            raise
        typer.echo(f"mt: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("mt: interrupted", err=True)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # Typer's own answer to a Ctrl-C: exit 130 without a word
            typer.echo("mt: interrupted", err=True)
        raise
    except BrokenPipeError:
        sys.exit(0)
