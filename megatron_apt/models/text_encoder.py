"""Text encoders and tokenizers loaded from local directories.

* :func:`load_text_encoder` loads a T5 / UMT5 / mT5 encoder (``T5EncoderModel`` and friends, picked
  from ``model_type`` in ``config.json``; other models through ``AutoModel``) and its tokenizer
  from the same directory. A diffusers pipeline folder with ``text_encoder/`` and ``tokenizer/``
  subfolders works too. ``encode`` returns the last hidden state and a padding mask; padded
  positions are zeroed.
* :func:`load_tokenizer` loads only the tokenizer (for storing token ids instead of hidden states).
* :class:`ByteTokenizer` is the dependency-free fallback used when no tokenizer is given: token id
  = UTF-8 byte value + 1, so ids are 1..256 and 0 is padding; there are no BOS/EOS tokens, and
  truncation is at a byte boundary (decoding replaces a split character).

Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

_ENCODER_CLASSES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def _pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(length, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max(length, 1)), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes + 1 as token ids (1..256); 0 is padding. Needs no files."""

    name = "byte"
    pad_id = 0
    vocab_size = 257

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [b + 1 for b in text.encode("utf-8")]
        return ids[:max_length] if max_length is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 1 for i in ids if int(i) > 0).decode("utf-8", errors="replace")

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-encode, padded to the longest: ``(ids [B, L] long, mask [B, L] bool)``."""
        return _pad([self.encode(t, max_length) for t in texts], self.pad_id)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "pad_id": self.pad_id}


class TokenEmbedder:
    """Text stored as token ids (preprocessing without a text encoder) becomes features through a frozen,
    seeded embedding table: a deterministic stand-in for a text encoder on the embedded default. The table
    depends only on (dim, vocab, seed), fixed here, so training and generation always agree."""

    def __init__(self, dim: int, vocab: int = 1 << 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, dim, generator=g) / dim**0.5
        self.vocab = vocab

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids.long().clamp(0, self.vocab - 1)]


class HFTokenizer:
    """A transformers tokenizer behind the same small interface as :class:`ByteTokenizer`.

    Special tokens are added the tokenizer's own way (T5: a trailing ``</s>``).
    """

    def __init__(self, tokenizer: Any, path: str):
        self.tokenizer = tokenizer
        self.path = path
        self.name = type(tokenizer).__name__
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
        self.vocab_size = len(tokenizer)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        out = self.tokenizer(text, truncation=max_length is not None, max_length=max_length, add_special_tokens=True)
        return list(out["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad([self.encode(t, max_length) for t in texts], self.pad_id)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "vocab_size": self.vocab_size, "pad_id": self.pad_id}


def _find_tokenizer_dir(path: Path) -> Path:
    for cand in (path, path / "tokenizer", path.parent / "tokenizer"):
        if cand.is_dir() and any((cand / f).exists() for f in _TOKENIZER_FILES):
            return cand
    raise FileNotFoundError(
        f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {str(path)!r} or a 'tokenizer' folder beside it"
    )


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load a tokenizer from a local directory (AutoTokenizer; a bare ``spiece.model`` via T5Tokenizer)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    d = _find_tokenizer_dir(p)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (ValueError, OSError, KeyError):
        if not (d / "spiece.model").exists():
            raise
        # A folder with only a SentencePiece model and no tokenizer config: T5's layout.
        from transformers import T5Tokenizer

        tok = T5Tokenizer.from_pretrained(str(d), local_files_only=True)
    return HFTokenizer(tok, str(d))


def _resolve_encoder_dir(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"text encoder directory {str(path)!r} does not exist")
    if (path / "config.json").is_file():
        return path
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder"
    raise FileNotFoundError(f"{str(path)!r} holds no config.json (nor text_encoder/config.json)")


def read_text_encoder_info(path: str | os.PathLike) -> dict[str, Any]:
    """Name, class and hidden size of a text encoder, from its config alone."""
    d = _resolve_encoder_dir(Path(path))
    with open(d / "config.json") as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type", "")
    dim = cfg.get("d_model") or cfg.get("hidden_size")
    if dim is None:
        raise ValueError(f"{d / 'config.json'} has neither d_model nor hidden_size")
    return {
        "path": str(d),
        "model_type": model_type,
        "class": _ENCODER_CLASSES.get(model_type, "AutoModel"),
        "dim": int(dim),
        "name_or_path": cfg.get("_name_or_path", ""),
    }


class TextEncoder:
    """A frozen text encoder: ``encode(texts, max_length) -> (hidden [B, L, D], mask [B, L] bool)``."""

    def __init__(self, model: torch.nn.Module, tokenizer: HFTokenizer, info: dict[str, Any], device: torch.device,
                 dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.info = info
        self.device = torch.device(device)
        self.dtype = dtype
        self.dim = int(info["dim"])
        self.name = info["class"]

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(list(texts), max_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_length: int | None = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states padded to the longest caption of the batch (zeros on padding) and the mask.

        Each caption is tokenized on its own and truncated to ``max_length`` tokens (special tokens
        included); the real length of caption ``i`` is ``mask[i].sum()``.
        """
        ids, mask = self.tokenize(texts, max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return hidden, mask

    def describe(self) -> dict[str, Any]:
        return {**self.info, "tokenizer": self.tokenizer.describe()}


def load_text_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TextEncoder:
    """Load a T5/UMT5/mT5 encoder (or another ``AutoModel``) and its tokenizer from a local directory."""
    info = read_text_encoder_info(path)
    import transformers

    cls = getattr(transformers, info["class"])
    model = cls.from_pretrained(info["path"], dtype=dtype, local_files_only=True)
    if info["class"] == "AutoModel" and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    model.to(device)
    tokenizer = load_tokenizer(info["path"])
    return TextEncoder(model, tokenizer, info, torch.device(device), dtype)
