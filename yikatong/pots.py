"""One tap, several pots (issue 28 item 2): the operator's rule per channel for paying what
the channel's own account does not cover from the holder's other accounts.

The rule is a TOML file (`yikatong serve --split-rules FILE`, read again on SIGHUP):

    version = "2026-11"
    [split]
    medical = ["MEDICAL", "TRANSIT"]

Each channel's list names the holder's accounts in the order they are charged. What the law
lets a list say is checked when the file is read, and a file that says more is refused whole
(docs/DECISIONS.md, "One tap, several pots"):

- only MEDICAL splits: GZ-13, the personal medical-insurance account "may be used for such
  social insurance applications as settlement of medical expenses", so it pays no fare and
  no drawl, and a list of another channel could only name it or the purse;
- a medical list begins with MEDICAL (the insurance pays first; the purse only tops up);
- a BENEFIT drawl is a benefit only from the BENEFIT account (SPEC.md section 5: drawl debits
  BENEFIT; SH-5/GZ-2 "benefits drawl"/"welfare collection"): money from the purse is the
  holder's own, not a benefit, so no rule splits a drawl;
- TRANSIT is paid from the purse alone (SH-13).

Without a file (or with no list for a channel) no tap splits. The rule is module state, one
per process, as the points table is (`use` before workers fork; each worker reloads its own).
"""
import dataclasses

from yikatong.config_file import ConfigFileError, read_toml
from yikatong.model import AccountKind, Channel

# the channels a rule may split, and the accounts each may name after its own
_MAY_SPLIT = {Channel.MEDICAL: (AccountKind.MEDICAL, frozenset({AccountKind.TRANSIT}))}
_WHY_NOT = {
    "benefit": "a benefit drawl is paid from the BENEFIT account only: a drawl from the purse "
               "is the holder's own money, not a benefit (SPEC.md section 5)",
    "transit": "a fare is paid from the transit purse only (SH-13); the medical account pays "
               "medical expenses only (GZ-13)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class SplitRules:
    version: str = ""
    by_channel: dict = dataclasses.field(default_factory=dict)  # Channel -> (AccountKind, ...)

    def said(self) -> str:
        """What start-up and reload say of it."""
        if not self.by_channel:
            return "off: no --split-rules file (no tap splits)"
        return f"version {self.version}: " + "; ".join(
            f"{Channel(ch).name} from " + " then ".join(AccountKind(k).name for k in kinds)
            for ch, kinds in sorted(self.by_channel.items()))


_in_force = SplitRules()


def in_force() -> SplitRules:
    return _in_force


def use(rules: SplitRules) -> None:
    global _in_force
    _in_force = rules


def load(path: str) -> SplitRules:
    """The file's rules, checked whole (ConfigFileError naming the file and the problem)."""
    name = f"split-rules file {path}"
    doc = read_toml(path, name)
    return parse(doc, name)


def parse(doc: dict, name: str) -> SplitRules:
    version, split = doc.get("version"), doc.get("split", {})
    if not isinstance(version, str) or not version or len(version) > 40:
        raise ConfigFileError(f'{name}: needs version = "..." (at most 40 characters)')
    unknown = set(doc) - {"version", "split"}
    if unknown:
        raise ConfigFileError(f"{name}: unknown keys {sorted(unknown)}; it holds version and "
                              "[split]")
    if not isinstance(split, dict):
        raise ConfigFileError(f"{name}: split must be a table, channel = [accounts]")
    out = {}
    for key, kinds in split.items():
        if key in _WHY_NOT:
            raise ConfigFileError(f"{name}: [split] {key}: no rule may split it: {_WHY_NOT[key]}")
        channel = getattr(Channel, key.upper(), None) if isinstance(key, str) else None
        if channel not in _MAY_SPLIT:
            raise ConfigFileError(f"{name}: [split] {key!r}: only medical may split")
        first, after = _MAY_SPLIT[channel]
        if (not isinstance(kinds, list) or not kinds
                or not all(isinstance(k, str) and k in AccountKind.__members__ for k in kinds)):
            raise ConfigFileError(f"{name}: [split] {key}: a list of accounts, e.g. "
                                  '["MEDICAL", "TRANSIT"]')
        kinds = tuple(AccountKind[k] for k in kinds)
        if kinds[0] != first:
            raise ConfigFileError(f"{name}: [split] {key}: begins with {first.name}: the "
                                  "channel's own account pays first")
        if len(set(kinds)) != len(kinds) or not set(kinds[1:]) <= after:
            raise ConfigFileError(
                f"{name}: [split] {key}: after {first.name} only "
                f"{', '.join(sorted(k.name for k in after))}, each once (the medical account "
                "pays medical expenses only, GZ-13; the BENEFIT account is drawn, not spent)")
        if len(kinds) > 1:
            out[channel] = kinds
    return SplitRules(version, out)
