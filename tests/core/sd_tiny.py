"""A tiny random-weight Stable Diffusion pipeline, built entirely offline from configs.

Same structure as a real SD 1.x pipeline (``UNet2DConditionModel`` with cross-attention,
``AutoencoderKL``, CLIP text encoder and byte-level BPE tokenizer, scaled-linear DDIM schedule),
but a few hundred thousand parameters: latents 4x8x8, images 16x16 (VAE f=2). Nothing is
downloaded: the tokenizer vocabulary is written by hand (the 256 byte symbols, their end-of-word
forms, a few merges and CLIP's two special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A handful of merges so common words become single tokens (each merge's result joins the vocab).
_MERGES = [
    "o f</w>", "t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>",
    "p h", "ph o", "pho t", "phot o</w>", "r e", "re d</w>",
]
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 77  # CLIP's context length, as in real SD


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """The hand-written byte-level BPE vocabulary and merges (about 530 tokens)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    for m in _MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for s in SPECIAL:
        vocab[s] = len(vocab)
    return vocab, list(_MERGES)


def build_tiny_tokenizer(tmpdir: str | Path | None = None):
    """A ``CLIPTokenizer`` from the hand-written vocabulary.

    With ``tmpdir``, ``vocab.json``/``merges.txt``/``tokenizer_config.json`` are written there and
    the tokenizer is loaded with ``from_pretrained`` (the file route); otherwise it is built from
    the ``vocab=``/``merges=`` keywords (transformers 5 ignores the old ``vocab_file=``).
    """
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    if tmpdir is None:
        # the keyword route wants merges as (left, right) pairs, not "left right" strings
        return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=MAX_LENGTH)
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
        "bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1],
    }), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(d)


def build_tiny_sd_pipeline(tmpdir: str | Path | None = None, seed: int = 0, latent_size: int = 8):
    """A tiny random-weight ``StableDiffusionPipeline`` (no safety checker), built offline.

    ``seed`` fixes all weights. The tokenizer goes the file route (``vocab.json``/``merges.txt`` in
    a temporary folder, then ``from_pretrained``). With ``tmpdir`` the whole pipeline is also
    ``save_pretrained`` there, making ``tmpdir`` a loadable pipeline folder.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as d:
        tokenizer = build_tiny_tokenizer(d)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=2 * latent_size, scaling_factor=0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if tmpdir is not None:
        pipe.save_pretrained(tmpdir, safe_serialization=True)
    return pipe
