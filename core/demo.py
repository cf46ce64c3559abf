"""``make demo`` / ``shallowmark demo``: the whole service on the embedded model, in one process.

1. starts a real shallowmark gRPC server on a free loopback port (a one-off development token,
   a temporary ledger and attestation key), serving tiny-ldm;
2. creates a keystore with two keys: the first is used, then rotated out (retired), the second is
   the active one;
3. embeds through the RPC: two generated images (one per key) and the held-out photo (uploaded
   and watermarked with the active key, ``output="residual"`` so that it keeps its own pixels), all
   with Shallow Diffuse;
4. attacks every image with the paper's four attacks (JPEG, blur, noise, brightness jitter, each
   at its reference strength), and adds unwatermarked controls (the photo itself, and the second
   generated image's seed rendered without a watermark);
5. verifies everything through the RPC against every key in the keystore, concurrently (the server
   micro-batches the calls), checks each result's Ed25519 attestation, and prints the verdicts;
6. writes the images, ``contact_sheet.png`` (rows: images; columns: clean and the four attacks;
   green label = detected) and ``summary.json`` to the output folder.

Generation uses 50 DDIM steps; verification inverts only to t* = 0.3T (15 steps), the point of
Shallow Diffuse. The DDIM round-trip measurements that were here live in ``shallowmark bench-core``.
"""

from __future__ import annotations

import io
import json
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ATTACKS = ("jpeg", "blur", "noise", "jitter")
METHOD = "shallow-diffuse"


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _contact_sheet(cells: list[list[np.ndarray]], labels: list[list[tuple[str, bool | None]]],
                   row_names: list[str], col_names: list[str], cell: int = 160) -> np.ndarray:
    """Grid of images with a verdict label per cell (green: detected, grey: not) and headers."""
    from PIL import Image, ImageDraw

    head, side = 18, 118
    rows, cols = len(cells), len(cells[0])
    sheet = Image.new("RGB", (side + cols * cell, head + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(col_names):
        draw.text((side + c * cell + 4, 3), name, fill="black")
    for r in range(rows):
        draw.text((4, head + r * cell + cell // 2 - 6), row_names[r], fill="black")
        for c in range(cols):
            x, y = side + c * cell, head + r * cell
            sheet.paste(Image.fromarray(cells[r][c]).resize((cell, cell), Image.LANCZOS), (x, y))
            text, detected = labels[r][c]
            colour = (20, 140, 40) if detected else (90, 90, 90)
            draw.rectangle((x, y + cell - 15, x + cell - 1, y + cell - 1), fill=colour)
            draw.text((x + 3, y + cell - 14), text, fill="white")
    return np.asarray(sheet)


def run_demo(out: Path, *, num_steps: int = 50, target_fpr: float = 1e-3, workers: int = 8, log=print) -> int:
    """Run the demo into ``out``; returns 0.

    ``num_steps``: DDIM steps of generation (verification inverts round(0.3 x num_steps)); lower it
    for a quick check. ``target_fpr``: the false-positive rate each verdict is held to (corrected for
    the number of keys searched); 1e-3 keeps the ten unwatermarked controls from showing a chance hit.
    """
    from PIL import Image

    from shallowmark.attacks import apply_attack
    from shallowmark.attestation import verify_attestation
    from shallowmark.client import Client
    from shallowmark.core.images import psnr
    from shallowmark.core.photos import center_crop, heldout_photo
    from shallowmark.keystore import Keystore
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import ServerConfig

    t_start = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="shallowmark-demo-") as tmp:
        tmp = Path(tmp)
        token = secrets.token_urlsafe(16)
        config = ServerConfig(host="127.0.0.1", port=0, tokens={token: "demo"}, state_dir=tmp / "server",
                              method_options={METHOD: {"num_steps": num_steps}}, workers=workers,
                              max_batch=8, grace_s=2.0)
        t0 = time.perf_counter()
        app = ServerApp(config).start()
        try:
            with Client(app.address, token, timeout=600) as client:
                client.wait_until_ready(timeout=300)
                info = client.info()
                timings["server_start_s"] = time.perf_counter() - t0
                pinned = info.attestation_public_key
                model = info.models[0]
                costs = {m.name: m for m in info.methods}[METHOD]
                log(f"server on {app.address} (plaintext, loopback), model {model.name} {model.image_size}px, "
                    f"{METHOD}: generate {costs.generate_model_evals}, embed {costs.embed_model_evals}, verify "
                    f"{costs.verify_model_evals} model evaluations; attestation key {pinned.hex()[:16]}...")

                # -- keys: one used then rotated out, one active --------------------------------------
                store = Keystore.create(tmp / "demo.smks", secrets.token_urlsafe(16), scrypt_n=2**14)
                old = store.new_key(label="demo-2025")
                log(f"keystore: created {old.key_id} ({old.label})")

                # -- embed through the RPC --------------------------------------------------------------
                t0 = time.perf_counter()
                marked: dict[str, tuple[bytes, str]] = {}   # name -> (PNG, key_id)
                r = client.embed(old, method=METHOD, seed=0)
                marked["generated seed 0"] = (r.image, r.key_id)
                new = store.rotate(label="demo-2026")
                log(f"keystore: rotated to {new.key_id} ({new.label}); {old.key_id} is retired, still verifies")
                r = client.embed(new, method=METHOD, seed=1)
                marked["generated seed 1"] = (r.image, r.key_id)
                photo = center_crop(heldout_photo(), model.image_size)
                r = client.embed(new, method=METHOD, image=photo, output="residual")
                marked["photo (uploaded)"] = (r.image, r.key_id)
                timings["embed_s"] = time.perf_counter() - t0
                log(f"embedded 2 generated images and 1 uploaded photo in {timings['embed_s']:.1f} s")

                # -- controls: no watermark -------------------------------------------------------------
                lm = app.pool.get(model.name)
                with lm.lock:   # the same seed without the watermark, straight from the server's model
                    plain = app.pool.method(lm, METHOD).reference([1])[0]
                controls = {"photo, no watermark": _png(photo), "seed 1, no watermark": _png(plain)}
                fidelity = {
                    "generated seed 1 vs its unwatermarked twin": psnr(_decode(marked["generated seed 1"][0]), plain),
                    "photo watermarked vs original": psnr(_decode(marked["photo (uploaded)"][0]), photo),
                }

                # -- attacks ----------------------------------------------------------------------------
                cases = []   # (image name, attack, PNG bytes, expected key_id or None)
                sources = [(n, png, kid) for n, (png, kid) in marked.items()] + \
                          [(n, png, None) for n, png in controls.items()]
                for i, (name, png, kid) in enumerate(sources):
                    pixels = _decode(png)
                    cases.append((name, "clean", png, kid))
                    for a in ATTACKS:
                        attacked = apply_attack(a, pixels, rng=np.random.default_rng(1000 + i))
                        cases.append((name, a, _png(attacked), kid))
                for name, attack, png, _ in cases:
                    slug = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                    (out / "images" / f"{slug}__{attack}.png").write_bytes(png)

                # -- verify everything through the RPC, concurrently ------------------------------------
                keys = store.verification_keys()
                before = app.pool.stats()
                t0 = time.perf_counter()
                with ThreadPoolExecutor(workers) as ex:
                    results = list(ex.map(lambda c: client.verify(c[2], keys, method=METHOD,
                                                                  target_fpr=target_fpr), cases))
                timings["verify_s"] = time.perf_counter() - t0
                after = app.pool.stats()
                batches = after["batches"] - before["batches"]
                attested = sum(bool(verify_attestation(res, pinned, image=c[2])) for res, c in zip(results, cases))
                ledger = list(client.list_embeds())
        finally:
            app.stop(2.0)

    # -- report ------------------------------------------------------------------------------------
    rows = []
    for (name, attack, _, kid), res in zip(cases, results):
        best = res.best
        rows.append(dict(image=name, attack=attack, watermarked=kid is not None, expected_key_id=kid,
                         detected=res.detected, key_id=res.identified_key_id, p_value=best.p_value,
                         p_value_corrected=best.p_value_corrected, correct=(res.identified_key_id == kid),
                         request_id=res.request_id))
    log(f"\nverified {len(cases)} images against {len(keys)} keys at target FPR {target_fpr:g} in "
        f"{timings['verify_s']:.1f} s ({batches} batched model calls); {attested}/{len(cases)} attestations "
        "check out\n")
    log(f"{'image':<22}{'attack':<8}{'detected':<10}{'p-value':>10}  key_id")
    for r in rows:
        mark = "yes" if r["detected"] else "no"
        ok = "" if r["correct"] else "   (expected " + (r["expected_key_id"] or "none") + ")"
        log(f"{r['image']:<22}{r['attack']:<8}{mark:<10}{r['p_value']:>10.2e}  {r['key_id'] or '-'}{ok}")
    for what, db in fidelity.items():
        log(f"PSNR {what}: {db:.1f} dB")

    col_names = ["clean", *ATTACKS]
    names = list(dict.fromkeys(r["image"] for r in rows))
    cells = [[_decode(c[2]) for c in cases if c[0] == n] for n in names]
    labels = [[(("yes " if r["detected"] else "no ") + f"p={r['p_value']:.0e}", r["detected"])
               for r in rows if r["image"] == n] for n in names]
    Image.fromarray(_contact_sheet(cells, labels, names, col_names)).save(out / "contact_sheet.png")

    watermarked = [r for r in rows if r["watermarked"]]
    controls_rows = [r for r in rows if not r["watermarked"]]
    summary = dict(
        model=model.name, method=METHOD, num_steps=num_steps, verify_model_evals=costs.verify_model_evals,
        target_fpr=target_fpr,
        keys=[dict(key_id=old.key_id, label=old.label, retired=True), dict(key_id=new.key_id, label=new.label,
                                                                         retired=False)],
        attacks=list(ATTACKS), rows=rows,
        detected_watermarked=sum(r["detected"] and r["correct"] for r in watermarked),
        total_watermarked=len(watermarked),
        false_positives=sum(r["detected"] for r in controls_rows), total_controls=len(controls_rows),
        attestations_verified=attested, ledger_entries=len(ledger), verify_batches=batches,
        fidelity_psnr_db=fidelity, timings_s={**timings, "total_s": time.perf_counter() - t_start},
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"\nwatermarked images identified: {summary['detected_watermarked']}/{len(watermarked)} "
        f"(clean: {sum(r['detected'] and r['correct'] for r in watermarked if r['attack'] == 'clean')}/"
        f"{sum(r['attack'] == 'clean' for r in watermarked)}); false positives on controls: "
        f"{summary['false_positives']}/{len(controls_rows)}; ledger: {len(ledger)} embeds recorded")
    log(f"wrote {len(cases)} images (images/), contact_sheet.png and summary.json to {out}/ in "
        f"{summary['timings_s']['total_s']:.0f} s")
    return 0
