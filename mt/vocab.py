"""Special piece ids, the same in every model `mt` trains (its SentencePiece models are trained with them)."""

PAD, UNK, BOS, EOS = 0, 1, 2, 3
