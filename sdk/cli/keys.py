"""``shallowmark keys new|list``: manage a keystore (the SDK's :class:`~shallowmark.keystore.Keystore`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shallowmark.cli._common import passphrase


def register(sub) -> None:
    k = sub.add_parser("keys", help="manage a keystore (passphrase from SHALLOWMARK_PASSPHRASE or a prompt)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="add a key and make it active (creates the keystore if missing)")
    kn.add_argument("--keystore", required=True)
    kn.add_argument("--label", default="")
    kn.add_argument("--rotate", action="store_true", help="retire the previously active key")
    kl = ksub.add_parser("list", help="list keys (public metadata only)")
    kl.add_argument("--keystore", required=True)
    kl.add_argument("--json", action="store_true")
    k.set_defaults(func=_cmd_keys)


def _cmd_keys(args) -> int:
    from shallowmark.keystore import Keystore

    path = Path(args.keystore)
    if args.keys_command == "new":
        if path.exists():
            ks = Keystore.open(path, passphrase())
        else:
            ks = Keystore.create(path, passphrase(confirm=True))
            print(f"created keystore {path}", file=sys.stderr)
        key = ks.rotate(label=args.label) if args.rotate else ks.new_key(label=args.label)
        print(key.key_id)
        return 0
    ks = Keystore.open(path, passphrase())
    rows = ks.list()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    print(f"{'key_id':<38}{'active':<8}{'retired':<9}{'created':<27}label")
    for r in rows:
        print(f"{r.key_id:<38}{'yes' if r.active else '':<8}{'yes' if r.retired else '':<9}{r.created:<27}{r.label}")
    return 0
