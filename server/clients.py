"""Who is calling: the clients file (API.md, TOML). What each role may call is the role table
(server/roles.py)."""
import dataclasses
import hashlib
import re
from collections.abc import Callable

from yikatong import config, config_file
from yikatong.errors import Unauthenticated
from yikatong.model import Role

ROLES = tuple(r.name for r in Role)
# Client ids appear in every access-log line: plain ASCII only, so a line never needs escaping.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclasses.dataclass(frozen=True, slots=True)
class Client:
    id: str
    role: Role


class Clients:
    """Who may call: by the SHA-256 of a bearer token, and by the common name of a client
    certificate (mTLS: the TLS layer has already checked it was signed by --tls-ca). A token
    or a CN names one client only; an entry names at least one of them."""

    def __init__(self):
        self._by_token_sha256: dict[str, Client] = {}
        self._by_cert_cn: dict[str, Client] = {}
        self._ids: set[str] = set()
        # ends the open calls of the clients a reload revoked, by object (id -> client);
        # how many (server/calls.py Limits.revoke, set by the server)
        self.on_revoke: Callable[[dict[int, Client]], int] | None = None

    def add(self, client_id: str, role: str, token_sha256: str | None = None,
            cert_cn: str | None = None) -> None:
        if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
            raise ValueError(f"client id {client_id!r}: 1 to 64 of A-Z a-z 0-9 . _ : -")
        if role not in ROLES:
            raise ValueError(f"client {client_id}: unknown role {role!r}")
        if token_sha256 is None and cert_cn is None:
            raise ValueError(f"client {client_id} has no identity: give token_sha256 or cert_cn")
        if client_id in self._ids:  # one id, one credential: the log, audit and limits say who
            raise ValueError(f"client id {client_id} is named by two entries; each client "
                             "needs an id of its own")
        if len(self._by_token_sha256) + len(self._by_cert_cn) >= config.clients_max:
            raise ValueError(f"more than {config.clients_max} clients")
        client = Client(client_id, Role[role])
        if token_sha256 is not None:
            if (not isinstance(token_sha256, str) or len(token_sha256) != 64
                    or not all(c in "0123456789abcdef" for c in token_sha256)):
                raise ValueError(f"client {client_id}: token_sha256 must be 64 lowercase hex "
                                 "digits")
            if token_sha256 in self._by_token_sha256:
                raise ValueError(f"client {client_id}: token_sha256 is already the token of "
                                 f"client {self._by_token_sha256[token_sha256].id}")
        if cert_cn is not None:
            if not isinstance(cert_cn, str) or not 0 < len(cert_cn) <= 64:
                raise ValueError(f"client {client_id}: cert_cn must be 1 to 64 characters")
            if cert_cn in self._by_cert_cn:
                raise ValueError(f"client {client_id}: cert_cn {cert_cn!r} is already the "
                                 f"certificate of client {self._by_cert_cn[cert_cn].id}")
        if token_sha256 is not None:
            self._by_token_sha256[token_sha256] = client
        if cert_cn is not None:
            self._by_cert_cn[cert_cn] = client
        self._ids.add(client_id)

    def count(self) -> int:
        """Identities known: tokens and certificate names."""
        return len(self._by_token_sha256) + len(self._by_cert_cn)

    def all(self) -> list[Client]:
        """Every client, once each (one may have both a token and a certificate)."""
        return list({c.id: c for c in (*self._by_token_sha256.values(),
                                       *self._by_cert_cn.values())}.values())

    def load(self, path: str) -> None:
        doc = config_file.read_toml(path, f"clients file {path}")
        entries = doc.get("client", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"clients file {path}: each client is a [[client]] table")
        try:
            for entry in entries:
                self.add(entry.get("id", "?"), entry.get("role", ""), entry.get("token_sha256"),
                         entry.get("cert_cn"))
        except ValueError as error:
            raise ValueError(f"clients file {path}: {error}") from None

    def take(self, other: "Clients") -> str:
        """SIGHUP (server/reload.py): `other`'s clients from now on, all at once. A client
        whose every credential stays, with its id and role, stays the same object; one whose
        token or certificate name is gone or changed hands is revoked: the calls admitted as
        it and still open are ended (`on_revoke`: a leaked token's open stream must not
        outlive its rotation)."""
        revoked: dict[int, Client] = {}
        pairs = ((self._by_token_sha256, other._by_token_sha256),
                 (self._by_cert_cn, other._by_cert_cn))
        for old, new in pairs:
            for key, client in old.items():
                if new.get(key) != client:  # gone, or another client's now
                    revoked[id(client)] = client
        for old, new in pairs:  # after every revocation is known (a token's can be a CN's)
            for key, client in new.items():  # the same object: a later reload that revokes
                kept = old.get(key)  # it finds the calls admitted before this one too
                if kept == client and id(kept) not in revoked:
                    new[key] = kept
        self._by_token_sha256, self._by_cert_cn = other._by_token_sha256, other._by_cert_cn
        self._ids = other._ids
        ended = self.on_revoke(revoked) if revoked and self.on_revoke is not None else 0
        return f"{other.count()} identities" + (
            f"; {ended} open calls of {len(revoked)} revoked clients ended" if ended else "")

    def identify(self, metadata, context=None) -> Client:
        """The bearer token's client; without a token, the client certificate's (mTLS)."""
        for key, value in metadata:
            if key == "authorization":
                # RFC 7235 section 2.1: the scheme is case-insensitive, then one or more
                # spaces; the token (RFC 6750) is compared exactly
                scheme, _, token = value.partition(" ")
                token = token.lstrip(" ")
                if scheme.lower() == "bearer" and token:
                    digest = hashlib.sha256(token.encode()).hexdigest()
                    client = self._by_token_sha256.get(digest)
                    if client is not None:
                        return client
                raise Unauthenticated("unknown bearer token")
        if context is not None and self._by_cert_cn:
            names = context.auth_context().get("x509_common_name")
            if names:
                client = self._by_cert_cn.get(names[0].decode("utf-8", "replace"))
                if client is not None:
                    return client
                raise Unauthenticated("the client certificate's common name is not a known "
                                      "client")
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")


def reread(path: str, add_more=None) -> Clients:
    """SIGHUP: the clients file read again and checked whole (`add_more(clients)`: the demo
    clients, under --demo). A file that names no client at all is refused (a file caught
    half-written would refuse every caller)."""
    clients = Clients()
    clients.load(path)
    if not clients.count():
        raise ValueError(f"clients file {path}: no [[client]] in it; every caller would be "
                         "refused")
    if add_more is not None:
        add_more(clients)
    return clients
