"""Random-weight parts the families' offline builders share: tokenizers, text encoders, VAEs, the seed.

Nothing here touches the network: the CLIP tokenizer is made from a small byte-level vocabulary written
by hand, the T5 tokenizer from a character-level Unigram vocabulary, every model is built from a config
dict and initialised from a fixed seed (``seeded``), so that every rank (and every machine) that builds the
same family and size gets the same weights.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from stadi_worker.models.base import Size

SEED = 1234
# Stable Diffusion's noise schedule (SD 1.5, SDXL): scaled-linear betas over 1000 training steps
SD_BETAS: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, steps_offset=1)


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """Build modules inside: their random weights come from ``SEED``, the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer(path: Path, model_max_length: int = 77) -> None:
    """Write a CLIP tokenizer (vocab.json, merges.txt, configs) with a byte-level vocabulary of ~530 tokens."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("e", "r"), ("i", "n"), ("a", "n"), ("o", "n"), ("th", "e</w>")]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # load back from the two files (the real loading path), then save the full tokenizer configs beside them
    tok = CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length)
    tok.save_pretrained(path)


def t5_tokenizer(model_max_length: int = 120) -> Any:
    """A T5 tokenizer whose Unigram vocabulary is T5's specials (pad 0, eos 1, unk 2), the word-start
    marker and single characters: every lower-cased ASCII prompt tokenizes, letter by letter."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_config(size: Size, vocab_size: int, kind: str) -> dict[str, Any]:
    if size == "tiny":
        return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, hidden_act="gelu", vocab_size=vocab_size)
    if size == "small":  # trained from scratch with the denoiser (stadi bench train)
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=64, hidden_act="gelu", vocab_size=vocab_size)
    if kind == "g":  # OpenCLIP bigG text tower
        return dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu", vocab_size=49408)
    return dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)


def clip_text_encoder(size: Size, vocab_size: int, kind: str, with_projection: bool) -> Any:
    """A CLIP text tower: ``kind`` "l" (CLIP ViT-L) or "g" (OpenCLIP bigG) at full size, a small or a toy one
    otherwise."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # vocab ids: the tokenizer's specials are its last two tokens
    cfg = CLIPTextConfig(max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1, **_clip_config(size, vocab_size, kind))
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def vae(size: Size, latent_channels: int, scaling: float, shift: float | None) -> Any:
    """An 8x ``AutoencoderKL`` (SD3's 16-channel one has no quant convs)."""
    from diffusers import AutoencoderKL

    sd3 = latent_channels == 16
    if size == "tiny":
        chans, layers, groups = (8, 8, 16, 16), 1, 4
    elif size == "small":  # about 1.3 M parameters: the committed trained checkpoints stay small
        chans, layers, groups = (32, 64, 64, 64), 1, 16
    else:
        chans, layers, groups = (128, 256, 512, 512), 2, 32
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=chans,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=layers, norm_num_groups=groups, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=not sd3, use_post_quant_conv=not sd3,
        sample_size={"tiny": 128, "small": 256}.get(size, 1024),
    )


def t5_encoder(size: Size, vocab_size: int) -> Any:
    """A T5-v1.1 encoder: a toy one, a small one (trained from scratch with the denoiser), or full size (see
    below for why it has only 2 layers)."""
    from transformers import T5Config, T5EncoderModel

    # T5-v1.1 (gated GELU, untied relative attention); full size has XXL's layer shape (the 4096 wide output
    # PixArt's caption projection expects) but 2 of its 24 layers: text encoding is outside the timed steps,
    # and the whole XXL encoder would be ~19 GB of random fp32 weights to build and store per node.
    shape = {"tiny": dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2),
             "small": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2)}.get(
        size, dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2))
    return T5EncoderModel(T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, **shape))


def clip_tokenizer() -> Any:
    """The byte-level CLIP tokenizer of ``write_clip_tokenizer``, loaded back through its real loading path."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)
