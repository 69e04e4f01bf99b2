"""tiktoken encodings, with GPT-2's byte-pair ranks shipped inside the package.

``gpt2`` is built from ``assets/gpt2.tiktoken`` (OpenAI's ranks, MIT licence beside it), so the
default needs no network. Any other name goes through ``tiktoken.get_encoding`` and its cache
(``TIKTOKEN_CACHE_DIR``).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import tiktoken

from llmtrain.checks import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
# The hash tiktoken pins for r50k_base, whose ranks, pattern and specials equal gpt2's.
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer pattern (tiktoken_ext/openai_public.py, r50k_base).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding plus the few facts training needs about it."""

    encoding: tiktoken.Encoding

    @property
    def name(self) -> str:
        return self.encoding.name

    @property
    def vocab_size(self) -> int:
        """The true vocabulary size (the model may pad its embedding beyond it)."""
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in the text are treated as text."""
        return self.encoding.encode_ordinary(text)

    def encode_prompt(self, prompt: str) -> list[int]:
        """A prompt to generate from, as the exported transformers tokenizer reads it:
        ``<|endoftext|>`` is the special token, and an empty prompt is end-of-text alone (a
        fresh document, like GPT-2's unconditional samples)."""
        return self.encoding.encode(prompt, allowed_special="all") or [self.eot_id]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


@cache
def _gpt2_encoding() -> tiktoken.Encoding:
    # Read here, not by tiktoken.load, which copies every file it reads into its cache dir (a
    # read-only TIKTOKEN_CACHE_DIR then fails): the ranks are tiktoken's format, base64 + rank.
    data = GPT2_RANKS.read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
        raise ConfigError(f"{GPT2_RANKS}: not GPT-2's ranks (sha256 differs); reinstall llmtrain")
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines())}
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """``gpt2`` from the shipped ranks; anything else by tiktoken's own name lookup."""
    if name == "gpt2":
        return Tokenizer(_gpt2_encoding())
    try:
        return Tokenizer(tiktoken.get_encoding(name))
    except ValueError as e:
        raise ConfigError(
            f"data.tokenizer: unknown tiktoken encoding {name!r} "
            f"(known: {', '.join(tiktoken.list_encoding_names())})"
        ) from e
    except OSError as e:  # requests' errors are OSErrors: tiktoken downloads ranks at first use
        fill = f"python -c \"import tiktoken; tiktoken.get_encoding('{name}')\""
        raise ConfigError(
            f"data.tokenizer: tiktoken downloads the {name} vocabulary at first use, and that "
            f"failed ({type(e).__name__}: {str(e)[:160]}). Offline, set TIKTOKEN_CACHE_DIR to a "
            f"directory holding it (fill one where there is network: TIKTOKEN_CACHE_DIR=DIR "
            f"{fill}); data.tokenizer=gpt2 ships inside llmtrain"
        ) from e


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """model.vocab_size is the tokenizer's: a larger one has ids with no text, a smaller one
    no embedding for some ids."""
    if tokenizer.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size}, but the {tokenizer.name} tokenizer has "
            f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size} (the "
            f"embedding is padded to a multiple of model.vocab_pad_multiple for speed)"
        )
