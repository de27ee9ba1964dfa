"""One split of a data source as plain text, and calibration rows cut from it.

`slm prune` and `slm quantize` calibrate on, and measure perplexity over, the same text; they
take it from here so the two can never disagree on what a split's text is.
"""

from __future__ import annotations

from slm_cli.data import load_splits
from slm_cli.data.errors import DataError


def split_text(source: str, split: str, seed: int) -> str:
    """The records of one split of a data source, as one text (blocks joined by blank lines)."""
    from slm_cli.models import example_texts

    splits = load_splits(source, train_size=1, val_size=None, test_size=None, seed=seed)
    return "\n\n".join(example_texts(splits[split]))


def calibration_rows(text: str, tokenizer, samples: int, seq_len: int, source: str = "?"):
    """The first samples*seq_len tokens of `text` as a (samples, seq_len) tensor of input ids.

    Fewer tokens than that is an error, not a quietly smaller calibration set: the statistics a
    pruning or FP8 scale is fitted on would then differ from what the config (and slm.json) says.
    `source` is the calibration.source the text came from, for the message.
    """
    import torch

    ids = tokenizer(text, verbose=False)["input_ids"]
    rows = len(ids) // seq_len
    if rows < samples:
        lower = f"lower calibration.samples to {rows} or calibration.seq_len" if rows else "lower calibration.seq_len"
        raise DataError(
            f"calibration.source={source} gives {len(ids):,} tokens of calibration text (its validation split): "
            f"{rows} row(s) of calibration.seq_len={seq_len}, fewer than calibration.samples={samples} asked. "
            f"Either {lower}, or choose a larger calibration.source."
        )
    return torch.tensor(ids[: samples * seq_len]).view(samples, seq_len)
