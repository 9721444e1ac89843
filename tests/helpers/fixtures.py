"""Small models and media files made on the spot, for tests and benchmarks (nothing is downloaded).

* :func:`make_tiny_wan_vae`, :func:`make_tiny_kl_vae`: randomly initialised diffusers VAEs saved
  with ``save_pretrained``, to be loaded back through :func:`megatron_apt.models.vae.load_vae`.
* :func:`make_tiny_text_encoder`: a SentencePiece model trained on a few sentences, wrapped in a
  ``T5Tokenizer``, plus a random ``T5EncoderModel``/``UMT5EncoderModel``, saved together.
* :func:`write_video`: frames -> a video file with PyAV.
* :func:`coded_frames` / :func:`read_code`: frames that carry their own index as a block pattern
  that survives lossy compression, to check frame-rate resampling.
* :func:`make_bad_inputs`: a folder of good and broken inputs with the reject reason expected for each.
* :data:`FAKE_EVAL_NETS`: the source of a module with tiny stand-ins for the evaluator's FID feature network
  and CLIP model (``feats()``, ``clip()``), for ``tools/evaluate.py --fid-features / --clip``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FAKE_EVAL_NETS = (
    "import torch\n"
    "def feats():\n    return lambda x: torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)\n"
    "class Clip:\n"
    "    def encode_image(self, images):\n"
    "        return torch.tensor([[float(i.mean()), 1.0] for i in images])\n"
    "    def encode_text(self, texts):\n"
    "        return torch.tensor([[1.0, float(len(t))] for t in texts])\n"
    "def clip():\n    return Clip()\n")

SENTENCES = [
    f"the digit {d} moving {m}" for d in range(10) for m in ("left", "right", "up", "down")
] + [
    "the digits 3 and 7",
    "a red car drives along a wet road at night",
    "a cat sleeps on a sofa next to a window",
    "waves roll onto a sandy beach under a blue sky",
]


def make_tiny_wan_vae(path: str | os.PathLike, z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> str:
    """A ~0.2M-parameter ``AutoencoderKLWan`` (8x spatial, 4x temporal compression) saved at ``path``."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[round(float(v), 4) for v in g.uniform(-0.5, 0.5, z_dim)],
        latents_std=[round(float(v), 4) for v in g.uniform(0.5, 2.0, z_dim)],
    )
    vae.save_pretrained(str(path))
    return str(path)


def make_tiny_kl_vae(
    path: str | os.PathLike, latent_channels: int = 4, seed: int = 0, shift_factor: float | None = 0.1
) -> str:
    """A tiny image ``AutoencoderKL`` (4x spatial compression) saved at ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 8, 16],
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    )
    vae.save_pretrained(str(path))
    return str(path)


def make_tiny_text_encoder(
    path: str | os.PathLike, kind: str = "umt5", d_model: int = 32, seed: int = 0, vocab_size: int = 120
) -> str:
    """Train a small SentencePiece model, build a T5 tokenizer on it and save it with a random encoder.

    ``kind``: "umt5" (UMT5EncoderModel, Wan's text encoder family) or "t5" (T5EncoderModel).
    """
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(SENTENCES * 4) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "spiece"),
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        # transformers 5 builds a T5 tokenizer from a SentencePiece model found as spiece.model in a folder.
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=0)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if kind == "umt5":
        model = UMT5EncoderModel(UMT5Config(**common))
    elif kind == "t5":
        model = T5EncoderModel(T5Config(**common))
    else:
        raise ValueError(f"kind must be 'umt5' or 't5', got {kind!r}")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float | int = 24,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    faststart: bool = False,
    crf: int = 12,
) -> str:
    """Write ``uint8 [T, H, W, 3]`` frames to a video file (odd sizes need e.g. ``pix_fmt="yuv444p"``)."""
    import av
    from fractions import Fraction

    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(str(fps)).limit_denominator(100000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


CODE_GRID = 4  # 4x4 blocks = 16 bits


def coded_frames(n: int, size: int = 64) -> np.ndarray:
    """``n`` frames of ``size x size``; frame ``i`` shows ``i`` in binary as a 4x4 grid of black/white blocks."""
    block = size // CODE_GRID
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        for bit in range(CODE_GRID * CODE_GRID):
            if (i >> bit) & 1:
                r, c = divmod(bit, CODE_GRID)
                out[i, r * block : (r + 1) * block, c * block : (c + 1) * block] = 255
    return out


def read_code(frame: np.ndarray) -> int:
    """Inverse of :func:`coded_frames` on a (decoded, possibly lossy) frame ``[H, W, 3]``."""
    size = frame.shape[0]
    block = size // CODE_GRID
    value = 0
    for bit in range(CODE_GRID * CODE_GRID):
        r, c = divmod(bit, CODE_GRID)
        m = block // 4  # read the middle of each block, away from compression artefacts at its edges
        patch = frame[r * block + m : (r + 1) * block - m, c * block + m : (c + 1) * block - m]
        if patch.mean() > 127:
            value |= 1 << bit
    return value


def _moving_square(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:] = rng.integers(0, 60, size=3, dtype=np.uint8)
    s = max(2, min(w, h) // 4)
    for i in range(n):
        x = int((w - s) * i / max(1, n - 1))
        frames[i, h // 2 - s // 2 : h // 2 - s // 2 + s, x : x + s] = (230, 200, 40)
    return frames


def make_bad_inputs(root: str | os.PathLike, fps: int = 8, seconds: float = 1.0) -> dict[str, Any]:
    """Write a folder of good and broken inputs for clips of ``seconds`` at ``fps``.

    Returns ``{"good": [names], "rejects": {name: expected reason substring}}`` where names are
    paths relative to ``root``.
    """
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_good = int(round(fps * seconds * 1.5))
    good: list[str] = []
    rejects: dict[str, str] = {}

    def caption(name: str, text: str = "a yellow square moving right") -> None:
        (root / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")

    def add_good(name: str) -> None:
        good.append(name)
        caption(name)

    write_video(root / "landscape.mp4", _moving_square(n_good, 64, 48), fps)
    add_good("landscape.mp4")
    write_video(root / "vertical.mp4", _moving_square(n_good, 48, 80), fps)
    add_good("vertical.mp4")
    write_video(root / "odd_size.mp4", _moving_square(n_good, 45, 33), fps, pix_fmt="yuv444p")
    add_good("odd_size.mp4")
    write_video(root / "gray.mp4", _moving_square(n_good, 40, 40), fps, pix_fmt="gray")
    add_good("gray.mp4")
    write_video(root / "fast_30fps.mp4", _moving_square(int(30 * seconds * 1.2), 64, 48), 30)
    add_good("fast_30fps.mp4")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 29), dtype=np.uint8)).save(root / "gray_odd.png")  # mode L
    add_good("gray_odd.png")
    rgba = rng.integers(0, 255, (40, 52, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(root / "alpha.png")  # [H, W, 4] uint8: mode RGBA
    add_good("alpha.png")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(root / "sixteen_bit.png")
    add_good("sixteen_bit.png")
    pal = Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    add_good("palette.png")
    Image.fromarray(rng.integers(0, 255, (90, 31, 3), dtype=np.uint8)).save(root / "tall.jpg", quality=90)
    add_good("tall.jpg")

    write_video(root / "too_short.mp4", _moving_square(max(1, int(fps * seconds / 2)), 64, 48), fps)
    caption("too_short.mp4")
    rejects["too_short.mp4"] = "shorter than one clip"
    write_video(root / "no_caption.mp4", _moving_square(n_good, 64, 48), fps)
    rejects["no_caption.mp4"] = "missing caption"
    write_video(root / "empty_caption.mp4", _moving_square(n_good, 64, 48), fps)
    caption("empty_caption.mp4", "   ")
    rejects["empty_caption.mp4"] = "empty caption"
    (root / "zero_bytes.mp4").write_bytes(b"")
    caption("zero_bytes.mp4")
    rejects["zero_bytes.mp4"] = "empty file"
    (root / "not_a_video.mp4").write_text("this is not a video\n" * 50, encoding="utf-8")
    caption("not_a_video.mp4")
    rejects["not_a_video.mp4"] = "cannot open video"
    data = Path(write_video(root / "tmp_full.mp4", _moving_square(n_good * 2, 64, 48), fps)).read_bytes()
    (root / "tmp_full.mp4").unlink()
    (root / "truncated_tail.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: unreadable
    caption("truncated_tail.mp4")
    rejects["truncated_tail.mp4"] = "cannot open video"
    write_video(root / "tmp_fs.mp4", rng.integers(0, 255, (n_good * 3, 48, 64, 3), dtype=np.uint8), fps, faststart=True)
    data = (root / "tmp_fs.mp4").read_bytes()
    (root / "tmp_fs.mp4").unlink()
    # Index first, then only a tenth of the frames' data: the index promises more than decodes.
    (root / "truncated_data.mp4").write_bytes(data[: len(data) // 10])
    caption("truncated_data.mp4")
    rejects["truncated_data.mp4"] = "frames"
    (root / "garbage.png").write_bytes(os.urandom(300))
    caption("garbage.png")
    rejects["garbage.png"] = "cannot decode image"
    png = root / "tmp.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    (root / "truncated.png").write_bytes(png.read_bytes()[:400])
    png.unlink()
    caption("truncated.png")
    rejects["truncated.png"] = "cannot decode image"
    (root / "orphan_caption.txt").write_text("no media for this one\n", encoding="utf-8")
    (root / "notes.md").write_text("ignored: not a media file\n", encoding="utf-8")
    return {"good": sorted(good), "rejects": rejects}
