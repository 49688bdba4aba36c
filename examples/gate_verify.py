#!/usr/bin/env python3
"""For gate vendors: verify a signed change event or deny-list page with the public key alone.

    gate_verify.py event --public-key HEX [--public-key HEX ...] EVENT.json
    gate_verify.py page  --public-key HEX [--public-key HEX ...] PAGE.json

The JSON is the message as protobuf's JSON mapping gives it with field names as in the proto
and enums as numbers (Python: `json_format.MessageToJson(m, preserving_proto_field_name=True,
use_integers_for_enums=True)`): 64-bit integers as strings, bytes in base64, a field at its
default (0, false, "") may be absent. Give every public key you trust (during a rotation
window, the old one and the new one: `CardStatus.GetSigningKeys`, or the operator's
`yikatong signing show`); the event's `key_id` picks one. Exit 0 and "verified", or exit 1 and
"REFUSED: why".

What is signed (docs/DECISIONS.md, "A deny list gates can trust offline"): UTF-8 text, one
`name=value` line ending in "\\n" per field, integers and enums in decimal, booleans 0 or 1:

    yikatong.v1.ChangeEvent            yikatong.v1.GetDenyListResponse
    key_id=<hex>                       key_id=<hex>
    sequence=...                       sequence=...
    card_number=...                    time=...
    state=...                          after_card_number=...
    time=...                           through_card_number=...
    state_changed=0|1                  complete=0|1
    locks_changed=0|1                  entries=<count>
    functions_changed=0|1              entries_sha256=<hex>
    replacement_changed=0|1
    balance_changed=0|1                entries_sha256: SHA-256 of one line per entry,
    transit_reason=...                 "card_number,reason,until\\n", in the page's order
    transit_reason_until=...
    validity_changed=0|1
    points_changed=0|1

Needs the `cryptography` package (Ed25519). A gate applying pages checks too that they chain:
the first page's after_card_number is "", each next page's is the one before's
through_card_number, and the last says complete; then it watches from the smallest page
sequence.
"""
import argparse
import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EVENT_FIELDS = ("sequence", "card_number", "state", "time", "state_changed", "locks_changed",
                "functions_changed", "replacement_changed", "balance_changed",
                "transit_reason", "transit_reason_until", "validity_changed",
                "points_changed")
TEXT_FIELDS = {"card_number", "after_card_number", "through_card_number"}
BOOL_FIELDS = {"state_changed", "locks_changed", "functions_changed", "replacement_changed",
               "balance_changed", "validity_changed", "points_changed", "complete"}


def value(message: dict, name: str) -> str:
    v = message.get(name)
    if name in TEXT_FIELDS:
        return v or ""
    if name in BOOL_FIELDS:
        if v not in (None, True, False):
            raise ValueError(f"{name} is not a boolean")
        return "1" if v else "0"
    return str(int(v or 0))  # integers and enum numbers (64-bit ones arrive as strings)


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).digest()[:8].hex()


def event_bytes(event: dict) -> bytes:
    lines = ["yikatong.v1.ChangeEvent", f"key_id={event.get('key_id', '')}"]
    lines += [f"{n}={value(event, n)}" for n in EVENT_FIELDS]
    return ("\n".join(lines) + "\n").encode("utf-8")


def page_bytes(page: dict) -> bytes:
    entries = page.get("entries", [])
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{value(e, 'card_number')},{value(e, 'reason')},{value(e, 'until')}\n"
                 .encode("utf-8"))
    if base64.b64decode(page.get("entries_sha256", "")) != h.digest():
        raise InvalidSignature("the entries do not match entries_sha256")
    lines = ["yikatong.v1.GetDenyListResponse", f"key_id={page.get('key_id', '')}"]
    lines += [f"{n}={value(page, n)}" for n in ("sequence", "time", "after_card_number",
                                                "through_card_number", "complete")]
    lines += [f"entries={len(entries)}", f"entries_sha256={h.hexdigest()}"]
    return ("\n".join(lines) + "\n").encode("utf-8")


def verify(kind: str, message: dict, public_keys: list[bytes]) -> None:
    """Returns if `message` is signed by one of `public_keys`; raises otherwise."""
    keys = {key_id(k): k for k in public_keys}
    kid = message.get("key_id", "")
    if kid not in keys:
        raise InvalidSignature(f"signed by key {kid or '(none)'}, not one given")
    data = event_bytes(message) if kind == "event" else page_bytes(message)
    signature = base64.b64decode(message.get("signature", ""))
    Ed25519PublicKey.from_public_bytes(keys[kid]).verify(signature, data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("event", "page"))
    parser.add_argument("file")
    parser.add_argument("--public-key", action="append", required=True, metavar="HEX",
                        help="a raw Ed25519 public key in hex (64 digits); repeat for several")
    args = parser.parse_args(argv)
    try:
        keys = [bytes.fromhex(k) for k in args.public_key]
        with open(args.file, encoding="utf-8") as f:
            message = json.load(f)
        verify(args.kind, message, keys)
    except InvalidSignature as error:
        print(f"REFUSED: {error or 'the signature does not match'}")
        return 1
    except (OSError, ValueError, TypeError) as error:
        print(f"REFUSED: {error}")
        return 1
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
