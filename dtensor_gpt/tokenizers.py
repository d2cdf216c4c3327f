"""Tokenizers: a character vocabulary, or GPT-2's byte-pair encoding through tiktoken."""

import codecs
import pickle

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """One id per character, in the order given (nanoGPT's shakespeare_char: sorted characters)."""

    def __init__(self, chars):
        self.chars, self.stoi = list(chars), {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the model's vocabulary")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < self.vocab_size)

    def stream_decoder(self):
        return lambda token: self.chars[token] if token < self.vocab_size else ""


class _PlainDataUnpickler(pickle.Unpickler):
    """Dicts, strings and numbers only: a pickle that names any class or function is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and a vocabulary holds only strings and integers")


def chars_from_meta(path):
    """The characters of nanoGPT's shakespeare_char `meta.pkl` ({'itos': {id: char}, ...}), in id order."""
    try:
        with open(path, "rb") as f:
            meta = _PlainDataUnpickler(f).load()
        itos = meta["itos"]
        return [itos[i] for i in range(len(itos))]
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
        raise ValueError(f"{path} is not a nanoGPT character meta.pkl ({e})") from None


class BPETokenizer:
    """GPT-2's BPE: from a local `.tiktoken` ranks file (offline), or tiktoken's own cache."""

    def __init__(self, path=None):
        import tiktoken

        if path:
            from tiktoken.load import load_tiktoken_bpe

            ranks = load_tiktoken_bpe(path)
            self.enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                         special_tokens={"<|endoftext|>": len(ranks)})
        else:
            try:
                self.enc = tiktoken.get_encoding("gpt2")
            except Exception as e:
                raise ValueError(f"the GPT-2 tokenizer could not be loaded ({e}); pass a gpt2.tiktoken "
                                 f"ranks file instead") from None
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])

    def stream_decoder(self):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: utf8.decode(self.enc.decode_single_token_bytes(token)) if token < self.vocab_size else ""
