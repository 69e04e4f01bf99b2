"""llmtrain.tokenizer: the shipped GPT-2 ranks, offline, checked against tiktoken itself."""

from pathlib import Path

import pytest
import tiktoken

from llmtrain.tokenizer import GPT2_RANKS, get_tokenizer

REPO = Path(__file__).resolve().parent.parent
# Developers and CI have a ready tiktoken cache beside the checkout; users may not.
SHARED_CACHE = REPO.parent / "shared" / "tiktoken-cache"
needs_cache = pytest.mark.skipif(
    not SHARED_CACHE.is_dir(), reason=f"no tiktoken cache at {SHARED_CACHE}"
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; naïve café—"
    "emoji 🤖 and\ttabs,\n\nnew lines,   many spaces, <|endoftext|> as plain text, "
    "URLs like https://example.com/a?b=c and code: def f(x): return x**2  # done\n"
) * 20


@pytest.fixture
def shared_cache(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_CACHE))


def test_gpt2_ships_with_the_package():
    assert GPT2_RANKS.is_file()


def test_gpt2_needs_no_writable_tiktoken_cache(tmp_path, monkeypatch):
    """tiktoken.load copies a file it reads into TIKTOKEN_CACHE_DIR; one that cannot be written
    (read-only, shared between users) made the shipped gpt2 ranks fail to load."""
    from llmtrain.tokenizer import _gpt2_encoding

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(not_a_dir))
    _gpt2_encoding.cache_clear()
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_hello_world_without_network(monkeypatch):
    # An empty cache dir: any attempt to download would fail instead of hitting the cache.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-llmtrain-test")
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.name == "gpt2"


def test_gpt2_facts():
    tok = get_tokenizer("gpt2")
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257


def test_round_trip():
    tok = get_tokenizer("gpt2")
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "Hello world"]) == [ids, [15496, 995]]


def test_special_token_text_is_ordinary():
    tok = get_tokenizer("gpt2")
    assert tok.eot_id not in tok.encode("<|endoftext|>")


@needs_cache
def test_matches_tiktoken_gpt2(shared_cache):
    reference = tiktoken.get_encoding("gpt2")
    assert get_tokenizer("gpt2").encode(TEXT) == reference.encode_ordinary(TEXT)


@needs_cache
def test_cl100k_base_by_name(shared_cache):
    tok = get_tokenizer("cl100k_base")
    assert tok.vocab_size == 100277
    assert tok.eot_id == 100257
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_matches_tiktokens_own_gpt2_definition_without_a_cache(monkeypatch):
    """Runs everywhere (CI has no tiktoken cache, so the two tests above skip there): tiktoken's
    own r50k_base definition (its pattern, specials and pinned ranks hash), fed the shipped ranks
    file instead of a download, must encode exactly as get_tokenizer("gpt2")."""
    import tiktoken.load
    from tiktoken_ext import openai_public

    def shipped(url, expected_hash=None):  # tiktoken's pinned hash, checked on our file
        return tiktoken.load.load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=expected_hash)

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", shipped)
    spec = openai_public.r50k_base()
    spec.pop("explicit_n_vocab")
    reference = tiktoken.Encoding(**spec)
    ours = get_tokenizer("gpt2")
    assert ours.encoding._pat_str == reference._pat_str
    assert ours.encoding._special_tokens == reference._special_tokens
    assert ours.encode(TEXT) == reference.encode_ordinary(TEXT)
    assert ours.encode_prompt(TEXT) == reference.encode(TEXT, allowed_special="all")


def test_unknown_encoding_names_the_key():
    with pytest.raises(ValueError, match="data.tokenizer"):
        get_tokenizer("no-such-encoding")


def test_a_vocabulary_that_cannot_be_downloaded_is_a_config_error(monkeypatch, tmp_path):
    """tiktoken fetches every vocabulary but the shipped gpt2 at first use: offline, that was a
    raw traceback and exit 1 (requeued by the sbatch scripts, to fail again)."""
    import requests
    import tiktoken.registry

    def offline(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"cannot reach {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(ValueError, match=r"^data.tokenizer: tiktoken downloads the r50k_base") as e:
        get_tokenizer("r50k_base")
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "ConnectionError" in str(e.value)
