"""Word alignments from cross-attention: pieces mapped to words, one link per target word."""

from pathlib import Path

import torch
from conftest import run_mt

from mt.alignment import word_alignment, word_of_each_piece

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "run_0.1.0" / "run"


def test_pieces_map_to_the_words_of_the_detokenized_text():
    assert word_of_each_piece(["▁A", "▁dog", "s", "▁"]) == [0, 1, 1, 1]
    assert word_of_each_piece(["▁", "7", "▁", "8", "9"]) == [0, 0, 1, 1, 1]
    assert word_of_each_piece(["run", "s", "▁fast"]) == [0, 0, 1]


def test_each_target_word_links_to_the_source_word_with_most_attention():
    src = ["▁a", "▁b", "c", "▁d"]  # words a, bc, d
    tgt = ["▁x", "▁y", "z"]  # words x, yz
    attention = torch.tensor(
        [
            [0.1, 0.0, 0.1, 0.8],  # x looks at d
            [0.4, 0.3, 0.3, 0.0],  # y: a is the single strongest piece ...
            [0.2, 0.4, 0.4, 0.0],  # ... but over both pieces of yz, the word bc has most (1.4 vs 0.6)
        ]
    )
    assert word_alignment(attention, src, tgt) == [(2, 0), (1, 1)]


def test_alignment_through_the_cli_on_a_model_that_reverses(trained):
    lines = (trained / "test.src").read_text().splitlines()[:30]
    out = run_mt("translate", str(trained / "run"), "--alignment", stdin="".join(f"{x}\n" for x in lines)).stdout
    reversed_links = total = 0
    for source, line in zip(lines, out.splitlines()):
        text, alignment = line.split(" ||| ")
        links = [tuple(map(int, pair.split("-"))) for pair in alignment.split()]
        assert [t for _, t in links] == list(range(len(text.split())))  # one entry per target word, in order
        assert all(0 <= s < len(source.split()) for s, _ in links)
        n = len(source.split())
        reversed_links += sum(s == n - 1 - t for s, t in links)
        total += len(links)
    assert reversed_links / total > 0.5  # target word j of a reversal comes from source word n-1-j


def test_alignment_errors_are_one_line(tmp_path):
    bad = run_mt("translate", str(FIXTURE_RUN), "--alignment", "--alignment-layer", "3", stdin="1 2\n", check=False)
    assert bad.returncode == 2 and "decoder layers 0..0" in bad.stderr


def test_an_over_long_source_is_aligned_on_what_the_model_read():
    from mt.translate import Translator

    translator = Translator(FIXTURE_RUN, device="cpu")
    read = translator.engine.max_source
    long_line = " ".join(["7"] * (read + 20))
    [[long_one], [short_one]] = translator.translate_chunks([[long_line, "1 2 3"]], translator.options(beam=1), -1)
    for found in (long_one, short_one):
        assert [t for _, t in found.alignment] == list(range(len(found.text.split())))
    assert max(s for s, _ in long_one.alignment) < read
