"""The real-photo user scenario: photos at their own sizes through a real server."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from shallowmark.attacks import photos_report
from shallowmark.attacks.photos import Photo
from shallowmark.errors import InvalidParameterError


def test_pick_spreads_evenly_over_sources_and_is_repeatable():
    img = np.zeros((4, 4, 3), np.uint8)
    ps = [Photo("a", f"{i:02d}.jpg", img) for i in range(10)] + [Photo("b", f"{i}.png", img) for i in range(2)]
    chosen = photos_report.pick(ps, 6)
    assert [(p.source, p.name) for p in chosen] == [("a", "00.jpg"), ("a", "03.jpg"), ("a", "06.jpg"), ("a", "09.jpg"),
                                                     ("b", "0.png"), ("b", "1.png")]   # b has only 2
    assert photos_report.pick(list(reversed(ps)), 6) == chosen
    with pytest.raises(InvalidParameterError, match="13 photos asked for, 12 fetched"):
        photos_report.pick(ps, 13)
    with pytest.raises(InvalidParameterError, match="at least 1"):
        photos_report.pick(ps, 0)


def _fake_source(root, photos: dict):
    """A fetched ``ifct`` source in ``root``: the files and a manifest like fetch-photos writes."""
    from PIL import Image

    folder = root / "photos" / "ifct"
    folder.mkdir(parents=True)
    files = []
    for name, img in photos.items():
        Image.fromarray(img).save(folder / name)
        data = (folder / name).read_bytes()
        files.append(dict(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), width=img.shape[1],
                          height=img.shape[0], package="test", origin=name, licence="CC0-1.0"))
    (folder / "MANIFEST.json").write_text(json.dumps(dict(source="ifct", packages=[], licence="CC0-1.0",
                                                          selection="test", files=files)))


def test_photos_through_a_real_server_keep_their_size_and_are_detected(tmp_path):
    from shallowmark.core.photos import heldout_photo

    photo = heldout_photo()          # 512x600, never seen in training
    _fake_source(tmp_path, {"a.png": photo[:300, :480], "b.png": photo[100:, 40:400]})
    cfg = photos_report.PhotoScenarioConfig(n=2, sources=("ifct",), cache_dir=str(tmp_path), num_steps=20)
    res = photos_report.run(cfg, tmp_path / "out", log=lambda *_: None)
    assert [(r["width"], r["height"]) for r in res["rows"]] == [(480, 300), (360, 500)]
    for r in res["rows"]:
        assert r["psnr"] > 35 and r["ssim"] > 0.9 and r["licence"] == "CC0-1.0"
        assert r["verdicts"]["watermarked/clean"]["detected"] and r["verdicts"]["watermarked/clean"]["p"] < 1e-6
        assert not any(r["verdicts"][f"original/{p}"]["detected"] for p in photos_report.PIPELINES)
        assert r["verdicts"]["watermarked/platform-1x1"]["size"] == [512, 512]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| watermarked | 1.00 |" in md and "ifct/a.png" in md


def test_method_options_reach_the_server_and_the_report(tmp_path):
    """``method_options`` configure the server's method (an unknown one is refused by name, before
    any photo is sent), and a run records them in report.json and report.md."""
    from shallowmark.core.photos import heldout_photo

    _fake_source(tmp_path, {"a.png": heldout_photo()[:300, :480]})
    bad = photos_report.PhotoScenarioConfig(n=1, sources=("ifct",), cache_dir=str(tmp_path), num_steps=10,
                                            method_options={"no_such_option": 1})
    with pytest.raises(InvalidParameterError, match=r"unknown option\(s\) \[.no_such_option.\]"):
        photos_report.run(bad, tmp_path / "bad", log=lambda *_: None)
    assert not (tmp_path / "bad" / "report.json").exists()
    cfg = photos_report.PhotoScenarioConfig(n=1, sources=("ifct",), cache_dir=str(tmp_path), num_steps=10,
                                            method_options={"ring_origin": "centre"})
    res = photos_report.run(cfg, tmp_path / "out", log=lambda *_: None)
    assert res["config"]["method_options"] == {"ring_origin": "centre"}
    assert res["rows"][0]["verdicts"]["watermarked/clean"]["detected"]
    assert 'Method options: `{"ring_origin": "centre"}`' in (tmp_path / "out" / "report.md").read_text()
