"""Personal information at rest (issue 25; PIPL art. 51: encryption and de-identification).

A holder's personal information is stored sealed: SM4 (GB/T 32907) in GCM mode, a fresh
96-bit nonce per write, and the record's database and key as associated data, so a sealed
value moved to another record (or another database) fails its tag instead of being read as
that record's. A sealed value names the key it was sealed with:

    off size
      0    1 version (= SEALED_VERSION)
      1    1 n, the key id's length
      2    n key id (ASCII)
    2+n   12 nonce
    14+n   . ciphertext, then the 16-byte GCM tag

Look-ups by identity number go through a keyed hash, HMAC-SM3 (GB/T 32905) under a separate
index key: the `holders` database is keyed by it, never by the number itself.

The keys come from a key file outside the data dir (`--pii-key-file`, TOML, owner-only):

    current = "2026-12"         # the key new writes are sealed with
    index = "ix-1"              # the index key (never rotated in place: every key would move)
    [keys]                      # key id -> 128-bit SM4 key, 32 hex digits
    "2026-12" = "00112233445566778899aabbccddeeff"
    [index_keys]
    ix-1 = "ffeeddccbbaa99887766554433221100"

Rotation: add a key, make it `current`, keep the old one until every record is sealed under
the new one (the server re-seals in the background, a few records per writer group; `yikatong
pii rotate` does it on a stopped server), then remove the old one. A key removed while records
are still sealed with it leaves them unreadable: that is how a holder's data is erased
(PIPL art. 47) without touching the card.
"""
import hashlib
import hmac
import os
import re
import secrets
import stat
import tomllib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from yikatong.errors import CorruptRecord, Refused

SEALED_VERSION = 1
NONCE_BYTES, TAG_BYTES, KEY_BYTES = 12, 16, 16
INDEX_BYTES = 32  # HMAC-SM3's digest: the key of a holder record
KEY_FILE_BYTES_MAX = 64 * 1024  # a key file is a few lines; never read more than this
KEYS_MAX = 64  # keys in one file
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
_INDEX_CHECK = b"yikatong pii index key check"
META_INDEX = b"pii:index"  # meta: the index key's id, NUL, HMAC of _INDEX_CHECK under it

try:
    hashlib.new("sm3")
except ValueError:  # pragma: no cover - an OpenSSL without SM3: refuse rather than fall back
    raise ImportError("this OpenSSL has no SM3: the PII index (HMAC-SM3) cannot be computed"
                      ) from None


class KeyFileError(ValueError):
    """A key file that cannot be used: one line, said at start (exit 2)."""


class PiiKeyMissing(Refused):
    """A PII read or write on a store whose key file is not loaded: names the key id it
    needs (never the key)."""

    def __init__(self, key_id: str, what: str = "this holder's personal information"):
        super().__init__("PII_KEY_MISSING", f"{what} is sealed with key {key_id!r}, and no PII "
                         "key file is loaded (the server runs without --pii-key-file); "
                         "authorizations are served, personal information is not")
        self.key_id = key_id


class PiiErased(Refused):
    """A record sealed with a key the loaded key file no longer holds: erased."""

    def __init__(self, key_id: str, what: str = "this holder's personal information"):
        super().__init__("PII_ERASED", f"{what} was sealed with key {key_id!r}, which the PII "
                         "key file no longer holds: it is erased (unreadable); the card still "
                         "works")
        self.key_id = key_id


def _hex_key(text, where: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise KeyFileError(f"{where} must be 32 hex digits (a 128-bit key)")
    return bytes.fromhex(text)


def _key_table(table, name: str, source: str) -> dict[str, bytes]:
    if not isinstance(table, dict) or not table:
        raise KeyFileError(f"{source}: [{name}] must be a table of key id = \"32 hex digits\"")
    if len(table) > KEYS_MAX:
        raise KeyFileError(f"{source}: [{name}] has {len(table)} keys, at most {KEYS_MAX}")
    out = {}
    for key_id, value in table.items():
        if not KEY_ID.fullmatch(key_id):
            raise KeyFileError(f"{source}: key id {key_id[:40]!r} in [{name}] must be 1 to 32 "
                               "letters, digits, '.', '_' or '-'")
        out[key_id] = _hex_key(value, f"{source}: [{name}] {key_id}")
    return out


class KeyRing:
    """The loaded PII keys: the sealing keys by id, the current one, and the index key."""

    def __init__(self, keys: dict[str, bytes], current: str, index_id: str, index_key: bytes,
                 source: str = ""):
        assert current in keys and all(len(k) == KEY_BYTES for k in keys.values())
        self.keys = dict(keys)
        self.current = current
        self.index_id = index_id
        self._index_key = index_key
        self.source = source

    # ---- loading
    @classmethod
    def parse(cls, text: str, source: str = "the PII key file") -> "KeyRing":
        try:
            doc = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as error:
            raise KeyFileError(f"{source} is not TOML: {str(error)[:120]}") from None
        unknown = set(doc) - {"current", "index", "keys", "index_keys"}
        if unknown:
            raise KeyFileError(f"{source}: unknown entries {', '.join(sorted(unknown))[:120]} "
                               "(current, index, [keys], [index_keys])")
        keys = _key_table(doc.get("keys"), "keys", source)
        index_keys = _key_table(doc.get("index_keys"), "index_keys", source)
        current, index = doc.get("current"), doc.get("index")
        if not isinstance(current, str) or current not in keys:
            raise KeyFileError(f"{source}: current must name a key of [keys]")
        if not isinstance(index, str) or index not in index_keys:
            raise KeyFileError(f"{source}: index must name a key of [index_keys]")
        return cls(keys, current, index, index_keys[index], source)

    @classmethod
    def load(cls, path: str, data_dir: str = "") -> "KeyRing":
        """The key file at `path` (`read_key_file`). KeyFileError, in one line, otherwise."""
        where = f"--pii-key-file {path}"
        return cls.parse(read_key_file(path, where, data_dir), where)

    # ---- sealing
    def seal(self, aad: bytes, plaintext: bytes, deterministic: bool = False) -> bytes:
        """`deterministic`: the nonce derived from the record and its text (HMAC-SM3 under
        the key, a synthetic IV) instead of drawn: for a migration, which must give every
        copy of a store the same bytes; the same nonce comes back only with the same record
        and text, so it only ever says that a value did not change."""
        key_id = self.current.encode("ascii")
        key = self.keys[self.current]
        nonce = (hmac.new(key, b"yikatong synthetic nonce\0" + aad + b"\0" + plaintext,
                          "sm3").digest()[:NONCE_BYTES] if deterministic
                 else secrets.token_bytes(NONCE_BYTES))
        enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        body = enc.update(plaintext) + enc.finalize()
        return bytes((SEALED_VERSION, len(key_id))) + key_id + nonce + body + enc.tag

    def open(self, aad: bytes, sealed: bytes, what: str = "this holder's personal "
             "information") -> bytes:
        key_id, nonce, body, tag = split(sealed)
        key = self.keys.get(key_id)
        if key is None:
            raise PiiErased(key_id, what)
        dec = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(aad)
        try:
            return dec.update(body) + dec.finalize()
        except InvalidTag:
            raise CorruptRecord(f"a sealed record under key {key_id!r} fails its tag: altered, "
                                "moved from another record, or the key is not the one it was "
                                "sealed with") from None

    # ---- the index
    def index(self, ssn: str) -> bytes:
        """The key of a holder record: HMAC-SM3 of the identity number under the index key."""
        return hmac.new(self._index_key, b"ssn:" + ssn.encode("ascii"), "sm3").digest()

    def index_check(self) -> bytes:
        return hmac.new(self._index_key, _INDEX_CHECK, "sm3").digest()


def split(sealed: bytes) -> tuple[str, bytes, bytes, bytes]:
    """(key id, nonce, ciphertext, tag) of a sealed value; CorruptRecord if it is not one."""
    sealed = bytes(sealed)
    if len(sealed) < 2 or sealed[0] != SEALED_VERSION:
        raise CorruptRecord(f"a sealed record of {len(sealed)} bytes / version "
                            f"{sealed[0:1]!r}")
    n = sealed[1]
    at = 2 + n
    if len(sealed) < at + NONCE_BYTES + TAG_BYTES:
        raise CorruptRecord(f"a sealed record of {len(sealed)} bytes is cut")
    try:
        key_id = sealed[2:at].decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecord("a sealed record's key id is not ASCII") from None
    return (key_id, sealed[at:at + NONCE_BYTES], sealed[at + NONCE_BYTES:-TAG_BYTES],
            sealed[-TAG_BYTES:])


def key_id_of(sealed: bytes) -> str:
    return split(sealed)[0]


def read_key_file(path: str, where: str, data_dir: str = "") -> str:
    """A key file's text (the PII key ring's, the signing key's): a regular file, owner-only
    (0600 or 0400), owned by the user the server runs as, outside `data_dir` (a copy of the
    data dir must not carry its key), at most KEY_FILE_BYTES_MAX bytes of UTF-8.
    KeyFileError, in one line naming `where`, otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise KeyFileError(f"cannot read {where}: {error.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{where} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"{where} is mode {stat.S_IMODE(st.st_mode):04o}: it must be "
                               "readable by its owner only (chmod 600 or 400)")
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"{where} is not owned by the user the server runs as")
        if data_dir and _inside(path, data_dir):
            raise KeyFileError(f"{where} is inside the data dir {data_dir}: keep it apart (a "
                               "copy or backup of the data dir must not carry its key)")
        data = os.read(fd, KEY_FILE_BYTES_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > KEY_FILE_BYTES_MAX:
        raise KeyFileError(f"{where} is over {KEY_FILE_BYTES_MAX} bytes: not a key file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{where} is not UTF-8 text") from None


def _inside(path: str, directory: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root


def new_key_file_text(comment: str = "", key_id: str = "k1", index_id: str = "ix1") -> str:
    """A fresh key file: one sealing key and one index key, from the OS's CSPRNG."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f'current = "{key_id}"', f'index = "{index_id}"', "", "[keys]",
              f'"{key_id}" = "{secrets.token_hex(KEY_BYTES)}"', "", "[index_keys]",
              f'"{index_id}" = "{secrets.token_hex(KEY_BYTES)}"', ""]
    return "\n".join(lines)


def write_key_file(path: str, text: str) -> None:
    """`text` to a new owner-only file at `path` (refused if it exists: a key is never
    overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


# Tests and tools that open a Store in their own process, without a key file (tests/conftest.py
# sets it): the key ring a Store gets when its caller names none. The server never uses it:
# `yikatong serve` always says which ring (None: no --pii-key-file).
in_process: KeyRing | None = None


def reseal_all(book) -> tuple[int, int]:
    """Every value sealed with an older key sealed with the current one, in this transaction
    (`yikatong pii rotate`, a stopped server's store): (resealed, erased)."""
    position: tuple[int, bytes | None] | None = (0, None)
    done = erased = 0
    while position is not None:
        position, n, gone = book.reseal(position, ROTATION_VISIT_MAX, ROTATION_RESEAL_MAX,
                                        deterministic=True)  # every node of a cluster alike
        done, erased = done + n, erased + gone
    return done, erased


ROTATION_VISIT_MAX = 20_000  # values looked at in one writer group (about 30 ms at most)
ROTATION_RESEAL_MAX = 500  # values sealed again in one (about 25 ms of SM4-GCM)


class Rotation:
    """The server's background rotation, when the key file holds more than one key: a step in
    each periodic writer group (about once a second) looks at up to ROTATION_VISIT_MAX sealed
    values and seals up to ROTATION_RESEAL_MAX of an older key with the current one, until a
    whole pass finds none (nothing is counted at start: a city's store is walked only in these
    steps); progress is logged and given to `progress(resealed, running)` (metrics)."""

    def __init__(self, ring: KeyRing, log, progress=lambda resealed, running: None):
        self.ring = ring
        self.log = log
        self.progress = progress
        older = sorted(k for k in ring.keys if k != ring.current)
        self.position: tuple[int, bytes | None] | None = (0, None) if older else None
        self.found = 0  # values sealed again in this pass
        self.done = 0
        self.erased = 0
        progress(0, self.running)
        if older:
            log.warning("PII rotation: values sealed with keys %s are sealed again with the "
                        "current key %r in the background", ", ".join(older), ring.current)

    @property
    def running(self) -> bool:
        return self.position is not None

    def step(self, book) -> None:
        if self.position is None:
            return
        try:
            position, n, erased = book.reseal(self.position, ROTATION_VISIT_MAX,
                                              ROTATION_RESEAL_MAX)
        except Exception as error:  # noqa: BLE001 - never fails the periodic job it rides on
            self.position = None
            self.log.error("PII rotation stopped: %s; `yikatong pii status` on the stopped "
                           "server's data dir says what is left", error)
            self.progress(self.done, False)
            return
        self.done += n
        self.found += n
        self.erased += erased
        if position is not None:
            self.position = position
        elif self.found:  # the end of a pass that sealed some: one more, to be sure
            self.position, self.found, self.erased = (0, None), 0, 0
        else:
            self.position = None
            self.log.warning("PII rotation done: %d values sealed again; every readable value "
                             "is sealed with %r, and any other key may be removed from the key "
                             "file%s", self.done, self.ring.current,
                             f" ({self.erased} values are sealed with keys no longer in it: "
                             "erased)" if self.erased else "")
        if n:
            self.log.info("PII rotation: %d values sealed again so far", self.done)
        self.progress(self.done, self.running)
