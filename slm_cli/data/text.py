"""One split of a data source as plain text, and calibration rows cut from it.

`slm prune`, `slm quantize` and `slm eval` calibrate on, and measure perplexity over, the text
`split_text` returns: one implementation, so the three can never disagree on what a split's
text is (two copies of it once made prune's perplexity of a model differ from eval's).
"""

from __future__ import annotations

from slm_cli.data import load_splits
from slm_cli.data.corpus import CORPORA, load_corpus
from slm_cli.data.errors import DataError

# data.val_fraction's default (config/schema.py DataConfig): a user file without a validation
# split loses the same records to validation in every stage that reads it with the defaults.
VAL_FRACTION = 0.05


def split_text(source: str, split: str, seed: int, val_fraction: float = VAL_FRACTION) -> str:
    """The whole text of one split ("validation" or "test") of a data source.

    A corpus: its stored split text exactly as written (validation is its calibration split),
    never re-cut into records and re-joined, which would add blank lines at every cut. Anything
    else: every record of the split (all of it: a length limit such as eval.max_tokens applies to
    the tokens) joined by blank lines; a prompt/completion record contributes prompt + completion,
    a chat record each message's content. `val_fraction` carves validation out of a user file
    that has no validation split.
    """
    from slm_cli.models import example_texts

    if split not in ("validation", "test"):
        raise DataError(f"split={split!r}: a text split is validation or test.")
    if source in CORPORA:
        return load_corpus(source, "test" if split == "test" else "calibration")
    splits = load_splits(source, train_size=1, val_size=None, test_size=None, val_fraction=val_fraction, seed=seed)
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
