"""The benchmark's on-disk cache: PNG images and a SQLite table of per-image scores and timings.

Images live under ``<root>/images/<folder>/<seed>.png``; scores are keyed by ``(ctx, seed)``, where
``ctx`` is a hash of everything the score depends on (see the runners). The folder and context
names are the runners' business; this module only stores and reads them, so the in-process and
server runners can share one cache folder without their entries meeting.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["BenchCache", "stable_hash"]


def stable_hash(obj, n: int = 16) -> str:
    """First ``n`` hex digits of the SHA-1 of ``obj`` as sorted-key JSON (non-JSON values as ``str``)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class BenchCache:
    """PNG images on disk and a SQLite table of per-image scores and timings."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(root / "scores.sqlite"))
        self.db.execute("""CREATE TABLE IF NOT EXISTS scores (
            ctx TEXT, seed INTEGER, method TEXT, attack TEXT, kind TEXT, score REAL, p_value REAL,
            detected INTEGER, bit_accuracy REAL, model_evals INTEGER, key_id TEXT,
            PRIMARY KEY (ctx, seed))""")
        self.db.execute("""CREATE TABLE IF NOT EXISTS timings (
            what TEXT, ctx TEXT, seed INTEGER, seconds REAL, PRIMARY KEY (what, ctx, seed))""")
        self.db.commit()

    def close(self):
        self.db.close()

    # images
    def image_path(self, folder: str, seed: int) -> Path:
        return self.root / "images" / folder / f"{int(seed)}.png"

    def load_images(self, folder: str, seeds: Sequence[int]) -> dict[int, np.ndarray]:
        from PIL import Image

        out = {}
        for s in seeds:
            p = self.image_path(folder, s)
            if p.exists():
                try:
                    with Image.open(p) as im:
                        out[int(s)] = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
                except OSError:  # a PNG cut short by an interruption: make it again
                    p.unlink(missing_ok=True)
        return out

    def save_images(self, folder: str, seeds: Sequence[int], images: np.ndarray) -> None:
        from shallowmark.imaging import encode_png

        for s, im in zip(seeds, images):
            p = self.image_path(folder, s)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp.png")
            tmp.write_bytes(encode_png(np.asarray(im)))
            os.replace(tmp, p)  # atomic: a half-written PNG is never read back

    # scores
    def scored(self, ctx: str) -> dict[int, tuple]:
        rows = self.db.execute("SELECT seed, score, p_value, detected, bit_accuracy, model_evals FROM scores "
                               "WHERE ctx = ?", (ctx,)).fetchall()
        return {int(r[0]): r[1:] for r in rows}

    def put_scores(self, rows: list[tuple]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        self.db.commit()

    # timings
    def put_timings(self, what: str, ctx: str, seeds: Sequence[int], seconds_each: float) -> None:
        self.db.executemany("INSERT OR REPLACE INTO timings VALUES (?,?,?,?)",
                            [(what, ctx, int(s), float(seconds_each)) for s in seeds])
        self.db.commit()

    def mean_timing(self, what: str, ctxs: Iterable[str], seeds: Sequence[int]) -> Optional[float]:
        ctxs = list(ctxs)
        if not ctxs:
            return None
        q = (f"SELECT AVG(seconds), COUNT(*) FROM timings WHERE what = ? AND ctx IN ({','.join('?' * len(ctxs))}) "
             f"AND seed >= ? AND seed <= ?")
        avg, cnt = self.db.execute(q, (what, *ctxs, min(seeds), max(seeds))).fetchone()
        return float(avg) if cnt else None
