"""Who is calling: the clients file (API.md, TOML). What each role may call is the role table
(server/roles.py)."""
import dataclasses
import hashlib
import re
import tomllib

from yikatong import config
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
    def __init__(self):
        self._by_token_sha256: dict[str, Client] = {}

    def add(self, client_id: str, role: str, token_sha256: str) -> None:
        if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
            raise ValueError(f"client id {client_id!r}: 1 to 64 of A-Z a-z 0-9 . _ : -")
        if role not in ROLES:
            raise ValueError(f"client {client_id}: unknown role {role!r}")
        if len(token_sha256) != 64 or not all(c in "0123456789abcdef" for c in token_sha256):
            raise ValueError(f"client {client_id}: token_sha256 must be 64 lowercase hex digits")
        if token_sha256 in self._by_token_sha256:
            raise ValueError(f"client {client_id}: token_sha256 is already the token of client "
                             f"{self._by_token_sha256[token_sha256].id}")
        if len(self._by_token_sha256) >= config.clients_max:
            raise ValueError(f"more than {config.clients_max} clients")
        self._by_token_sha256[token_sha256] = Client(client_id, Role[role])

    def load(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"clients file {path}: {error}") from error
        for entry in doc.get("client", []):
            if "token_sha256" in entry:
                self.add(entry.get("id", "?"), entry.get("role", ""), entry["token_sha256"])
            elif "cert_cn" not in entry:
                raise ValueError(f"clients file {path}: client {entry.get('id')} has no identity")

    def identify(self, metadata) -> Client:
        for key, value in metadata:
            if key == "authorization":
                if value.startswith("Bearer "):
                    digest = hashlib.sha256(value[7:].encode()).hexdigest()
                    client = self._by_token_sha256.get(digest)
                    if client is not None:
                        return client
                raise Unauthenticated("unknown bearer token")
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
