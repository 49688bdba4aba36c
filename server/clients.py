"""Who is calling: the clients file (API.md, TOML) and the role table (default deny)."""
import dataclasses
import hashlib
import tomllib

from yikatong import config
from yikatong.errors import PermissionDenied, Unauthenticated
from yikatong.v1 import yikatong_pb2 as pb

ROLES = (
    "TRANSIT_GATE", "MEDICAL_TERMINAL", "BENEFIT_COUNTER", "BANK_SWITCH", "COMMUNITY_OUTLET",
    "BANK_OUTLET", "ONLINE_PLATFORM", "SERVICE_HOTLINE", "CARD_AGENCY", "PUBLIC_SECURITY",
    "HRSS", "AUDITOR", "ADMIN",
)
TERMINALS = {"TRANSIT_GATE", "MEDICAL_TERMINAL", "BENEFIT_COUNTER"}
OUTLETS = {"COMMUNITY_OUTLET", "BANK_OUTLET"}
_APPLY = frozenset({"COMMUNITY_OUTLET", "BANK_OUTLET", "ONLINE_PLATFORM"})
_BANK = frozenset({"BANK_OUTLET", "BANK_SWITCH"})

# API.md "Who may call what". Authorize is decided per channel (below).
METHOD_ROLES = {
    "GetStatus": frozenset(TERMINALS | OUTLETS | {"BANK_SWITCH", "CARD_AGENCY"}),
    "Apply": _APPLY, "Replace": _APPLY, "CancelLoss": _APPLY,
    "Verify": frozenset({"CARD_AGENCY"}), "Issue": frozenset({"CARD_AGENCY"}),
    "Cancel": frozenset({"CARD_AGENCY", "HRSS", "PUBLIC_SECURITY"}),
    "Activate": frozenset(_APPLY | {"SERVICE_HOTLINE"}),
    "ReportTemporaryLoss": frozenset({"SERVICE_HOTLINE"}),
    "ReportLoss": frozenset(_APPLY | {"SERVICE_HOTLINE"}),  # hotline: GZ/BJ only (domain)
    "OpenFinancial": _BANK, "ReportBankLoss": _BANK, "CancelBankLoss": _BANK,
    "LockApplication": _BANK, "UnlockApplication": _BANK,
    "GetCard": frozenset(_APPLY | {"SERVICE_HOTLINE", "CARD_AGENCY"}),
    "AdvanceClock": frozenset({"ADMIN"}), "SetClock": frozenset({"ADMIN"}),
    "Transfer": frozenset({"CARD_AGENCY", "HRSS", "BANK_SWITCH"}),
    "Reverse": frozenset({"CARD_AGENCY", "HRSS", "BANK_SWITCH"}),
    "GetBalances": frozenset(TERMINALS | OUTLETS | {"ONLINE_PLATFORM"}),
}
METHOD_ROLES["GetStatusBatch"] = METHOD_ROLES["GetStatus"]
CHANNEL_ROLES = {
    1: frozenset({"TRANSIT_GATE"}),
    2: frozenset({"MEDICAL_TERMINAL"}),
    3: frozenset({"BENEFIT_COUNTER"}),
    4: frozenset({"BANK_SWITCH"}),
    5: frozenset({"COMMUNITY_OUTLET", "HRSS", "PUBLIC_SECURITY"}),
    6: METHOD_ROLES["GetStatus"],
}


@dataclasses.dataclass(frozen=True)
class Client:
    id: str
    role: str

    def require(self, method: str) -> None:
        if self.role not in METHOD_ROLES[method]:
            raise PermissionDenied(f"role {self.role} may not call {method}")

    def require_channel(self, channel: int) -> None:
        if self.role not in CHANNEL_ROLES.get(channel, ()):
            raise PermissionDenied(f"role {self.role} may not authorize "
                                   f"{pb.Channel.Name(channel)}")  # validated: a known value


class Clients:
    def __init__(self):
        self._by_token_sha256: dict[str, Client] = {}

    def add(self, client_id: str, role: str, token_sha256: str) -> None:
        if role not in ROLES:
            raise ValueError(f"client {client_id}: unknown role {role!r}")
        if len(token_sha256) != 64 or not all(c in "0123456789abcdef" for c in token_sha256):
            raise ValueError(f"client {client_id}: token_sha256 must be 64 lowercase hex digits")
        self._by_token_sha256[token_sha256] = Client(client_id, role)
        if len(self._by_token_sha256) > config.clients_max:
            raise ValueError(f"more than {config.clients_max} clients")

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
