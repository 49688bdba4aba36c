"""Issue 28: what the server signs for gates that must trust a deny list offline.

`cryptography` has Ed25519 and no SM2, so the server signs with Ed25519 (RFC 8032). The key
file (`--signing-key-file`, TOML, owner-only as the PII key file) holds the private key the
server signs with now and the public keys of the keys before it, each published until its
`until` (a rotation window):

    # yikatong signing key (Ed25519)
    private_key = "<64 hex digits: the 32-byte seed>"

    [[previous]]
    public_key = "<64 hex digits>"
    until = "2026-05-02T12:00:00+08:00"

`yikatong signing new --key-file F` makes one; `yikatong signing rotate --key-file F
--window-hours 24` puts a new private key in and the old one's public key under
[[previous]]; SIGHUP reads it again. A key's id is the hex of the first 8 bytes of SHA-256 of
its raw public key.

What is signed is a canonical byte string, never a protobuf serialization (which is not
canonical across libraries): UTF-8 text, one `name=value` line (ending "\\n") per field, in
the order below; integers and enum values in decimal, booleans 0 or 1, card numbers as they
are (digits), bytes in lowercase hex. docs/DECISIONS.md ("A deny list gates can trust offline")
and examples/gate_verify.py say the same; examples/gate_verify.js does it in Node.
"""
import hashlib
import os
import tomllib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from yikatong import clock as clocks
from yikatong.storage.pii import KeyFileError, read_key_file, write_key_file

PREVIOUS_MAX = 8  # public keys of earlier keys a file may publish at once

# the fields of a ChangeEvent, in the order of its canonical bytes (after `key_id`)
EVENT_FIELDS = ("sequence", "card_number", "state", "time", "state_changed", "locks_changed",
                "functions_changed", "replacement_changed", "balance_changed",
                "transit_reason", "transit_reason_until", "validity_changed",
                "points_changed")
PAGE_FIELDS = ("sequence", "time", "after_card_number", "through_card_number", "complete",
               "entries")
EVENT_HEADER = "yikatong.v1.ChangeEvent"
PAGE_HEADER = "yikatong.v1.GetDenyListResponse"


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).digest()[:8].hex()


def _line(name: str, value) -> str:
    if isinstance(value, bool):
        value = int(value)
    return f"{name}={value}\n"


def event_bytes(key: str, event) -> bytes:
    """The canonical bytes of a ChangeEvent signed under key id `key`."""
    return (f"{EVENT_HEADER}\nkey_id={key}\n"
            + "".join(_line(n, getattr(event, n)) for n in EVENT_FIELDS)).encode("utf-8")


def entries_sha256(entries) -> bytes:
    """SHA-256 of a deny-list page's entries: one line each, `card_number,reason,until\\n`."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.card_number},{e.reason},{e.until}\n".encode("utf-8"))
    return h.digest()


def page_bytes(key: str, page) -> bytes:
    """The canonical bytes of a deny-list page (its entries through `entries_sha256`)."""
    return (f"{PAGE_HEADER}\nkey_id={key}\n"
            + "".join(_line(n, getattr(page, n) if n != "entries" else len(page.entries))
                      for n in PAGE_FIELDS)
            + f"entries_sha256={bytes(page.entries_sha256).hex()}\n").encode("utf-8")


class Signing:
    """The key the server signs with now and the earlier public keys it still publishes."""

    def __init__(self, private: Ed25519PrivateKey, previous: list[tuple[bytes, int]],
                 source: str = ""):
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public)
        self.previous = previous  # [(raw public key, until unix seconds)]
        self.source = source

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def sign_event(self, event) -> None:
        event.key_id = self.key_id
        event.signature = self._private.sign(event_bytes(self.key_id, event))

    def sign_page(self, page) -> None:
        page.entries_sha256 = entries_sha256(page.entries)
        page.key_id = self.key_id
        page.signature = self._private.sign(page_bytes(self.key_id, page))

    def published(self, now: int) -> list[tuple[str, bytes, int]]:
        """(key id, raw public key, until: 0 for the current) of each key published at `now`:
        the current one first, then each earlier one whose window has not ended."""
        return [(self.key_id, self.public, 0)] + [
            (key_id(pub), pub, until) for pub, until in self.previous if until > now]

    def describe(self) -> str:
        return f"key {self.key_id}" + (
            f", {len(self.previous)} earlier key{'s' if len(self.previous) != 1 else ''} "
            "published for a window" if self.previous else "")

    @classmethod
    def parse(cls, text: str, source: str) -> "Signing":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise KeyFileError(f"{source} is not TOML: {error}") from None
        unknown = sorted(set(doc) - {"private_key", "previous"})
        if unknown:
            raise KeyFileError(f"{source}: unknown key {unknown[0]!r} (private_key and "
                               "[[previous]] only)")
        private = Ed25519PrivateKey.from_private_bytes(
            _hex32(doc.get("private_key"), "private_key", source))
        previous = doc.get("previous", [])
        if not isinstance(previous, list) or len(previous) > PREVIOUS_MAX:
            raise KeyFileError(f"{source}: [[previous]] must be at most {PREVIOUS_MAX} tables")
        earlier = []
        for i, entry in enumerate(previous):
            where = f"previous[{i}]"
            if not isinstance(entry, dict) or set(entry) != {"public_key", "until"}:
                raise KeyFileError(f"{source}: {where} must have public_key and until, only")
            pub = _hex32(entry["public_key"], f"{where}.public_key", source)
            try:
                Ed25519PublicKey.from_public_bytes(pub)
                until = clocks.parse_time(str(entry["until"]))
            except ValueError as error:
                raise KeyFileError(f"{source}: {where}: {error}") from None
            earlier.append((pub, until))
        return cls(private, earlier, source)

    @classmethod
    def load(cls, path: str, data_dir: str = "") -> "Signing":
        """The key file at `path` (storage.pii.read_key_file: owner-only, a regular file
        outside `data_dir`). KeyFileError in one line otherwise."""
        where = f"--signing-key-file {path}"
        return cls.parse(read_key_file(path, where, data_dir), where)


def _hex32(value, name: str, source: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{source}: {name} must be 64 hex digits (32 bytes)")
    return raw


def key_file_text(private: Ed25519PrivateKey, previous: list[tuple[bytes, int]]) -> str:
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    lines = ["# yikatong signing key (Ed25519): owner-only, outside the data dir",
             f'private_key = "{seed.hex()}"']
    for pub, until in previous:
        lines += ["", "[[previous]]", f'public_key = "{pub.hex()}"',
                  f'until = "{clocks.format_time(until)}"']
    return "\n".join(lines) + "\n"


def replace(path: str, text: str) -> None:
    """`text` in place of the file at `path`, atomically (a new owner-only file renamed over
    it), so a SIGHUP during the write reads the old file or the new, never half of one."""
    tmp = f"{path}.new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    write_key_file(tmp, text)
    os.replace(tmp, path)
