"""RingID (Ci et al., 2024): Tree-Ring with *discrete* ring values, built for identifying one key
among many.

Each of the R + 1 rings (11 at radius 10) carries ±``strength`` chosen by one bit of the key's
payload, so there are 2¹¹ distinct keys, as in the reference. Identification is the key with the
best statistic among the candidates (equivalently the nearest ring code). The reference also
fills a second channel with a heterogeneous noise pattern to help the ring channel survive; here
every other channel keeps its Gaussian noise, a simplification stated in the benchmark report.
"""

from __future__ import annotations

import torch

from shallowmark.core.watermarks.tree_ring import TreeRing
from shallowmark.keys import FamilyMember, MethodKey, payload_bits


class RingID(TreeRing):
    name = "ringid"

    def ring_values(self, key: MethodKey) -> torch.Tensor:
        if isinstance(key, FamilyMember):
            return super().ring_values(key)
        bits = torch.from_numpy(payload_bits(key, self.config.radius + 1).astype("float64"))
        return self.config.strength * (2 * bits - 1)

    def family_values(self, key: MethodKey, count: int, start: int = 0) -> torch.Tensor:
        # a member's rings are ±strength, as a single key's: the signs of the family's Gaussian values
        return self.config.strength * torch.sign(super().family_values(key, count, start))
