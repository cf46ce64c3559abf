"""Deterministic DDIM sampling and inversion that can start and stop at any step.

Positions on the grid: ``0`` is the clean latent x_0 and ``k = 1..N`` the k-th DDIM timestep in
ascending order, so ``N`` is x_T. A caller runs any segment: T→t* (``denoise(x, grid, N, k*)``),
t*→0, 0→t* (``invert(x, grid, 0, k*)``) and 0→T. The timesteps and the ᾱ table come from diffusers'
``DDIMScheduler`` built from the model's own scheduler config, and the DDIM update is written
once (``_move``) for both directions, as diffusers' ``DDIMScheduler``/``DDIMInverseScheduler`` do:
denoising k→k-1 uses ε(x_k, t_k); inverting k-1→k uses ε(x_{k-1}, t_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from shallowmark.errors import InvalidParameterError


@dataclass(frozen=True)
class DDIMGrid:
    """A DDIM step grid: ``timesteps[k-1]`` is the training timestep at position k, ``alphas[k]``
    its ᾱ (``alphas[0]`` is the final ᾱ the scheduler steps to at the end)."""

    timesteps: tuple[int, ...]
    alphas: torch.Tensor  # float64, length N + 1

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def position(self, fraction: float) -> int:
        """Grid position of a fraction of T, e.g. ``position(0.3) == 15`` for 50 steps."""
        if not 0.0 < float(fraction) <= 1.0:
            raise InvalidParameterError(f"t* must be a fraction of T in (0, 1]; got {fraction}")
        return max(1, min(self.num_steps, round(float(fraction) * self.num_steps)))


def make_grid(backend, num_steps: int = 50) -> DDIMGrid:
    """The DDIM grid of ``num_steps`` steps for ``backend``'s training schedule."""
    from diffusers import DDIMScheduler

    if not 1 <= int(num_steps) <= backend.num_train_timesteps:
        raise InvalidParameterError(f"num_steps must be in [1, {backend.num_train_timesteps}]; got {num_steps}")
    sched = DDIMScheduler.from_config(backend.scheduler_config)
    sched.set_timesteps(int(num_steps))
    ts = tuple(int(t) for t in sched.timesteps.flip(0).tolist())
    abar = backend.alphas_cumprod
    final = torch.tensor([float(sched.final_alpha_cumprod)], dtype=torch.float64)
    return DDIMGrid(ts, torch.cat([final, abar[list(ts)].double()]))


def _move(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps


def _check_segment(grid: DDIMGrid, start: int, stop: int, descending: bool) -> None:
    n = grid.num_steps
    if not (0 <= start <= n and 0 <= stop <= n):
        raise InvalidParameterError(f"grid positions must be in [0, {n}]; got start={start}, stop={stop}")
    if descending and stop > start:
        raise InvalidParameterError(f"denoise goes down the grid: stop ({stop}) must be <= start ({start})")
    if not descending and stop < start:
        raise InvalidParameterError(f"invert goes up the grid: stop ({stop}) must be >= start ({start})")


@torch.no_grad()
def denoise(backend, x: torch.Tensor, grid: DDIMGrid, start: int, stop: int = 0, cond: Any = None,
            callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run DDIM from grid position ``start`` down to ``stop`` (batched, deterministic)."""
    _check_segment(grid, start, stop, descending=True)
    backend.check_latents(x)
    for k in range(start, stop, -1):
        t = torch.full((x.shape[0],), grid.timesteps[k - 1], device=x.device, dtype=torch.long)
        eps = backend.eps(x, t, cond).to(x.dtype)
        x = _move(x, eps, float(grid.alphas[k]), float(grid.alphas[k - 1]))
        if callback is not None:
            callback(k - 1, x)
    return x


@torch.no_grad()
def invert(backend, x: torch.Tensor, grid: DDIMGrid, start: int = 0, stop: int | None = None,
           cond: Any = None) -> torch.Tensor:
    """DDIM inversion from grid position ``start`` up to ``stop`` (default: x_T)."""
    stop = grid.num_steps if stop is None else stop
    _check_segment(grid, start, stop, descending=False)
    backend.check_latents(x)
    for k in range(start + 1, stop + 1):
        t = torch.full((x.shape[0],), grid.timesteps[k - 1], device=x.device, dtype=torch.long)
        eps = backend.eps(x, t, cond).to(x.dtype)
        x = _move(x, eps, float(grid.alphas[k - 1]), float(grid.alphas[k]))
    return x


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖a − b‖ / ‖b‖, the round-trip error the reports quote."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
