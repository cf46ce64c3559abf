"""``make demo`` / ``shallowmark demo``: the whole service on the embedded model, in one process.

1. starts a real shallowmark gRPC server on a free loopback port (a one-off development token,
   a temporary ledger and attestation key), serving tiny-ldm;
2. creates a keystore with two keys: the first is used, then rotated out (retired), the second is
   the active one;
3. embeds through the RPC: two generated images (one per key) and the held-out photo (uploaded
   and watermarked with the active key, ``output="residual"`` so that it keeps its own pixels), all
   with Shallow Diffuse;
4. attacks every image with the paper's four attacks (JPEG, blur, noise, brightness jitter, each
   at its reference strength) and with an off-centre crop to 80 % of the area followed by a 10°
   rotation, and adds unwatermarked controls (the photo itself, and the second
   generated image's seed rendered without a watermark);
5. verifies everything through the RPC against every key in the keystore, concurrently (the server
   micro-batches the calls), checks each result's Ed25519 attestation, and prints the verdicts;
6. writes the images, ``contact_sheet.png`` (rows: images; columns: clean and the five attacks;
   green label = detected) and ``summary.json`` to the output folder.

Generation uses 50 DDIM steps; verification inverts only to t* = 0.3T (15 steps), the point of
Shallow Diffuse. The DDIM round-trip measurements that were here live in ``shallowmark bench-core``.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shallowmark.cli._common import need
from shallowmark.imaging import decode_rgb, encode_png

#: columns of the verdict table: label -> the attacks applied in turn, (name, strength; None: the
#: reference strength). The paper's four, then a copy cropped off-centre and rotated (what a
#: re-framed screenshot looks like), which the sync template and the shift search undo.
ATTACKS = {"jpeg": [("jpeg", None)], "blur": [("blur", None)], "noise": [("noise", None)],
           "jitter": [("jitter", None)], "crop+rot": [("crop-corner", 0.8), ("rotate", 10)]}
METHOD = "shallow-diffuse"


def register(sub) -> None:
    d = sub.add_parser("demo", help="the newcomer's tour: a local server, keys, embed, attacks, verify")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps of generation (verification inverts 30%%)")
    d.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    need("server", "demo")
    return run_demo(Path(args.out), num_steps=args.steps)


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


@dataclass
class _Server:
    """The running demo server and what its Info said."""

    app: object
    client: object
    pinned: bytes      # its attestation public key
    model: object      # its first model's info
    costs: object      # the model evaluations of METHOD


@dataclass
class _Verified:
    results: list
    keys: list
    batches: int
    attested: int
    ledger: list


@contextmanager
def _demo_server(tmp: Path, num_steps: int, workers: int, timings: dict, log):
    """A real server on a free loopback port (a one-off token, state under ``tmp``) and a client
    connected to it; the server stops when the block ends."""
    from shallowmark.client import Client
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import ServerConfig

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
            srv = _Server(app, client, info.attestation_public_key, info.models[0],
                          {m.name: m for m in info.methods}[METHOD])
            log(f"server on {app.address} (plaintext, loopback), model {srv.model.name} {srv.model.image_size}px, "
                f"{METHOD}: generate {srv.costs.generate_model_evals}, embed {srv.costs.embed_model_evals}, verify "
                f"{srv.costs.verify_model_evals} model evaluations; attestation key {srv.pinned.hex()[:16]}...")
            yield srv
    finally:
        app.stop(2.0)


def _embed(srv: _Server, tmp: Path, timings: dict, log):
    """A keystore with one key used then rotated out and one active key; embeds two generated images
    (one per key) and the held-out photo (uploaded, residual output) through the RPC.
    Returns (store, old key, new key, {name: (PNG, key_id)}, the photo's pixels)."""
    from shallowmark.core.photos import heldout_photo
    from shallowmark.keystore import Keystore

    store = Keystore.create(tmp / "demo.smks", secrets.token_urlsafe(16), scrypt_n=2**14)
    old = store.new_key(label="demo-2025")
    log(f"keystore: created {old.key_id} ({old.label})")

    t0 = time.perf_counter()
    marked: dict[str, tuple[bytes, str]] = {}   # name -> (PNG, key_id)
    r = srv.client.embed(old, method=METHOD, seed=0)
    marked["generated seed 0"] = (r.image, r.key_id)
    new = store.rotate(label="demo-2026")
    log(f"keystore: rotated to {new.key_id} ({new.label}); {old.key_id} is retired, still verifies")
    r = srv.client.embed(new, method=METHOD, seed=1)
    marked["generated seed 1"] = (r.image, r.key_id)
    photo = heldout_photo()   # at its own size: the server maps it onto the model's grid itself
    r = srv.client.embed(new, method=METHOD, image=photo, output="residual")
    marked["photo (uploaded)"] = (r.image, r.key_id)
    timings["embed_s"] = time.perf_counter() - t0
    back = decode_rgb(r.image).shape
    log(f"embedded 2 generated images and 1 uploaded photo ({photo.shape[1]}x{photo.shape[0]}, returned at "
        f"{back[1]}x{back[0]}) in {timings['embed_s']:.1f} s")
    return store, old, new, marked, photo


def _controls(srv: _Server, photo: np.ndarray, marked: dict):
    """The unwatermarked controls (the photo, seed 1 without the watermark) and the PSNR of the
    watermarked images against them."""
    from shallowmark.core.images import psnr

    lm = srv.app.pool.get(srv.model.name)
    with lm.lock:   # the same seed without the watermark, straight from the server's model
        plain = srv.app.pool.method(lm, METHOD).reference([1])[0]
    controls = {"photo, no watermark": encode_png(photo), "seed 1, no watermark": encode_png(plain)}
    fidelity = {
        "generated seed 1 vs its unwatermarked twin": psnr(decode_rgb(marked["generated seed 1"][0]), plain),
        "photo watermarked vs original": psnr(decode_rgb(marked["photo (uploaded)"][0]), photo),
    }
    return controls, fidelity


def _attack(marked: dict, controls: dict, out: Path) -> list:
    """Every image clean and under each attack, written to ``out/images``; returns the cases
    (image name, attack, PNG bytes, expected key_id or None)."""
    from shallowmark.attacks import apply_attack

    cases = []
    sources = [(n, png, kid) for n, (png, kid) in marked.items()] + \
              [(n, png, None) for n, png in controls.items()]
    for i, (name, png, kid) in enumerate(sources):
        pixels = decode_rgb(png)
        cases.append((name, "clean", png, kid))
        for label, steps in ATTACKS.items():
            rng = np.random.default_rng(1000 + i)
            attacked = pixels
            for attack, strength in steps:
                attacked = apply_attack(attack, attacked, strength, rng=rng)
            cases.append((name, label, encode_png(attacked), kid))
    for name, attack, png, _ in cases:
        slug = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        (out / "images" / f"{slug}__{attack}.png").write_bytes(png)
    return cases


def _verify(srv: _Server, store, cases: list, target_fpr: float, workers: int, timings: dict) -> _Verified:
    """Every case against every key through the RPC, concurrently (the server micro-batches the
    calls); checks each result's attestation and reads the ledger."""
    from shallowmark.attestation import verify_attestation

    keys = store.verification_keys()
    before = srv.app.pool.stats()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda c: srv.client.verify(c[2], keys, method=METHOD,
                                                          target_fpr=target_fpr), cases))
    timings["verify_s"] = time.perf_counter() - t0
    after = srv.app.pool.stats()
    batches = after["batches"] - before["batches"]
    attested = sum(bool(verify_attestation(res, srv.pinned, image=c[2])) for res, c in zip(results, cases))
    ledger = list(srv.client.list_embeds())
    return _Verified(results, keys, batches, attested, ledger)


def _rows(cases: list, results: list) -> list[dict]:
    rows = []
    for (name, attack, _, kid), res in zip(cases, results):
        best = res.best
        rows.append(dict(image=name, attack=attack, watermarked=kid is not None, expected_key_id=kid,
                         detected=res.detected, key_id=res.identified_key_id, p_value=best.p_value,
                         p_value_corrected=best.p_value_corrected, correct=(res.identified_key_id == kid),
                         request_id=res.request_id))
    return rows


def _print_verdicts(rows: list, cases: list, v: _Verified, fidelity: dict, target_fpr: float, timings: dict,
                    log) -> None:
    log(f"\nverified {len(cases)} images against {len(v.keys)} keys at target FPR {target_fpr:g} in "
        f"{timings['verify_s']:.1f} s ({v.batches} batched model calls); {v.attested}/{len(cases)} attestations "
        "check out\n")
    log(f"{'image':<22}{'attack':<10}{'detected':<10}{'p-value':>10}  key_id")
    for r in rows:
        mark = "yes" if r["detected"] else "no"
        ok = "" if r["correct"] else "   (expected " + (r["expected_key_id"] or "none") + ")"
        log(f"{r['image']:<22}{r['attack']:<10}{mark:<10}{r['p_value']:>10.2e}  {r['key_id'] or '-'}{ok}")
    for what, db in fidelity.items():
        log(f"PSNR {what}: {db:.1f} dB")


def _write_contact_sheet(out: Path, rows: list, cases: list) -> None:
    from PIL import Image

    col_names = ["clean", *ATTACKS]
    names = list(dict.fromkeys(r["image"] for r in rows))
    cells = [[decode_rgb(c[2]) for c in cases if c[0] == n] for n in names]
    labels = [[(("yes " if r["detected"] else "no ") + f"p={r['p_value']:.0e}", r["detected"])
               for r in rows if r["image"] == n] for n in names]
    Image.fromarray(_contact_sheet(cells, labels, names, col_names)).save(out / "contact_sheet.png")


def _summary(srv: _Server, num_steps: int, target_fpr: float, old, new, rows: list, v: _Verified,
             fidelity: dict, timings: dict, t_start: float) -> dict:
    watermarked = [r for r in rows if r["watermarked"]]
    controls_rows = [r for r in rows if not r["watermarked"]]
    return dict(
        model=srv.model.name, method=METHOD, num_steps=num_steps, verify_model_evals=srv.costs.verify_model_evals,
        target_fpr=target_fpr,
        # server_key_id: the id results and the ledger use (the commitment of the method's material)
        keys=[dict(key_id=old.key_id, server_key_id=old.key_id_for(METHOD), label=old.label, retired=True),
              dict(key_id=new.key_id, server_key_id=new.key_id_for(METHOD), label=new.label, retired=False)],
        attacks=list(ATTACKS), rows=rows,
        detected_watermarked=sum(r["detected"] and r["correct"] for r in watermarked),
        total_watermarked=len(watermarked),
        false_positives=sum(r["detected"] for r in controls_rows), total_controls=len(controls_rows),
        attestations_verified=v.attested, ledger_entries=len(v.ledger), verify_batches=v.batches,
        fidelity_psnr_db=fidelity, timings_s={**timings, "total_s": time.perf_counter() - t_start},
    )


def run_demo(out: Path, *, num_steps: int = 50, target_fpr: float = 1e-3, workers: int = 8, log=print) -> int:
    """Run the demo into ``out``; returns 0.

    ``num_steps``: DDIM steps of generation (verification inverts round(0.3 x num_steps)); lower it
    for a quick check. ``target_fpr``: the false-positive rate each verdict is held to (corrected for
    the number of keys searched); 1e-3 keeps the ten unwatermarked controls from showing a chance hit.
    """
    t_start = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="shallowmark-demo-") as tmp:
        tmp = Path(tmp)
        with _demo_server(tmp, num_steps, workers, timings, log) as srv:
            store, old, new, marked, photo = _embed(srv, tmp, timings, log)
            controls, fidelity = _controls(srv, photo, marked)
            cases = _attack(marked, controls, out)
            verified = _verify(srv, store, cases, target_fpr, workers, timings)

    rows = _rows(cases, verified.results)
    _print_verdicts(rows, cases, verified, fidelity, target_fpr, timings, log)
    _write_contact_sheet(out, rows, cases)
    summary = _summary(srv, num_steps, target_fpr, old, new, rows, verified, fidelity, timings, t_start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    watermarked = [r for r in rows if r["watermarked"]]
    log(f"\nwatermarked images identified: {summary['detected_watermarked']}/{len(watermarked)} "
        f"(clean: {sum(r['detected'] and r['correct'] for r in watermarked if r['attack'] == 'clean')}/"
        f"{sum(r['attack'] == 'clean' for r in watermarked)}); false positives on controls: "
        f"{summary['false_positives']}/{summary['total_controls']}; ledger: {len(verified.ledger)} embeds recorded")
    log(f"wrote {len(cases)} images (images/), contact_sheet.png and summary.json to {out}/ in "
        f"{summary['timings_s']['total_s']:.0f} s")
    return 0
