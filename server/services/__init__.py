"""One module per gRPC service; SERVICES in the order they are registered."""
from yikatong.server.services.admin import Admin
from yikatong.server.services.audit import Audit
from yikatong.server.services.authorization import Authorization
from yikatong.server.services.card_status import CardStatus
from yikatong.server.services.deadlines import Deadlines
from yikatong.server.services.holders import Holders
from yikatong.server.services.ledger import Ledger
from yikatong.server.services.lifecycle import Lifecycle
from yikatong.server.services.residence_card import ResidenceCard

SERVICES = (Authorization, CardStatus, Lifecycle, ResidenceCard, Ledger, Deadlines, Holders,
            Audit, Admin)
