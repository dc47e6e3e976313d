"""Random-weight pipelines built offline from config: tiny ones for tests, real-size ones for benchmarks.

Nothing here touches the network: the CLIP tokenizer is made from a small byte-level vocabulary written
by hand, the T5 tokenizer from a character-level Unigram vocabulary, every model is built from a config
dict and initialised from a fixed seed, so that every rank (and every machine) that builds the same family
and size gets the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

Size = Literal["tiny", "full"]
FAMILIES_BUILT: tuple[str, ...] = ("sdxl", "sd3", "sd15", "pixart")
_SEED = 1234


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


def t5_tokenizer(model_max_length: int = 120):
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
    if kind == "g":  # OpenCLIP bigG text tower
        return dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu", vocab_size=49408)
    return dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)


def _text_encoder(size: Size, vocab_size: int, kind: str, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # vocab ids: the tokenizer's specials are its last two tokens
    cfg = CLIPTextConfig(max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1, **_clip_config(size, vocab_size, kind))
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae(size: Size, latent_channels: int, scaling: float, shift: float | None):
    from diffusers import AutoencoderKL

    sd3 = latent_channels == 16
    if size == "tiny":
        chans, layers, groups = (8, 8, 16, 16), 1, 4
    else:
        chans, layers, groups = (128, 256, 512, 512), 2, 32
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=chans,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=layers, norm_num_groups=groups, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=not sd3, use_post_quant_conv=not sd3, sample_size=128 if size == "tiny" else 1024,
    )


def _unet_sdxl(size: Size):
    from diffusers import UNet2DConditionModel

    common = dict(
        in_channels=4, out_channels=4, use_linear_projection=True, addition_embed_type="text_time",
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if size == "tiny":
        # SDXL's structure (3 levels, 2 downsamplings, text_time embedding) at toy width
        return UNet2DConditionModel(
            sample_size=16, block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, **common)
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, **common)


def _unet_sd15(size: Size):
    from diffusers import UNet2DConditionModel

    common = dict(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    if size == "tiny":
        return UNet2DConditionModel(sample_size=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                                    norm_num_groups=8, attention_head_dim=2, cross_attention_dim=32, **common)
    return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                norm_num_groups=32, attention_head_dim=8, cross_attention_dim=768, **common)


def _sd3_transformer(size: Size):
    from diffusers import SD3Transformer2DModel

    if size == "tiny":
        return SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32)
    # SD3-medium
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=192)


def _t5_encoder(size: Size, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    # T5-v1.1 (gated GELU, untied relative attention); full size has XXL's layer shape (the 4096 wide output
    # PixArt's caption projection expects) but 2 of its 24 layers: text encoding is outside the timed steps,
    # and the whole XXL encoder would be ~19 GB of random fp32 weights to build and store per node.
    shape = (dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2) if size == "tiny"
             else dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2))
    return T5EncoderModel(T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, **shape))


def _pixart_transformer(size: Size, caption_channels: int):
    from diffusers import PixArtTransformer2DModel

    if size == "tiny":
        # width 48: divisible by 3, as the size micro-conditions of a sample_size 128 variant need
        return PixArtTransformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=4,
            attention_head_dim=12, cross_attention_dim=48, caption_channels=caption_channels,
            norm_type="ada_norm_single")
    # PixArt-alpha XL-2 1024 (sample_size 128: resolution and aspect-ratio micro-conditions)
    return PixArtTransformer2DModel(
        sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
        attention_head_dim=72, cross_attention_dim=1152, caption_channels=caption_channels,
        norm_type="ada_norm_single")


def build_pipeline(family: str, size: Size = "tiny"):
    """A diffusers pipeline of ``family`` with random weights (fixed seed), built without the network.

    SD3 is built without its T5 encoder (``text_encoder_3=None``: the pipeline feeds zeros in its place),
    which keeps the denoiser at its real cost and the load small. PixArt's T5 is cut to 2 layers at full
    size (see ``_t5_encoder``).
    """
    import tempfile

    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        PixArtAlphaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    if family not in FAMILIES_BUILT:
        raise ValueError(f"no random-weight builder for family {family!r}; built: {', '.join(FAMILIES_BUILT)}")
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    vocab = len(tokenizer)
    sd_betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        if family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=_vae(size, 4, 0.13025, None),
                text_encoder=_text_encoder(size, vocab, "l", False), tokenizer=tokenizer,
                text_encoder_2=_text_encoder(size, vocab, "g", True), tokenizer_2=tokenizer,
                unet=_unet_sdxl(size),
                scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **sd_betas),
            )
        if family == "sd15":
            return StableDiffusionPipeline(
                vae=_vae(size, 4, 0.18215, None), text_encoder=_text_encoder(size, vocab, "l", False),
                tokenizer=tokenizer, unet=_unet_sd15(size),
                scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sd_betas),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        if family == "pixart":
            t5 = t5_tokenizer()
            encoder = _t5_encoder(size, len(t5))
            return PixArtAlphaPipeline(
                tokenizer=t5, text_encoder=encoder, vae=_vae(size, 4, 0.18215, None),
                transformer=_pixart_transformer(size, encoder.config.d_model),
                # PixArt-alpha's own: DDPM's linear betas, 2nd-order DPM-Solver++
                scheduler=DPMSolverMultistepScheduler(
                    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                    algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon"),
            )
        return StableDiffusion3Pipeline(
            vae=_vae(size, 16, 1.5305, 0.0609),
            text_encoder=_text_encoder(size, vocab, "l", True), tokenizer=tokenizer,
            text_encoder_2=_text_encoder(size, vocab, "g", True), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None,
            transformer=_sd3_transformer(size),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        )


def save_random_pipeline(family: str, size: Size, dest: Path) -> Path:
    """Build a random-weight pipeline and ``save_pretrained`` it to ``dest`` (safetensors)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = build_pipeline(family, size)
    pipe.save_pretrained(dest, safe_serialization=True)
    # transformers 5 writes a model (config and weights) only on rank 0 of an initialised process group; a
    # worker rank building its own node's copy must still get the text encoders on disk.
    from safetensors.torch import save_model

    for name, component in pipe.components.items():
        if isinstance(component, transformers.PreTrainedModel):
            (dest / name).mkdir(parents=True, exist_ok=True)
            if not (dest / name / "config.json").exists():
                component.config.to_json_file(str(dest / name / "config.json"))
            if not (dest / name / "model.safetensors").exists():
                save_model(component, str(dest / name / "model.safetensors"), metadata={"format": "pt"})
    # transformers 5 saves only tokenizer.json; keep the hand-written vocab.json + merges.txt beside it
    for name, component in pipe.components.items():
        if isinstance(component, transformers.CLIPTokenizer):
            write_clip_tokenizer(dest / name)
    return dest
