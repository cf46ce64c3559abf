"""Adding a method is its class plus one registry entry: a toy method defined here, registered with
``register_method`` and nothing else, runs through keys, a real gRPC server and a quick bench.

The toy ("sign-code") writes a ±1 pattern drawn from the key into the signs of channel 0 of x_T
and verifies by DDIM inversion to x_T: ``k`` of ``n`` signs agreeing with the pattern gives the
exact p-value ``P(Binomial(n, 1/2) >= k)`` (the pattern is independent of any image not made with
the key). docs/adding-a-method.md walks through the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from shallowmark.errors import InvalidParameterError, check_int

NAME = "sign-code"


def _toy_class():
    """The method, built on the protocol's base classes (imported lazily: core needs torch)."""
    import torch

    from shallowmark.core import ddim
    from shallowmark.core.watermarks.base import LatentMethod, ModelEvals, bit_verdict
    from shallowmark.keys import method_seed

    @dataclass(frozen=True)
    class SignCodeConfig:
        num_steps: int = 50

        def validate(self, latent_shape) -> None:
            if latent_shape is None:
                raise InvalidParameterError(f"{NAME} needs a diffusion backend")
            check_int("num_steps", self.num_steps, 1)

    class SignCode(LatentMethod):
        name = NAME
        supports_embed = False
        config_class = SignCodeConfig

        def __init__(self, backend, config=None):
            self._configure(backend, config)  # validates the config and builds self.grid

        def model_evals(self) -> ModelEvals:
            n = self.config.num_steps
            return ModelEvals(generate=n, embed=0, verify=n)

        def pattern(self, key) -> np.ndarray:
            h, w = self.backend.latent_shape[1:]
            rng = np.random.default_rng(method_seed(key, "sign-pattern"))
            return rng.integers(0, 2, size=(h, w), dtype=np.uint8)

        def generate_latents(self, keys, seeds, prompts=None):
            keys = self.check_keys(keys, len(seeds))
            x = self.backend.randn_latents(seeds).clone()
            signs = torch.from_numpy(np.stack([self.pattern(k) for k in keys]).astype(np.float32) * 2 - 1)
            x[:, 0] = x[:, 0].abs() * signs.to(x.device, x.dtype)
            with torch.no_grad():
                return ddim.denoise(self.backend, x, self.grid, self.grid.num_steps, 0)

        def _score(self, x_T, keys, target_fpr):
            got = (x_T[:, 0].detach().float().cpu().numpy() > 0).astype(np.uint8).reshape(len(x_T), -1)
            expected = np.stack([self.pattern(k).ravel() for k in keys])
            return [bit_verdict(self.name, np.broadcast_to(g, expected.shape), expected, keys, target_fpr,
                                self.config.num_steps) for g in got]

    return SignCode


@pytest.fixture
def registered():
    from shallowmark.methods import LATENT, MethodSpec, register_method, unregister_method

    register_method(MethodSpec(NAME, _toy_class(), LATENT, summary="toy: key pattern in the signs of x_T"))
    yield NAME
    unregister_method(NAME)


def test_the_registry_refuses_a_second_definition_and_keys_follow_it(registered):
    from shallowmark.keys import WatermarkKey, ring_seed
    from shallowmark.methods import LATENT, MethodSpec, method_names, register_method
    from shallowmark.errors import KeyMaterialError

    assert NAME in method_names()
    with pytest.raises(InvalidParameterError, match="already registered"):
        register_method(MethodSpec(NAME, "x.y:Z", LATENT))
    mk = WatermarkKey.from_hex(f"{5:064x}").for_method(NAME)
    with pytest.raises(KeyMaterialError, match="ring_seed"):  # derivations not declared are refused
        ring_seed(mk)


def test_a_registered_method_runs_through_a_real_server(registered, tmp_path, loader, make_config, token_a):
    from shallowmark.client import Client
    from shallowmark.keys import WatermarkKey
    from shallowmark.server.app import ServerApp

    options = {**make_config(tmp_path).method_options, NAME: {"num_steps": 10}}
    config = make_config(tmp_path, method_options=options)
    app = ServerApp(config, backend_loader=loader).start()
    try:
        assert app.wait_until_ready(120)
        key = WatermarkKey.from_hex(f"{7:064x}")
        other = WatermarkKey.from_hex(f"{8:064x}")
        with Client(app.address, token_a, timeout=120, retries=0) as c:
            info = {m.name: m for m in c.info().methods}
            assert info[NAME].verify_model_evals == 10 and info[NAME].supports_embed is False
            emb = c.embed(key.for_method(NAME), seed=3)
            assert emb.method == NAME and emb.model_evals == 10
            res = c.verify(emb.image, [key.for_method(NAME), other.for_method(NAME)])
            assert res.detected and res.identified_key_id == key.key_id_for(NAME)
            assert res.best.p_value < 1e-6 and res.model_evals == 10
            plain = c.verify(emb.image, [other.for_method(NAME)])
            assert not plain.detected
    finally:
        app.stop(1.0)


def test_a_registered_method_runs_through_a_quick_bench(registered, tmp_path, tiny_ldm):
    from shallowmark.attacks.bench import BenchConfig, run_bench

    cfg = BenchConfig.quick_config(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", methods=(NAME,))
    report = run_bench(cfg, progress=False, backend=tiny_ldm)
    clean = [r for r in report["results"] if r["method"] == NAME and r["attack"] == "clean"]
    assert clean and clean[0]["auc"] == 1.0
    assert report["config"]["diffusion_methods"] == [NAME]
    assert [c["verify_model_evals"] for c in report["cost"]] == [cfg.num_steps]
