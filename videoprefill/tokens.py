"""Tokenizing a prompt with a long video: each run of the video placeholder token tokenized once.

The processor writes the video placeholder once per video token into the prompt (131,040 times
for a 128K-token video) and then tokenizes that text, which takes a fraction of a second on the
host before every request (BENCHMARKS.md). The placeholder is an added token: the tokenizer
splits it out before anything else and never merges it with its neighbours. So the text with
each run of it collapsed to one placeholder tokenizes to the same ids with that one id where the
run was; writing the run back into the ids gives the processor's result exactly, in a few
milliseconds. `collapsed_runs(processor)` does that for the processor calls in its body.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

# Tokenizer keyword arguments the collapsed path handles (with any value unless listed in
# _PLAIN); any other argument, or a listed one with another value, tokenizes as the processor
# does.
_HANDLED = {"return_tensors", "padding_side", "add_special_tokens", "return_attention_mask",
            "return_token_type_ids", "padding", "truncation", "max_length", "verbose"}
_PLAIN = {"padding": (False, None, "do_not_pad"), "truncation": (False, None, "do_not_truncate"),
          "max_length": (None,)}
_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids")


class RunCollapsingTokenizer:
    """A tokenizer that tokenizes each run of `token` once and writes the run back into the ids.
    Everything but calling it goes to the wrapped tokenizer."""

    def __init__(self, tokenizer, token: str):
        self._tokenizer = tokenizer
        self._token = token
        self._token_id = tokenizer.convert_tokens_to_ids(token)
        self._runs = re.compile(f"(?:{re.escape(token)})+")

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def _handles(self, text, kwargs: dict) -> bool:
        if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
            return False
        if not set(kwargs) <= _HANDLED:
            return False
        return all(kwargs.get(key) in plain for key, plain in _PLAIN.items())

    def __call__(self, text=None, *args, **kwargs):
        if args or not self._handles(text, kwargs):
            return self._tokenizer(text, *args, **kwargs)
        from transformers import BatchEncoding

        texts = [text] if isinstance(text, str) else text
        runs = [[len(m.group()) // len(self._token) for m in self._runs.finditer(t)] for t in texts]
        short = [self._runs.sub(self._token, t) for t in texts]
        return_tensors = kwargs.pop("return_tensors", None)
        encoded = self._tokenizer(short, **kwargs)
        ids = encoded["input_ids"]
        kept_whole = all(row.count(self._token_id) == len(counts) for row, counts in zip(ids, runs))
        if not kept_whole or not set(encoded) <= set(_PER_TOKEN):
            # not one id per run, or an output this path does not know: tokenize as the processor does
            return self._tokenizer(text, return_tensors=return_tensors, **kwargs)
        repeats = [self._repeats(row, counts) for row, counts in zip(ids, runs)]
        if return_tensors == "pt" and len({sum(r) for r in repeats}) == 1:
            import torch  # the long rows built as tensors: no Python list of 131,040 ints to convert

            data = {key: torch.stack([torch.repeat_interleave(torch.tensor(row), torch.tensor(r))
                                      for row, r in zip(rows, repeats)]) for key, rows in encoded.items()}
            return_tensors = None
        else:
            data = {key: [[v for v, n in zip(row, r) for _ in range(n)] for row, r in zip(rows, repeats)]
                    for key, rows in encoded.items()}
        if isinstance(text, str):
            data = {key: rows[0] for key, rows in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def _repeats(self, ids: list[int], counts: list[int]) -> list[int]:
        """How many times each of `ids` stands in the processor's text: the k-th placeholder
        counts[k] times, every other token once."""
        runs = iter(counts)
        return [next(runs) if token_id == self._token_id else 1 for token_id in ids]


@contextlib.contextmanager
def collapsed_runs(processor) -> Iterator[None]:
    """Inside the block, the processor tokenizes each run of its video placeholder token once
    (same ids, attention mask and token type ids as without). Nothing changes for a processor
    without a video token, or whose video token is not an added token of its tokenizer."""
    tokenizer = getattr(processor, "tokenizer", None)
    token = getattr(processor, "video_token", None)
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    if tokenizer is None or token is None or token not in added or isinstance(tokenizer, RunCollapsingTokenizer):
        yield
        return
    processor.tokenizer = RunCollapsingTokenizer(tokenizer, token)
    try:
        yield
    finally:
        processor.tokenizer = tokenizer
