"""Tokenizers: a character vocabulary, or GPT-2's byte-pair encoding through tiktoken."""

import base64
import codecs
import io
import pickle
import pickletools

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def not_a_vocabulary(chars):
    """
    Why `chars` cannot be a character vocabulary, or None: a repeated character would decode two
    ids alike and encode to one of them; a longer string is never produced by splitting text.
    """
    seen = {}
    for i, c in enumerate(chars):
        if not (isinstance(c, str) and len(c) == 1):
            return f"entry {i} is {c!r}, not a single character"
        if c in seen:
            return f"entry {i}, {c!r}, repeats entry {seen[c]}"
        seen[c] = i
    return None


class CharTokenizer:
    """One id per character, in the order given (nanoGPT's shakespeare_char: sorted characters)."""

    def __init__(self, chars):
        problem = not_a_vocabulary(chars)
        if problem:
            raise ValueError(f"the character vocabulary's {problem}: each id must stand for its own single character; "
                             f"give the vocabulary the model was trained with")
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


META_BYTES = 1 << 20  # nanoGPT's shakespeare_char meta.pkl is under 1 KB; a vocabulary of 10,000 characters ~300 KB


def chars_from_meta(path):
    """
    The characters of nanoGPT's shakespeare_char `meta.pkl` ({'itos': {id: char}, ...}), in id order.

    Read whole, at most `META_BYTES`, and walked op by op (`pickletools.genops`) before loading:
    every length the pickle claims must lie within what was read, so a few bytes claiming a
    2**40-byte string are refused instead of allocated.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(META_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    if len(data) > META_BYTES:
        raise ValueError(f"{path} is over {META_BYTES:,} bytes, too large for a nanoGPT character meta.pkl "
                         f"(shakespeare_char's is under 1 KB); give the meta.pkl of the character run")
    try:
        for _ in pickletools.genops(data):
            pass
        meta = _PlainDataUnpickler(io.BytesIO(data)).load()
        itos = meta["itos"]
        chars = [itos[i] for i in range(len(itos))]
        problem = not_a_vocabulary(chars)
        if problem:
            raise TypeError(f"its itos {problem}")
        return chars
    except (pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError) as e:
        raise ValueError(f"{path} is not a nanoGPT character meta.pkl ({e})") from None


def ranks_from_file(path):
    """
    {token bytes: rank} of a .tiktoken ranks file. Read here, not by tiktoken's loader: that one
    caches a local file by its path (a file replaced at the same path keeps its old ranks) and
    quotes a line it cannot parse, raw bytes and all.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    ranks = {}
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            ranks = None
            break
    if not ranks:
        wrong = "it holds none" if ranks == {} else f"line {number} is not one"
        raise ValueError(f"{path} is not a .tiktoken ranks file (lines of a base64 token and its rank; {wrong}) "
                         f"nor a nanoGPT meta.pkl")
    return ranks


class BPETokenizer:
    """GPT-2's BPE: from a local `.tiktoken` ranks file (offline), or tiktoken's own cache."""

    def __init__(self, path=None):
        import tiktoken

        if path:
            ranks = ranks_from_file(path)
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
