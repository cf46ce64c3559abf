"""The ``stable-diffusion`` backend on a tiny random-weight pipeline built offline from configs."""

from __future__ import annotations

import json

import pytest
import torch

from shallowmark.core.backends import load_backend
from shallowmark.core.backends.stable_diffusion import SDCondition, StableDiffusion, ddim_config
from shallowmark.core.ddim import denoise, invert, make_grid, relative_l2
from shallowmark.errors import InvalidParameterError, InvalidShapeError

STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy shared 2-core machine, two OpenMP threads spin-waiting for
    each other make these tiny convolutions ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd(tiny_sd_pipeline) -> StableDiffusion:
    return StableDiffusion(pipeline=tiny_sd_pipeline)


@pytest.fixture(scope="module")
def grid(sd):
    return make_grid(sd, STEPS)


def _with_scheduler(pipe, scheduler):
    from diffusers import StableDiffusionPipeline

    parts = {**pipe.components, "scheduler": scheduler}
    return StableDiffusionPipeline(**parts, requires_safety_checker=False)


def test_tokenizer_splits_prompts_into_words(tiny_sd_pipeline):
    tok = tiny_sd_pipeline.tokenizer
    ids = tok("a photo of a red cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 8 and len(set(ids[1:-1])) == 5  # six words, "a" twice, nothing unknown
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a red cat"
    assert tok.model_max_length == 77


def test_wraps_pipeline_object(sd, tiny_sd_pipeline):
    assert sd.name == "stable-diffusion" and sd.conditional
    assert sd.latent_shape == (4, 8, 8) and sd.image_size == 16
    assert sd.dtype == torch.float32 and sd.device.type == "cpu"
    assert sd.alphas_cumprod.dtype == torch.float64 and sd.num_train_timesteps == 1000
    torch.testing.assert_close(sd.alphas_cumprod, tiny_sd_pipeline.scheduler.alphas_cumprod.double())
    assert sd.scheduler_config["prediction_type"] == "epsilon"
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear" and not sd.scheduler_config["clip_sample"]
    assert sd.parameter_count() > 0 and sd.info().conditional
    assert isinstance(load_backend("stable-diffusion", pipeline=tiny_sd_pipeline), StableDiffusion)


def test_loads_from_saved_folder(sd, tiny_sd_folder):
    index = json.loads((tiny_sd_folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    loaded = load_backend("stable-diffusion", model=tiny_sd_folder)
    assert loaded.latent_shape == sd.latent_shape and loaded.image_size == sd.image_size
    torch.testing.assert_close(loaded.alphas_cumprod, sd.alphas_cumprod)
    # same seed, same weights: the folder round trip keeps the model and the tokenizer
    x = sd.randn_latents([3])
    c1, c2 = sd.encode_prompt("a red cat", 1), loaded.encode_prompt("a red cat", 1)
    torch.testing.assert_close(c2.cond_emb, c1.cond_emb)
    torch.testing.assert_close(loaded.eps(x, 500, c2), sd.eps(x, 500, c1))


def test_generation_deterministic_and_sensitive(sd, grid):
    n = grid.num_steps
    cat = sd.encode_prompt(["a red cat", "a red cat"], 2)
    x = sd.randn_latents([1, 2])
    out = denoise(sd, x, grid, n, 0, cat)
    assert out.shape == (2, *sd.latent_shape) and torch.isfinite(out).all()
    torch.testing.assert_close(denoise(sd, x, grid, n, 0, cat), out, rtol=0, atol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # another seed, another sample
    # a sample does not depend on its batch
    one = denoise(sd, sd.randn_latents([1]), grid, n, 0, sd.encode_prompt("a red cat", 1))
    torch.testing.assert_close(one[0], out[0], rtol=1e-3, atol=1e-4)
    # the prompt and the guidance scale matter
    dog = denoise(sd, x, grid, n, 0, sd.encode_prompt("a dog", 2))
    assert (dog - out).abs().max() > 1e-3
    plain = denoise(sd, x, grid, n, 0, sd.encode_prompt("a red cat", 2, guidance_scale=1.0))
    assert (plain - out).abs().max() > 1e-3


def test_cfg_is_one_batched_unet_call(sd):
    batches = []
    hook = sd.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        x = sd.randn_latents([0, 1, 2])
        cond = sd.encode_prompt(["a cat", "a dog", None], 3, guidance_scale=5.0)
        guided = sd.eps(x, 400, cond)
        assert batches == [6]
        e_c = sd.eps(x, torch.full((3,), 400), cond.cond_emb)
        e_u = sd.eps(x, 400, cond.uncond_emb)
        assert batches == [6, 3, 3]
        torch.testing.assert_close(guided, e_u + 5.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)
        # guidance 1 is the conditional prediction alone; no conditioning is the empty prompt
        torch.testing.assert_close(sd.eps(x, 400, SDCondition(cond.cond_emb, cond.uncond_emb, 1.0)), e_c)
        torch.testing.assert_close(sd.eps(x, 400, None), sd.eps(x, 400, sd.encode_prompt(None, 3).cond_emb))
        assert batches[-3:] == [3, 3, 3]
    finally:
        hook.remove()
    # a batch-1 conditioning is broadcast; eps keeps x_t's dtype
    e = sd.eps(x.double(), 400, sd.encode_prompt("a cat", 1))
    assert e.dtype == torch.float64 and e.shape == x.shape


def test_invert_denoise_round_trip(sd, grid):
    cond = sd.encode_prompt(["a red cat", "a dog"], 2, guidance_scale=1.0)
    images = torch.rand(2, 3, sd.image_size, sd.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z0 = sd.encode(images)
    # random weights make long round trips inexact; one small step must come back closely
    z1 = invert(sd, z0, grid, 0, 1, cond)
    err = relative_l2(denoise(sd, z1, grid, 1, 0, cond), z0)
    assert float(err.max()) < 0.1, err
    zt = invert(sd, z0, grid, 0, None, cond)
    back = denoise(sd, zt, grid, grid.num_steps, 0, cond)
    assert zt.shape == back.shape == z0.shape and torch.isfinite(back).all()
    assert (zt - z0).abs().max() > 0.5  # x_T is far from x_0


def test_encode_decode_shapes(sd):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = sd.encode(images)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    out = sd.decode(z)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    with pytest.raises(InvalidShapeError, match="16, 16"):
        sd.encode(torch.zeros(1, 3, 32, 32))


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(InvalidParameterError, match="model_index.json is missing") as e:
        StableDiffusion(model=tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    (tmp_path / "vae").mkdir()
    with pytest.raises(InvalidParameterError, match="missing unet, text_encoder, tokenizer, scheduler"):
        StableDiffusion(model=tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(InvalidParameterError, match="is a file"):
        StableDiffusion(model=tmp_path / "weights.safetensors")
    with pytest.raises(InvalidParameterError, match="neither an existing pipeline folder nor a hub id"):
        StableDiffusion(model=str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(InvalidParameterError, match="model="):
        StableDiffusion()


def test_bad_shapes_and_prompts(sd, grid):
    with pytest.raises(InvalidShapeError, match=r"\(batch, 4, 8, 8\)"):
        sd.eps(torch.zeros(1, 4, 16, 16), 10)
    with pytest.raises(InvalidShapeError):
        sd.decode(torch.zeros(4, 8, 8))
    with pytest.raises(InvalidShapeError):
        denoise(sd, torch.zeros(2, 3, 8, 8), grid, 2)
    with pytest.raises(InvalidParameterError, match="2 prompts given for a batch of 3"):
        sd.encode_prompt(["a", "b"], 3)
    with pytest.raises(InvalidParameterError, match="negative prompts"):
        sd.encode_prompt("a", 2, negative_prompts=["x"])
    with pytest.raises(InvalidShapeError, match="batch of 3"):
        sd.eps(sd.randn_latents([0, 1, 2]), 10, sd.encode_prompt("a", 2))
    with pytest.raises(InvalidParameterError, match="cond must be"):
        sd.eps(sd.randn_latents([0]), 10, "a cat")
    with pytest.raises(InvalidParameterError, match="guidance_scale"):
        StableDiffusion(pipeline=object(), guidance_scale=-1)
    with pytest.raises(InvalidParameterError, match="lacks unet"):
        StableDiffusion(pipeline=object())


def test_pipeline_scheduler_config_becomes_ddim(tiny_sd_pipeline):
    from diffusers import PNDMScheduler

    sd_cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1)
    cfg = ddim_config(PNDMScheduler(**sd_cfg).config)
    assert cfg["clip_sample"] is False and "skip_prk_steps" not in cfg and cfg["steps_offset"] == 1
    pndm = StableDiffusion(pipeline=_with_scheduler(tiny_sd_pipeline, PNDMScheduler(**sd_cfg)))
    torch.testing.assert_close(pndm.alphas_cumprod, tiny_sd_pipeline.scheduler.alphas_cumprod.double())
    assert make_grid(pndm, STEPS).timesteps == make_grid(StableDiffusion(pipeline=tiny_sd_pipeline), STEPS).timesteps
    # a v-prediction model's output is returned as ε
    v = StableDiffusion(pipeline=_with_scheduler(
        tiny_sd_pipeline, PNDMScheduler(**sd_cfg, prediction_type="v_prediction")))
    assert v.prediction_type == "v_prediction" and v.scheduler_config["prediction_type"] == "epsilon"
    x, t = v.randn_latents([0]), 600
    raw = v.unet(x, torch.tensor([t]), encoder_hidden_states=v.encode_prompt(None, 1).cond_emb).sample
    a = float(v.alphas_cumprod[t])
    torch.testing.assert_close(v.eps(x, t), a ** 0.5 * raw + (1 - a) ** 0.5 * x)
