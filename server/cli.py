"""`yikatong serve` (the server) and a tiny client: `yikatong authorize`, `yikatong status`."""
import argparse
import json
import os
import re
import sys
import uuid

from yikatong import config

DEFAULT_LISTEN = "127.0.0.1:50051"
# Full ledger scan after every write group (tests set it; too slow for production, where the
# running totals in yikatong/ledger.py are asserted after every movement instead).
CHECK_INVARIANTS = bool(os.environ.get("YIKATONG_CHECK_INVARIANTS"))
CHANNELS = ("transit", "medical", "benefit", "financial", "service", "status")


def main(argv=None) -> int:
    from yikatong import __version__

    parser = argparse.ArgumentParser(prog="yikatong", description=__doc__)
    parser.add_argument("--version", action="version", version=f"yikatong {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--data-dir", default=".data/yikatong",
                   help="LMDB data dir (created if missing)")
    s.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port and data dir (0: one per core)")
    s.add_argument("--calendar-dir", metavar="DIR", default="",
                   help="the State Council's yearly holiday notices as YEAR.toml files, over the "
                        "shipped ones (read at start and on SIGHUP)")
    s.add_argument("--drain-seconds", type=float, default=config.drain_seconds,
                   help="after SIGTERM, health says NOT_SERVING while calls are still answered "
                        "for this long, then the port closes")
    s.add_argument("--clients", help="clients file (TOML)")
    s.add_argument("--tls-cert", metavar="PEM", help="mTLS: the server's certificate chain")
    s.add_argument("--tls-key", metavar="PEM", help="mTLS: the server's private key")
    s.add_argument("--tls-ca", metavar="PEM",
                   help="mTLS: the CA that signs client certificates; every caller must present "
                        "one (its CN is `cert_cn` in the clients file)")
    s.add_argument("--reflection", action="store_true",
                   help="serve gRPC server reflection (grpcurl list/describe without .proto)")
    s.add_argument("--clock", choices=("system", "manual"), default="system")
    s.add_argument("--clock-start", help="ISO-8601 start of the manual clock (default: now)")
    s.add_argument("--demo", action="store_true", help="load the demo data set and demo clients")
    s.add_argument("--pii-key-file", metavar="FILE",
                   help="the keys that seal holders' personal information (TOML, owner-only, "
                        "outside the data dir; docs/OPERATIONS.md). Without it authorizations "
                        "are served and PII reads and writes refused (FAILED_PRECONDITION); "
                        "with --demo, a demo key file beside the data dir is made and used")
    s.add_argument("--signing-key-file", metavar="FILE",
                   help="issue 28: the Ed25519 key that signs WatchChanges events (when the "
                        "watcher asks) and GetDenyList pages, and the earlier public keys "
                        "still published (TOML, owner-only, outside the data dir; `yikatong "
                        "signing new`; read again on SIGHUP). Without it nothing is signed")
    s.add_argument("--map-size-mib", type=int, default=config.lmdb_map_size // 2**20,
                   help="LMDB map size at start (grows on disk as used)")
    s.add_argument("--map-size-max-mib", "--map-size-max", type=int,
                   default=config.lmdb_map_size_max // 2**20,
                   help="the writer doubles the map when it is 80%% full, up to this")
    s.add_argument("--map-high-water", type=float, default=config.lmdb_map_high_water,
                   help="health NOT_SERVING when this fraction of --map-size-max-mib is used")
    s.add_argument("--retain-days", type=float, metavar="N",
                   help="change and audit events, final transfers and remembered answers "
                        "older than N days (the server's clock) move from LMDB to the archive "
                        f"(DATA_DIR/archive, `yikatong archive verify`); 0: keep everything "
                        f"in LMDB (default: {config.retain_days}; 0 with --replicate, where "
                        "the writer's own N is used: give every node the same N, once every "
                        "node runs this release)")
    s.add_argument("--journey-grace-seconds", type=int, default=config.journey_grace_seconds,
                   help="issue 28: a transit journey settled at its max fare when its tap-in "
                        "hold timed out is corrected to the real fare by a tap-out within this "
                        f"many seconds of its timeout (default {config.journey_grace_seconds}; "
                        f"0 to {config.journey_grace_seconds_max}; 0: never)")
    s.add_argument("--max-concurrent-rpcs", type=int, default=config.concurrent_rpcs_max,
                   help="calls in progress at once; more are refused RESOURCE_EXHAUSTED")
    s.add_argument("--client-calls-max", type=int, default=config.client_calls_max,
                   help="calls one client may have in progress per worker; more are refused "
                        "RESOURCE_EXHAUSTED")
    s.add_argument("--request-arrival-seconds", type=float,
                   default=config.request_arrival_seconds_max,
                   help="a unary call whose request message has not arrived this long after "
                        "its headers ends DEADLINE_EXCEEDED")
    s.add_argument("--stream-stall-seconds", type=float,
                   default=config.stream_stall_seconds_max,
                   help="a stream's caller that takes no message this long is ended "
                        "RESOURCE_EXHAUSTED (WatchChanges names where to resume)")
    s.add_argument("--stream-end-grace-seconds", type=float,
                   default=config.stream_end_grace_seconds_max,
                   help="a stream so ended that has not taken its status this long after is "
                        "cancelled (RST_STREAM), giving back its slot")
    s.add_argument("--history-replays-max", type=int, default=config.history_replays_max,
                   help="WatchChanges replaying history (from far behind the head) one client "
                        "may have at once per worker; more are refused RESOURCE_EXHAUSTED")
    s.add_argument("--history-events-per-second", type=float,
                   default=config.history_events_per_second_max,
                   help="history events a second one client's replays share per worker")
    s.add_argument("--issuing-banks", metavar="FILE",
                   help="GZ-9c: TOML with `version` and `banks`, the issuing banks a GZ or BJ "
                        "card may name; without it the check is off. SH-20: each service "
                        "bank's loss rules, [bank_loss.\"NAME\"] with loss_valid_days and "
                        "cancelled_by (README)")
    s.add_argument("--replicate", metavar="NATS_URLS",
                   help="issue 18: a node of a replicated store on the NATS JetStream cluster "
                        "at these comma-separated nats:// URLs (docs/SCALE.md); needs "
                        "--node-id and no --demo; with --workers N, a log keeper process "
                        "holds the node's place in the cluster for its workers")
    s.add_argument("--node-id", help="with --replicate: this node's name in the cluster")
    s.add_argument("--log-in-flight-max", type=int, default=config.log_in_flight_max,
                   metavar="N",
                   help="with --replicate: the writer's commit groups whose log records may "
                        "await the log's acknowledgement at once while it gathers the next "
                        "(1: one at a time; default: %(default)s)")
    s.add_argument("--snapshot-every", metavar="RECORDS,HOURS", default="1000000,24h",
                   help="with --replicate: a snapshot of the store into the JetStream object "
                        "store once this many log records or hours passed since the last "
                        "(either may be left out; 'off': none), taken by a follower when one "
                        "is up (default: %(default)s)")
    s.add_argument("--snapshots-keep", type=int, default=2, metavar="N",
                   help="with --replicate: snapshots kept; the log is purged below the oldest "
                        "(default: %(default)s)")
    s.add_argument("--log-purge-margin", type=int, default=config.log_purge_margin_records,
                   metavar="RECORDS",
                   help="with --replicate: log records kept below the oldest kept snapshot and "
                        "the slowest node up (a node whose power was cut may come back a "
                        "commit or so behind what it reported) (default: %(default)s)")
    s.add_argument("--advertise", metavar="HOST:PORT",
                   help="with --replicate: the address other nodes name for writes here "
                        "(default: --listen)")
    s.add_argument("--split-rules", metavar="FILE",
                   help="issue 28: the operator's rule per channel for a tap the holder asks "
                        "to split (AuthorizeRequest.split): TOML with version and [split] "
                        "medical = [\"MEDICAL\", \"TRANSIT\"]; without it no tap splits "
                        "(docs/OPERATIONS.md, \"One tap, several pots\")")
    s.add_argument("--points-table", metavar="FILE",
                   help="RC-20 to RC-22: the Residence Card points indicator table in force "
                        "(TOML); without it the shipped EXAMPLE table, not the official one")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP there (off by default), from a "
                        "process of its own; with --workers, one scrape sums every worker")
    s.add_argument("--metrics-tls-cert", metavar="PEM",
                   help="serve the metrics over HTTPS with this certificate chain (with "
                        "--metrics-tls-key; both read again on SIGHUP)")
    s.add_argument("--metrics-tls-key", metavar="PEM", help="the metrics certificate's key")
    s.add_argument("--metrics-auth", metavar="FILE",
                   help="only scrapers named in this TOML file may scrape: [[scraper]] entries "
                        "with id and either username + password_sha256 (basic auth) or "
                        "token_sha256 (bearer); read again on SIGHUP")
    s.add_argument("--metrics-read-seconds", type=float, default=config.metrics_read_seconds_max,
                   help="a metrics connection that has not sent its whole request this long "
                        "after connecting is dropped")
    s.add_argument("--metrics-connections-max", type=int, default=config.metrics_connections_max,
                   help="metrics connections open at once; beyond it a new one is closed at once")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="JSON lines on stderr; info logs one line per call")
    s.add_argument("--migrate", action="store_true",
                   help="a data dir of an older store format is migrated first, as `yikatong "
                        "migrate` does (without it, the server refuses to start on one)")

    m = sub.add_parser("migrate", help="bring a stopped server's data dir to this release's "
                       "store format (a compacted copy of it kept first)")
    m.add_argument("--data-dir", required=True)
    m.add_argument("--map-size-mib", type=int, default=config.lmdb_map_size // 2**20,
                   help="LMDB map size while migrating (as serve's)")
    m.add_argument("--pii-key-file", metavar="FILE",
                   help="the key file (as serve's): format 4 seals holders' personal "
                        "information, so a migration from an older one needs it")
    pk = sub.add_parser("pii", help="holders' sealed personal information in a stopped "
                        "server's data dir: which key sealed how much (status), or seal "
                        "everything with the current key now (rotate)")
    pk.add_argument("action", choices=("status", "rotate"))
    pk.add_argument("--data-dir", required=True)
    pk.add_argument("--pii-key-file", metavar="FILE", help="required for rotate")
    # a worker started anew by the --workers supervisor (server/workers.py), never by hand
    s.add_argument("--worker-of", metavar="SPEC", help=argparse.SUPPRESS)
    # a replicated node's log keeper, started by the --workers supervisor (server/keeper.py)
    s.add_argument("--keeper-of", metavar="SPEC", help=argparse.SUPPRESS)

    g = sub.add_parser("signing", help="the key file of --signing-key-file: make one "
                       "(new), put a new key in it keeping the old public key published for a "
                       "window (rotate), or print its public keys (show)")
    g.add_argument("action", choices=("new", "rotate", "show"))
    g.add_argument("--key-file", required=True, metavar="FILE")
    g.add_argument("--window-hours", type=float, default=24.0,
                   help="rotate: how long the old key stays published (default: %(default)s)")
    gt = sub.add_parser("gates", help="each gate's acknowledged change sequence, its lag and "
                        "age (a running or stopped server's data dir); exit 1 if any is stale")
    gt.add_argument("--data-dir", required=True)
    gt.add_argument("--clients", metavar="FILE",
                    help="the clients file: its TRANSIT_GATE clients that never acknowledged "
                         "are listed too (stale)")
    gt.add_argument("--stale-after", type=int, default=config.gate_stale_seconds,
                    metavar="SECONDS", help="an acknowledgement older than this is stale "
                    "(default: %(default)s)")
    gt.add_argument("--now", metavar="ISO-8601",
                    help="the time to judge ages at (default: the system clock; give the "
                         "server's own under --clock manual)")
    e = sub.add_parser("explain", help="a transfer's recorded card decision walked again, rule "
                       "by rule (a running server's data dir too)",
                       description="Re-decides the card decision a transfer was made on, with "
                       "the rule pack and card state recorded with it, row by row, and says what "
                       "today's rules answer if they are another pack. Exit codes: 0 it "
                       "re-decides to the recorded answer (or no decision was recorded: said "
                       "why); 1 the recorded decision does not re-decide; 2 no such transfer, "
                       "or no store; 3 recorded under a rule pack this release does not keep.")
    e.add_argument("--data-dir", required=True)
    e.add_argument("--transfer", required=True, metavar="ID",
                   help="a transfer id (a request id; a split tap's own id or a leg's)")
    e.add_argument("--json", action="store_true", help="one JSON object, for machines")
    d = sub.add_parser("due", help="open steps overdue or due soon (a stopped server's too)")
    d.add_argument("--data-dir", required=True)
    d.add_argument("--within", type=int, default=3, metavar="DAYS")
    d.add_argument("--calendar-dir", metavar="DIR", default="",
                   help="YEAR.toml holiday notices over the shipped ones (as serve's)")

    a = sub.add_parser("audit", help="the audit trail of a data dir (a stopped server's too)",
                       description="verify: walk the data dir's hash-chained audit trail. Exit "
                       "codes: 0 every link holds; 1 the chain is broken (the first bad event "
                       "is named); 2 no store, or not this release's format; 3 the store cannot "
                       "be read (a damaged page, a file cut short: named).")
    a.add_argument("action", choices=("verify",))
    a.add_argument("--data-dir", required=True)
    v = sub.add_parser("archive", help="the archive of a data dir: records older than "
                       "--retain-days (a running server's too)",
                       description="verify: every segment of DATA_DIR/archive decodes, its hash "
                       "and its link to the one before hold, it is the store's recorded head, "
                       "and the audit trail goes on from the archive into the store. Exit "
                       "codes: 0 all holds; 1 a segment or link is broken (named); 2 no store, "
                       "or not this release's format; 3 the store cannot be read.")
    v.add_argument("action", choices=("verify",))
    v.add_argument("--data-dir", required=True)

    b = sub.add_parser("backup", help="a verified copy of a data dir, beside its running "
                       "server (or a stopped one); --verify: check one")
    b.add_argument("--data-dir", help="the data dir to copy")
    b.add_argument("--to", metavar="PATH", help="a new directory for the backup")
    b.add_argument("--verify", metavar="PATH", help="check the backup at PATH, copy nothing")
    b.add_argument("--store-only", action="store_true", help=argparse.SUPPRESS)  # snapshots
    r = sub.add_parser("restore", help="a new data dir from a backup, once it verifies")
    r.add_argument("--from", dest="source", metavar="PATH", help="a backup's path")
    r.add_argument("--data-dir", required=True, help="the new data dir (holding no store)")
    r.add_argument("--replicate", metavar="NATS_URLS",
                   help="from a replicated store's snapshots and log instead of --from")
    r.add_argument("--to-sequence", type=int, metavar="N",
                   help="with --replicate: the state as of this log sequence")

    k = sub.add_parser("cluster", help="a replicated store's nodes (--replicate): the writer, "
                       "each node's applied sequence and lag")
    k.add_argument("action", choices=("status",))
    k.add_argument("--replicate", required=True, metavar="NATS_URLS",
                   help="the NATS servers of the cluster, as given to serve --replicate")
    k.add_argument("--json", action="store_true", help="one JSON object, for machines")

    for name, helptext in (("authorize", "ask whether a card may be used"),
                           ("status", "read a card's status")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--target", default=DEFAULT_LISTEN)
        c.add_argument("--token", default=os.environ.get("YIKATONG_TOKEN", ""),
                       help="bearer token (default: $YIKATONG_TOKEN)")
        c.add_argument("--card", required=True)
        if name == "authorize":
            c.add_argument("--channel", choices=CHANNELS, required=True)
            c.add_argument("--service-code", default="")
            c.add_argument("--request-id", default="")

    args = parser.parse_args(argv)
    if args.command == "serve":
        args.argv = list(sys.argv[1:] if argv is None else argv)  # a new worker's, as given
        return serve(args)
    if args.command == "audit":
        return audit_verify(args.data_dir)
    if args.command == "archive":
        return audit_verify(args.data_dir, archive_too=True)
    if args.command == "migrate":
        return migrate_store(args.data_dir, args.map_size_mib, args.pii_key_file)
    if args.command == "pii":
        return pii_command(args.action, args.data_dir, args.pii_key_file)
    if args.command == "signing":
        return signing_command(args.action, args.key_file, args.window_hours)
    if args.command == "gates":
        return gates(args.data_dir, args.clients, args.stale_after, args.now)
    if args.command == "due":
        return due(args.data_dir, args.within, args.calendar_dir)
    if args.command == "explain":
        return explain_transfer(args.data_dir, args.transfer, args.json)
    if args.command in ("backup", "restore"):
        return backup(args)
    if args.command == "cluster":
        return cluster_status(args.replicate.split(","), args.json)
    return client(args)


def backup(args) -> int:
    """`backup --data-dir D --to P`, `backup --verify P`, `restore --from P --data-dir D`:
    0 and what the backup holds; 1 and what is wrong for a copy that does not verify; 2 and
    one line for anything else that stops it."""
    from yikatong.storage import backup as backups

    if args.command == "restore" and bool(args.source) == bool(args.replicate):
        return _fail("restore takes --from PATH, or --replicate NATS_URLS --to-sequence N")
    if args.command == "restore" and args.replicate:
        if args.to_sequence is None:
            return _fail("restore --replicate needs --to-sequence N")
        from yikatong.errors import YikatongError
        from yikatong.storage import snapshots

        try:
            base, applied = snapshots.restore_to(args.replicate.split(","), args.to_sequence,
                                                 args.data_dir)
        except (backups.BackupError, YikatongError) as error:
            print(f"yikatong: {error}", file=sys.stderr)
            return 1 if isinstance(error, backups.Unverified) else 2
        print(f"restored the replicated store as of log sequence {args.to_sequence:,} into "
              f"{args.data_dir}: " + (f"snapshot {base:,}" if base else "no snapshot") +
              f", then {applied:,} log records")
        return 0
    try:
        if args.command == "restore":
            m = backups.restore(args.source, args.data_dir)
            done = f"restored {args.source} into {args.data_dir}"
        elif args.verify:
            if args.data_dir or args.to:
                return _fail("backup --verify PATH takes no --data-dir or --to")
            m = backups.verify(args.verify)
            done = f"backup {args.verify} verifies"
        else:
            if not (args.data_dir and args.to):
                return _fail("backup needs --data-dir DIR and --to PATH (or --verify PATH)")
            m = backups.take(args.data_dir, args.to, archive_too=not args.store_only)
            done = f"backup {args.to} taken and verified"
    except backups.BackupError as error:
        print(f"yikatong: {error}", file=sys.stderr)
        return 1 if isinstance(error, backups.Unverified) else 2
    print(f"{done}: store format {m.format}, taken {m.taken_at} by {m.written_by}; "
          f"change sequence {m.change_sequence:,}, log sequence {m.log_sequence:,}, "
          f"{m.audit_events:,} audit events (head {m.audit_head[:16]}...), "
          f"{m.records.get('cards', 0):,} cards, {m.records.get('transfers', 0):,} transfers, "
          f"{m.data_bytes:,} bytes" + (f"; {m.archive_segments:,} archive segments, their "
                                       "chain verified" if m.archive_segments else ""))
    return 0


def cluster_status(urls: list[str], as_json: bool) -> int:
    """The writer, the log's end, and each node's last report. Exit 1 when no node holds
    the write lease (a NATS cluster short of its quorum among them), none has reported, or a
    node is down or not serving (a monitoring check can run this); a warning
    (`archive_failing`: the node serves rightly) is shown, exit 0. Exit 2: no NATS server
    answers, or no node has started on it."""
    from yikatong.storage import replication

    try:
        status = replication.cluster_status(urls)
    except Exception as error:  # noqa: BLE001 - the cluster cannot be read: one line
        if as_json:
            print(json.dumps({"error": str(error)}))
        failed = _fail(f"cluster status: {error}")
        # a cluster short of its quorum is there, and unhealthy: no writer (exit 1)
        return 1 if isinstance(error, replication.NoQuorum) else failed
    if as_json:
        print(json.dumps(status))
    else:
        writer = status["writer"]
        print(f"log: last sequence {status['log_sequence']}; writer: "
              + (f"{writer['node']} at {writer['address']}" if writer else "none (no lease)"))
        print(f"{'node':<12} {'address':<22} {'role':<9} {'applied':>9} {'lag':>7} "
              f"{'retain':>7}  reported")
        for n in status["nodes"]:
            retain = "?" if n["retain_days"] is None else f"{n['retain_days']:g}d"
            print(f"{n['node']:<12} {n['address']:<22} {n['role']:<9} {n['applied']:>9} "
                  f"{n['lag']:>7} {retain:>7}  {n['reported_seconds_ago']:g} s ago"
                  + ("  DOWN" if n["down"] else "")
                  + (f"  NOT_SERVING ({', '.join(n['not_serving'])})"
                     if n["not_serving"] else "")
                  + (f"  WARNING ({', '.join(n['warnings'])})" if n["warnings"] else ""))
        if len({n["retain_days"] for n in status["nodes"]}) > 1:
            print("the nodes' --retain-days differ: only the writer's is used, so what is "
                  "archived changes with the writer; give every node the same")
    # a writer with no node's report to show is not a healthy cluster (nor one to trust)
    healthy = status["writer"] is not None and bool(status["nodes"]) \
        and not any(n["down"] or n["not_serving"] for n in status["nodes"])
    return 0 if healthy else 1


def explain_transfer(data_dir: str, transfer_id: str, as_json: bool = False) -> int:
    """`yikatong explain`: 0 re-decided to the recorded answer (or nothing recorded, said
    why), 1 it does not re-decide, 2 no such transfer or no store, 3 an unknown rule pack."""

    from yikatong import clock as clocks
    from yikatong import explain
    from yikatong.errors import CorruptRecord, StoreUnavailable
    from yikatong.storage import archive, records
    from yikatong.storage.lmdb_store import Store

    if not os.path.exists(os.path.join(data_dir, "lmdb", "data.mdb")):
        return _fail(f"no store in {data_dir}")
    if not 0 < len(transfer_id.encode("utf-8")) <= config.request_id_bytes_max:
        return _fail(f"--transfer must be 1 to {config.request_id_bytes_max} bytes")
    try:
        store = Store(data_dir, lock=False)  # reads only; beside a running server too
    except StoreUnavailable as error:
        return _fail(str(error))
    try:
        with store.read() as txn:
            book = store.book(txn)

            from_archive: set[str] = set()

            def get(tid: str):
                t = book.transfer(tid)
                if t is None:
                    stored = archive.transfer(book, tid)
                    if stored is not None:
                        from_archive.add(tid)
                        t = records.decode_transfer(stored)
                return t

            try:
                out = explain.explain(get, transfer_id)
                out.archived = (out.decided_by or transfer_id) in from_archive
            except explain.NotFound:
                return _fail(f"no transfer {transfer_id!r} in {data_dir} or its archive")
            except explain.UnknownPack as error:
                print(f"yikatong: {error}", file=sys.stderr)
                return 3
            except CorruptRecord as error:
                print(f"transfer {transfer_id!r}: the recorded decision does not re-decide: "
                      f"{error}")
                return 1
    finally:
        store.close()
    if as_json:
        print(json.dumps(out.as_dict(), sort_keys=True))
    else:
        print(f"transfer {out.transfer_id!r} ({out.kind})"
              + (" from the archive" if out.archived else "")
              + (f": {out.note}" if out.note else ""))
        if out.recorded:
            inputs, card = out.inputs, out.inputs["card"]
            print(f"decided {clocks.format_time(out.time)} for {out.channel} under rule pack "
                  f"{out.rule_pack}" + (f" (transfer {out.decided_by!r})"
                                        if out.decided_by != out.transfer_id else ""))
            print(f"  card: pack {card['pack']}, state {card['state']}, flags {card['flags']}, "
                  f"generation {card['generation']}, locks {card['lock_mask']}, temporary loss "
                  f"until {card['temp_loss_until']}, valid until {card['valid_until']}")
            print(f"  funds: {inputs['amount_fen']} fen asked of {inputs['available_fen']} fen "
                  f"available in {inputs['account']}")
            for row in out.rows:
                print(f"  row {row['number']:>2} {row['rule']:<16} {row['test']}: "
                      f"{row['answer'] or 'passes'}")
            print(f"recorded answer: {out.recorded_answer}")
            print(f"re-decided answer: {out.redecided_answer}")
            if out.today_answer:
                print(f"today's rules (rule pack {out.today_pack}) "
                      + ("answer the same" if out.today_answer == out.redecided_answer
                         else f"would answer {out.today_answer}"))
            else:
                print(f"today's rules are the recorded rule pack ({out.today_pack})")
    if out.recorded and not out.same:
        print(f"transfer {transfer_id!r}: the recorded decision does not re-decide "
              f"({out.redecided_answer}, recorded {out.recorded_answer})")
        return 1
    return 0


def due(data_dir: str, within: int, calendar_dir: str = "") -> int:
    """Every open step overdue or due within `within` days, one line each, with its rule."""
    from yikatong import calendar, cards
    from yikatong import clock as clocks
    from yikatong.errors import StoreUnavailable
    from yikatong.storage.lmdb_store import Store

    if not os.path.exists(os.path.join(data_dir, "lmdb", "data.mdb")):
        return _fail(f"no store in {data_dir}")
    if not 0 <= within <= 3660:
        return _fail("--within must be 0 to 3660 days")
    try:
        calendar.use(calendar.load(calendar_dir))
    except calendar.CalendarFileError as error:
        return _fail(str(error))
    try:
        store = Store(data_dir, lock=False)  # reads only; beside a running server too
    except StoreUnavailable as error:
        return _fail(str(error))
    now = clocks.SystemClock().now()
    try:
        with store.read() as txn:
            items = cards.due(store.book(txn), now, within)
    finally:
        store.close()
    problems = 0
    for card, s in items:
        if isinstance(s, Exception):
            problems += 1
            print(f"{card} could not be counted: {s}")
            continue
        print(f"{card} {s.step:<12} {s.rule:<7} due {clocks.format_time(s.due_at)}"
              + ("  OVERDUE" if s.due_at <= now else "")
              + ("  (provisional: its year's notice is not installed)" if s.provisional else ""))
    steps = len(items) - problems
    print(f"{steps} step{'s' if steps != 1 else ''} overdue or due within {within} days")
    missing = calendar.missing_year(now)
    if missing:
        print(f"warning: no official calendar for {missing} (the State Council's notice): its "
              f"ends are counted provisionally; install {missing}.toml in --calendar-dir")
    return 1 if problems else 0


def signing_command(action: str, path: str, window_hours: float) -> int:
    """`yikatong signing new|rotate|show --key-file F` (issue 28)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from yikatong import clock as clocks
    from yikatong.server import signing

    if action == "new":
        try:
            signing.write_key_file(path, signing.key_file_text(Ed25519PrivateKey.generate(), []))
        except OSError as error:
            return _fail(f"--key-file {path}: {error.strerror} (a key file is never "
                         "overwritten: rotate puts a new key in one)")
        action = "show"
    try:
        keys = signing.Signing.load(path)
    except signing.KeyFileError as error:
        return _fail(str(error).replace("--signing-key-file", "--key-file"))
    now = clocks.SystemClock().now()
    if action == "rotate":
        if not 0 < window_hours <= 24 * 90:
            return _fail("--window-hours must be above 0 and at most 2160 (90 days)")
        earlier = [(pub, until) for pub, until in keys.previous if until > now]
        earlier = [(keys.public, now + int(window_hours * 3600)), *earlier]
        earlier = earlier[:signing.PREVIOUS_MAX]
        try:
            signing.replace(path, signing.key_file_text(Ed25519PrivateKey.generate(), earlier))
        except OSError as error:
            return _fail(f"--key-file {path}: {error.strerror}")
        keys = signing.Signing.load(path)
        print(f"rotated: signing with a new key; the old key "
              f"{signing.key_id(earlier[0][0])} stays published until "
              f"{clocks.format_time(earlier[0][1])}. Now reload the server (SIGHUP, "
              "systemctl reload yikatong)")
    for kid, pub, until in keys.published(now):
        print(f"{kid}  ed25519  {pub.hex()}  "
              + ("current" if not until else f"published until {clocks.format_time(until)}"))
    return 0


def gates(data_dir: str, clients_path: str | None, stale_after: int, now_text: str | None
          ) -> int:
    """Each gate's acknowledged sequence, lag and age, one line each; 1 if any is stale."""
    from yikatong import clock as clocks
    from yikatong.errors import StoreUnavailable
    from yikatong.model import Role
    from yikatong.server.clients import Clients
    from yikatong.storage.lmdb_store import Store

    if not os.path.exists(os.path.join(data_dir, "lmdb", "data.mdb")):
        return _fail(f"no store in {data_dir}")
    if stale_after < 1:
        return _fail("--stale-after must be at least 1 second")
    try:
        now = clocks.parse_time(now_text) if now_text else clocks.SystemClock().now()
    except ValueError:
        return _fail(f"--now {now_text!r} is not ISO-8601")
    expected: set[str] = set()
    if clients_path:
        known = Clients()
        try:
            known.load(clients_path)
        except ValueError as error:
            return _fail(str(error))
        expected = {c.id for c in known.all() if c.role == Role.TRANSIT_GATE}
    try:
        store = Store(data_dir, lock=False)  # reads only; beside a running server too
    except StoreUnavailable as error:
        return _fail(str(error))
    try:
        with store.read() as txn:
            book = store.book(txn)
            head, acks = book.last_change(), {g: (s, t) for g, s, t in book.gate_acks()}
    finally:
        store.close()
    stale = 0
    print(f"change feed head {head}; stale after {stale_after} s; as of "
          f"{clocks.format_time(now)}")
    for gate in sorted(expected | acks.keys()):
        if gate not in acks:
            stale += 1
            print(f"{gate}  never acknowledged  STALE")
            continue
        seq, at = acks[gate]
        age = now - at
        late = age > stale_after
        stale += late
        print(f"{gate}  sequence {seq}  lag {max(0, head - seq)}  age {age} s  "
              f"(at {clocks.format_time(at)})" + ("  STALE" if late else ""))
    print(f"{len(expected | acks.keys())} gates, {stale} stale")
    return 1 if stale else 0


AUDIT_UNREADABLE = 3  # `yikatong audit verify`: the store cannot be read (1: chain broken)


def audit_verify(data_dir: str, archive_too: bool = False) -> int:
    """Walk the audit chain of a data dir read-only (beside a running server, or after it
    stopped), from its archive's first event into the store: 0 and a count if every link
    holds, 1 and the first bad sequence if not, 3 if the store cannot be read (a damaged
    page, a file cut short), 2 for no store. `archive_too` (`yikatong archive verify`): the
    archive's segments are said first, each checked whole (storage/archive.py verify)."""
    from types import SimpleNamespace

    import lmdb

    from yikatong.errors import CorruptRecord, StoreFormat, StoreUnreadable
    from yikatong.storage import archive, migrate
    from yikatong.storage.lmdb_store import LMDB_DAMAGE, Book, check_data_file

    def unreadable(problem) -> int:
        print(f"yikatong: the store in {data_dir} cannot be read: {problem}", file=sys.stderr)
        return AUDIT_UNREADABLE

    path = os.path.join(data_dir, "lmdb")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return _fail(f"no store in {data_dir}")
    try:
        check_data_file(path)  # before LMDB maps it: a file cut short would be a SIGBUS
        env = lmdb.open(path, readonly=True, max_dbs=config.lmdb_max_dbs, lock=True)
    except (StoreUnreadable, lmdb.Error) as error:
        return unreadable(error)
    try:
        try:
            migrate.check_format(env, data_dir, write=False)
        except StoreFormat as error:
            return _fail(str(error))
        with env.begin() as txn:
            try:
                audit = env.open_db(b"audit", txn=txn, create=False)
            except lmdb.NotFoundError:
                return _fail(f"no audit trail in {data_dir}")
            meta = env.open_db(b"meta", txn=txn, create=False)
            book = Book(txn, SimpleNamespace(audit=audit, meta=meta))  # type: ignore[arg-type]
            segments, _ = archive.head(book)
            through = archive.audit_through(book)
            ok, events, bad, problem = archive.verify_audit(
                book, archive.archive_dir(data_dir), os.path.join(path, "data.mdb"))
    except (StoreUnreadable, *LMDB_DAMAGE) as error:
        return unreadable(error)
    except CorruptRecord as error:  # the store's own record of its archive
        print(f"audit trail of {data_dir}: {error}")
        return 1
    finally:
        env.close()
    where = (f"{segments} archive segments (audit events 1 to {through[0]}) and the store"
             if segments else "the store (nothing archived)")
    if ok:
        if archive_too:
            print(f"archive of {data_dir}: {where}: every segment decodes, every hash and "
                  "link holds")
        print(f"audit trail of {data_dir}: {events} events, every link holds")
        return 0
    print(f"audit trail of {data_dir}: broken at sequence {bad}: {problem}")
    return 1


def pii_keys(path: str | None, data_dir: str):
    """The key ring of --pii-key-file (None without it); KeyFileError in one line."""
    from yikatong.storage import pii

    return None if path is None else pii.KeyRing.load(path, data_dir)


def demo_pii_keys(data_dir: str) -> str:
    """`serve --demo` without --pii-key-file: a demo key file beside the data dir (outside it,
    owner-only), made once and used again; its first line says it is a demo's."""
    from yikatong.storage import pii

    path = os.path.abspath(data_dir).rstrip(os.sep) + ".demo-pii-keys.toml"
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        pii.write_key_file(path, pii.new_key_file_text(
            "DEMO KEYS, made by `yikatong serve --demo` for the demo data set in "
            f"{data_dir}.\nNever for real personal information: production passes its own "
            "--pii-key-file."))
    return path


def _pii_rotation(ring):
    """The background rotation of this server process, with its progress as a metric."""
    import logging

    from prometheus_client import Gauge

    from yikatong.storage import pii

    global _PII_GAUGES
    if _PII_GAUGES is None:
        _PII_GAUGES = (
            Gauge("yikatong_pii_rotation_resealed", "Values of holders' personal information "
                  "this process's background rotation has sealed with the current key",
                  multiprocess_mode="livesum"),
            Gauge("yikatong_pii_rotation_running", "1 while a background rotation of the PII "
                  "keys has values left to look at", multiprocess_mode="livemax"))
    resealed, running = _PII_GAUGES

    def progress(done: int, on: bool) -> None:
        resealed.set(done)
        running.set(int(on))
    return pii.Rotation(ring, logging.getLogger("yikatong.pii"), progress)


_PII_GAUGES = None


def pii_command(action: str, data_dir: str, key_file: str | None) -> int:
    """`yikatong pii status|rotate`: on a stopped server's data dir (its lock taken)."""
    from yikatong.errors import StoreUnavailable
    from yikatong.storage import pii
    from yikatong.storage.lmdb_store import Store, lock_data_dir

    if not os.path.exists(os.path.join(data_dir, "lmdb", "data.mdb")):
        return _fail(f"no store in {data_dir}")
    if action == "rotate" and key_file is None:
        return _fail("pii rotate needs --pii-key-file")
    try:
        ring = pii_keys(key_file, data_dir)
        lock = lock_data_dir(data_dir)
    except (pii.KeyFileError, StoreUnavailable) as error:
        return _fail(str(error))
    try:
        store = Store(data_dir, lock=False, pii_keys=ring)
    except StoreUnavailable as error:
        os.close(lock)
        return _fail(str(error))
    try:
        if action == "rotate":
            done, erased = store.write(lambda book: pii.reseal_all(book))
            print(f"sealed {done} values again with key {ring.current!r}"
                  + (f"; {erased} sealed with keys the key file no longer holds (erased) "
                     "left as they are" if erased else ""))
        with store.read() as txn:
            counts = store.book(txn).pii_key_counts()
        print(f"{data_dir}: index key {store.dbs.pii_index or '(none recorded)'}; sealed "
              "values by key: " + (", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
                                   or "none"))
        if ring is not None:
            old = sorted(k for k in counts if k != ring.current and k in ring.keys)
            gone = sorted(k for k in counts if k not in ring.keys)
            if old:
                print(f"keys still in use besides the current {ring.current!r}: "
                      f"{', '.join(old)} (run `yikatong pii rotate`, or serve: it rotates "
                      "in the background)")
            else:
                print(f"every readable value is sealed with the current key {ring.current!r}"
                      + ("; any other key may be removed from the key file" if
                         len(ring.keys) > 1 else ""))
            if gone:
                print(f"erased (their key is not in the key file): {', '.join(gone)}")
    finally:
        store.close()
        os.close(lock)
    return 0


def migrate_store(data_dir: str, map_size_mib: int, key_file: str | None = None) -> int:
    """`yikatong migrate`: the data dir taken (refused beside a running server), then
    storage.migrate, which says what it kept, converted and verified."""
    from yikatong.errors import StoreUnavailable
    from yikatong.storage import migrate
    from yikatong.storage.lmdb_store import lock_data_dir

    if not os.path.exists(os.path.join(data_dir, "lmdb", "data.mdb")):
        return _fail(f"no store in {data_dir}")
    if map_size_mib < 1:
        return _fail("--map-size-mib must be at least 1")
    from yikatong.storage import pii
    try:
        ring = pii_keys(key_file, data_dir)
        lock = lock_data_dir(data_dir)
    except (StoreUnavailable, pii.KeyFileError) as error:
        return _fail(str(error))
    try:
        migrate.migrate(data_dir, map_size=map_size_mib * 2**20, pii_keys=ring)
    except StoreUnavailable as error:
        return _fail(str(error))
    finally:
        os.close(lock)
    return 0


NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):(?P<port>[0-9]{1,5})")


def _replication_problem(args) -> str:
    """--replicate's own flags, checked before anything starts: the node id is a key of the
    cluster's buckets and a word of the lease; the address is what other nodes hand clients."""
    from yikatong.storage.replication import shown

    urls = args.replicate.split(",")
    if not all(u.startswith(("nats://", "tls://")) and len(u) > 7 for u in urls):
        return ("--replicate takes the cluster's NATS servers as nats://HOST:PORT[,...], not "
                f"{', '.join(shown(u)[:80] for u in urls)!r}")
    if not NODE_ID.fullmatch(args.node_id or ""):
        return "--node-id must be 1 to 64 letters, digits, '-' or '_'"
    if not 1 <= args.log_in_flight_max <= 256:
        return f"--log-in-flight-max must be 1 to 256, not {args.log_in_flight_max}"
    address = args.advertise or args.listen
    match = ADDRESS.fullmatch(address)
    if not match or not 0 < int(match["port"]) < 65536:
        return (f"--advertise must be HOST:PORT, the address other nodes send clients to, not "
                f"{address[:80]!r}")
    try:
        snapshot_policy(args)
    except ValueError as error:
        return str(error)
    if match["host"] in ("0.0.0.0", "[::]", "[::0]"):
        return (f"--listen {address} is every interface: give --advertise HOST:PORT, the "
                "address other nodes send clients to")
    return ""


def snapshot_policy(args):
    """--snapshot-every and --snapshots-keep as a snapshots.Policy (None: 'off'); ValueError
    naming what is wrong."""
    from yikatong.storage.snapshots import Policy

    if args.snapshot_every.strip().lower() == "off":
        return None
    policy = Policy(keep=args.snapshots_keep, margin=args.log_purge_margin)
    for part in args.snapshot_every.split(","):
        part = part.strip().lower()
        try:
            if part.endswith("h"):
                policy.every_seconds = float(part[:-1]) * 3600
                valid = 0 < policy.every_seconds <= 3600 * 24 * 366
            else:
                policy.every_records = int(part)
                valid = policy.every_records > 0
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"--snapshot-every takes RECORDS, HOURSh or both (1000000,24h), "
                             f"or off; not {args.snapshot_every[:40]!r}")
    if not 1 <= args.snapshots_keep <= 100:
        raise ValueError("--snapshots-keep must be 1 to 100")
    if not 0 <= args.log_purge_margin <= 10**9:
        raise ValueError("--log-purge-margin must be 0 to 1000000000 records")
    return policy


def _fail(message: str) -> int:
    print(f"yikatong: {message}", file=sys.stderr)
    return 2


def serve(args) -> int:
    from yikatong.server import metrics

    # a worker (or a log keeper) has its parent's directory, and the endpoint is its parent's
    if args.metrics_listen and not (args.worker_of or args.keeper_of):
        problem = _probe_listen(args.metrics_listen) or _metrics_problem(args)
        if problem:
            return _fail(f"cannot serve metrics on {args.metrics_listen} (--metrics-listen): "
                         f"{problem}")
        metrics.prepare(args.data_dir)  # before prometheus-client is imported, by any process
    elif not args.metrics_listen and (args.metrics_tls_cert or args.metrics_tls_key
                                      or args.metrics_auth):
        return _fail("--metrics-tls-cert, --metrics-tls-key and --metrics-auth need "
                     "--metrics-listen")
    return _serve(args, metrics)


def _metrics_reload(reloads, exporter, args):
    """One worker: SIGHUP is passed to the metrics endpoint's process too (the supervisor
    passes it under --workers), which reads its certificate, key and credentials again and
    logs its own line."""
    if exporter is not None and (args.metrics_tls_cert or args.metrics_auth):
        reloads.add("metrics endpoint (its own reload line follows)",
                    args.metrics_auth or args.metrics_tls_cert, exporter.hup)
    return reloads


def _metrics_problem(args) -> str:
    """What is wrong with the metrics endpoint's flags and files ('' if nothing), checked
    before anything starts, as its process will read them."""
    from yikatong.server import exporter

    if not 0 < args.metrics_read_seconds <= 60:
        return "--metrics-read-seconds must be above 0 and at most 60"
    if not 1 <= args.metrics_connections_max <= 10_000:
        return "--metrics-connections-max must be 1 to 10000"
    if bool(args.metrics_tls_cert) != bool(args.metrics_tls_key):
        return "--metrics-tls-cert and --metrics-tls-key go together"
    try:
        if args.metrics_tls_cert:
            exporter.load_tls(args.metrics_tls_cert, args.metrics_tls_key)
        if args.metrics_auth:
            exporter.load_auth(args.metrics_auth)
    except ValueError as error:
        return str(error)
    return ""


def _serve(args, metrics) -> int:
    import logging
    import signal
    import threading

    import uvloop

    from yikatong import calendar, cards, ledger, points, pots
    from yikatong import clock as clocks
    from yikatong.errors import Fenced, StoreUnavailable
    from yikatong.server import demo, log, reload
    from yikatong.server.app import SHUTDOWN_GRACE_SECONDS
    from yikatong.server.app import serve as run_server
    from yikatong.server.calls import Limits
    from yikatong.server.clients import Clients
    from yikatong.server.core import History
    from yikatong.server.roles import TableError
    from yikatong.server.workers import supervise
    from yikatong.storage.lmdb_store import Store, lock_data_dir

    log.setup(args.log_level)
    # a worker started anew by the --workers supervisor (server/workers.py), or a replicated
    # node's log keeper (server/keeper.py): the supervisor's descriptors, its lifetime
    worker = None
    if args.worker_of or args.keeper_of:
        from yikatong.server.workers import WorkerOf
        try:
            worker = WorkerOf.parse(args.worker_of or args.keeper_of)
        except ValueError as error:
            return _fail(str(error))
        worker.begin()
    else:
        reload.before_serving()  # SIGHUP while starting: reloaded once it serves

    if min(args.map_size_mib, args.max_concurrent_rpcs, args.client_calls_max) < 1:
        return _fail("--map-size-mib, --max-concurrent-rpcs and --client-calls-max must be at "
                     "least 1")
    if args.map_size_max_mib < args.map_size_mib or not 0 < args.map_high_water <= 1:
        return _fail("--map-size-max-mib must be at least --map-size-mib, and "
                     "--map-high-water above 0 and at most 1")
    if not (0 < args.request_arrival_seconds <= 3600 and 0 < args.stream_stall_seconds <= 3600
            and 0 < args.stream_end_grace_seconds <= 3600):
        return _fail("--request-arrival-seconds, --stream-stall-seconds and "
                     "--stream-end-grace-seconds must be above 0 and at most 3600")
    if not (1 <= args.history_replays_max <= 100_000
            and 1 <= args.history_events_per_second <= 10**9):
        return _fail("--history-replays-max must be 1 to 100000, and "
                     "--history-events-per-second 1 to 1000000000")
    if not 0 <= args.journey_grace_seconds <= config.journey_grace_seconds_max:
        return _fail(f"--journey-grace-seconds must be 0 to {config.journey_grace_seconds_max}")
    config.journey_grace_seconds = args.journey_grace_seconds  # before any worker is forked
    workers = args.workers or os.cpu_count() or 1
    if not 1 <= workers <= config.workers_max:
        return _fail(f"--workers must be 0 (one per core) to {config.workers_max}")
    if args.retain_days is None:  # replicated: an archive is asked for on every node alike
        args.retain_days = 0 if args.replicate else config.retain_days  # (docs/SCALE.md)
    if not 0 <= args.retain_days <= config.retain_days_max or \
            0 < args.retain_days * 86400 < 1:  # rounds to 0 s: nothing would be archived
        return _fail(f"--retain-days must be 0 (keep everything in LMDB) or one second "
                     f"(0.0000116) to {config.retain_days_max}")
    if args.replicate and (not args.node_id or args.demo):
        return _fail("--replicate needs --node-id and no --demo (a demo set loaded on one "
                     "node would not be on the others)")
    if (args.node_id or args.advertise) and args.replicate is None:
        return _fail("--node-id and --advertise are for --replicate")
    if args.replicate is not None:
        problem = _replication_problem(args)
        if problem:
            return _fail(problem)
    if not 0 <= args.drain_seconds <= 3600:
        return _fail("--drain-seconds must be 0 to 3600")
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            return _fail("--tls-cert, --tls-key and --tls-ca go together")
        from yikatong.config_file import read_bytes
        try:
            tls = tuple(read_bytes(path, f"{flag} {path}") for flag, path in (
                ("--tls-key", args.tls_key), ("--tls-cert", args.tls_cert),
                ("--tls-ca", args.tls_ca)))
        except ValueError as error:
            return _fail(str(error))
        for flag, pem, marker in (("--tls-key", tls[0], b"PRIVATE KEY-----"),
                                  ("--tls-cert", tls[1], b"-----BEGIN CERTIFICATE-----"),
                                  ("--tls-ca", tls[2], b"-----BEGIN CERTIFICATE-----")):
            if marker not in pem:
                return _fail(f"{flag} is not a PEM file with a {marker.strip(b'-').decode()}")
    try:
        if args.clock == "manual":
            start = clocks.parse_time(args.clock_start) if args.clock_start else None
            clock = clocks.ManualClock(start if start is not None else clocks.SystemClock().now())
        elif args.clock_start:
            return _fail("--clock-start needs --clock manual")
        else:
            clock = clocks.SystemClock()
    except ValueError as error:
        return _fail(f"--clock-start {args.clock_start!r}: {error}")
    if worker is not None and args.clock == "manual":  # its siblings' one clock
        clock = clocks.ManualClock.attach(worker.fds["clock"])
    clients = Clients()
    try:
        if args.clients:
            clients.load(args.clients)
        if args.demo:
            demo.add_demo_clients(clients)
    except ValueError as error:
        return _fail(str(error))
    try:
        banks = _issuing_banks(args.issuing_banks) if args.issuing_banks else None
        table = points.load(args.points_table)
        split_rules = pots.load(args.split_rules) if args.split_rules else pots.SplitRules()
    except ValueError as error:
        return _fail(str(error))
    points.use(table)  # before any worker is forked
    pots.use(split_rules)
    keys = None  # issue 28: the signing key, checked before anything serves
    if args.signing_key_file:
        from yikatong.server import signing
        try:
            keys = signing.Signing.load(args.signing_key_file, args.data_dir)
        except signing.KeyFileError as error:
            return _fail(str(error))
    try:
        calendar.use(calendar.load(args.calendar_dir))
    except calendar.CalendarFileError as error:
        return _fail(str(error))
    from yikatong.storage import pii
    key_file = args.pii_key_file
    try:
        if key_file is None and args.demo:
            key_file = demo_pii_keys(args.data_dir)
        ring = pii_keys(key_file, args.data_dir)
    except (pii.KeyFileError, OSError) as error:
        return _fail(str(error))
    rotation = None  # the background PII rotation of this process (storage/pii.py)
    problem = _probe_listen(args.listen) if worker is None else ""  # a worker's siblings hold it
    if problem:
        return _fail(f"cannot listen on {args.listen}: {problem}")

    node = None  # with --replicate: the store's place in the cluster (storage.replication)

    def not_yet_in_the_cluster() -> None:  # until the Node is attached: not even the sweep
        raise Fenced("this node is joining the cluster; it takes no write yet")

    def open_store(periodic: bool = True) -> Store:
        """`periodic=False`: no hold sweep (a log keeper: its workers sweep)."""
        def sweep_expired_holds(book):
            # on the writer (Store.check_writer); replicated, half a record's worth at most:
            # the PII rotation's step and the archive's move share the group's one record
            ledger.expire_holds(book, clock.now(), bytes_max=store.record_bytes_max // 2
                                if store.record_bytes_max else None)
            if rotation is not None:
                rotation.step(book)
            if mover is not None:  # one segment's worth, in this group (storage/archive.py)
                moved = mover.step(book, clock.now())
                if moved:
                    log.archived(**moved)

        mover = archive.Mover(retain_seconds) if retain_seconds else None

        # the data dir's lock is held here, for every worker (lock_data_dir below)
        # replicated: durable on a quorum of the log's disks before the local commit, which
        # the log replays after a crash: one local flush per commit, not two (docs/SCALE.md)
        store = Store(args.data_dir, map_size=args.map_size_mib * 2**20, lock=False,
                      map_size_max=args.map_size_max_mib * 2**20,
                      high_water=args.map_high_water,
                      periodic=sweep_expired_holds if periodic else None,
                      metasync=not args.replicate,
                      check_writer=not_yet_in_the_cluster if args.replicate else None,
                      check_command=ledger.check_invariants if CHECK_INVARIANTS else None,
                      pii_keys=ring, log_in_flight_max=args.log_in_flight_max)
        store.dbs.now = clock.now  # a remembered answer's time: the server's clock
        if mover is not None:
            mover.store = store
        return store

    from yikatong.storage import archive
    retain_seconds = round(args.retain_days * 86400)

    try:
        # held for the server's life, by every worker (a worker started anew inherits it)
        lock = lock_data_dir(args.data_dir) if worker is None else worker.fds["lock"]
        # a worker started anew never migrates: its siblings serve the store as it is
        if args.migrate and worker is None and os.path.exists(
                os.path.join(args.data_dir, "lmdb", "data.mdb")):
            from yikatong.storage import migrate
            migrate.migrate(args.data_dir, map_size=args.map_size_mib * 2**20,
                            say=lambda line: print(f"yikatong: {line}", flush=True),
                            pii_keys=ring)
        if args.replicate and worker is None:
            from yikatong.storage import snapshots
            snapshots.clean_staging(args.data_dir)  # left by a node killed while staging
            if not os.path.exists(os.path.join(args.data_dir, "lmdb", "data.mdb")):
                from yikatong.storage.replication import Log, shown
                try:  # a new node, or a wiped one: the newest snapshot, then the log's tail
                    log_ = Log(args.replicate.split(","))
                    try:
                        snapshots.bootstrap(log_, args.data_dir, args.data_dir)
                    finally:
                        log_.close()
                except Exception as error:  # noqa: BLE001 - the log or a snapshot: one line
                    return _fail(f"--replicate {','.join(map(shown, args.replicate.split(',')))}"
                                 f": cannot lay out this node's store from the cluster (the "
                                 f"newest snapshot and the log's tail): {error}")
        showcase = []
        store = open_store()  # opened (and the demo loaded) before any worker exists, closed
        store_format = store.format
        try:
            if args.demo and worker is None:
                demo.load(store, clock.now())
                showcase = demo.showcase(store, args.listen)
            if not args.replicate:  # a replicated node's writer counts its own (on reload)
                log.recounted(store.write(cards.recount))
            with store.read() as txn:
                segments = archive.head(store.book(txn))[0]
            if segments and not retain_seconds and worker is None:
                logging.getLogger("yikatong").warning(
                    "this store's archive holds %d segments but --retain-days is 0: while "
                    "this node writes, nothing more is archived (give it the --retain-days "
                    "it had, on every node of a cluster)", segments)
        finally:
            store.close()
    except (StoreUnavailable, ValueError) as error:
        return _fail(str(error))

    def ready():
        missing = calendar.missing_year(clock.now())
        log.started(version=_version(), listen=args.listen, workers=workers,
                    calendar=calendar.official_years(), calendar_missing=missing or None,
                    tls=tls is not None, reflection=args.reflection,
                    data_dir=os.path.abspath(args.data_dir), map_size_mib=args.map_size_mib,
                    store_format=store_format,
                    clock=args.clock, metrics=args.metrics_listen or "off")
        print("yikatong: issuing-bank check (GZ-9c) " + (
            f"on: list version {banks.version}, {len(banks.names)} banks" if banks else
            "off: no --issuing-banks list configured")
            + "; " + cards.bank_loss_rules_said(banks) + "; " + cards.beijing_banks_said(banks),
            flush=True)
        print("yikatong: split taps: " + pots.in_force().said(), flush=True)
        print("yikatong: working-day calendar: official "
              + ", ".join(map(str, calendar.official_years()))
              + (f"; WARNING: no official calendar for {missing}: its ends are counted "
                 f"provisionally until {missing}.toml is installed in --calendar-dir" if missing
                 else ""), flush=True)
        print("yikatong: personal information " + (
            f"sealed with key {ring.current!r} of {key_file}"
            + (" (DEMO KEYS, made for the demo data set)" if key_file != args.pii_key_file
               else "") if ring is not None else
            "WARNING: no --pii-key-file: authorizations are served, holders' personal "
            "information is refused (FAILED_PRECONDITION)"), flush=True)
        print(f"yikatong: points table (RC-22) version {table.version}"
              + (", an EXAMPLE, not the official values" if table.example else ""), flush=True)
        print(f"yikatong: serving on {args.listen} ({'mTLS' if tls else 'plaintext'}; "
              f"{workers} worker{'s' if workers > 1 else ''}; data dir {args.data_dir}, clock "
              f"{args.clock} at {clocks.format_time(clock.now())})", flush=True)
        if args.demo:
            _print_demo(showcase)

    def run(on_ready) -> int:
        """One server process: its own LMDB environment and gRPC server."""
        nonlocal node, rotation
        try:
            store = open_store()
        except StoreUnavailable as error:
            return _fail(str(error))
        if ring is not None and not args.replicate:  # a follower's values come in the log
            rotation = _pii_rotation(ring)
        if args.replicate and workers > 1:  # the node is the log keeper's (keep_log)
            from yikatong.storage import keeper
            try:
                node = keeper.Link(store, keeper.socket_path(args.data_dir),
                                   config.keeper_wait_seconds)
            except Exception as error:  # noqa: BLE001 - no keeper: one line
                store.close()
                return _fail(str(error))
        elif args.replicate:
            from yikatong.storage.replication import Node, shown
            try:
                node = Node(store, args.replicate.split(","), args.node_id,
                            args.advertise or args.listen, config.lease_seconds,
                            snapshots=snapshot_policy(args), work=args.data_dir,
                            retain_days=args.retain_days)
            except Exception as error:  # noqa: BLE001 - cannot reach the log: one line
                store.close()
                return _fail(f"--replicate {','.join(map(shown, args.replicate.split(',')))}: "
                             f"{error}")
        certs = reload.ServerCertificates(*tls) if tls else None  # grpc objects: after fork
        try:
            uvloop.run(run_server(store, clock, clients, args.listen, on_ready=on_ready,
                                  concurrent_rpcs_max=args.max_concurrent_rpcs, banks=banks,
                                  signing=keys,
                                  tls=certs, reflection=args.reflection,
                                  reuse_port=workers > 1 or worker is not None,
                                  reloads=_metrics_reload(
                                      reload.server_parts(args, clients, certs, store),
                                      exporter if workers == 1 else None, args),
                                  drain_seconds=args.drain_seconds, node=node,
                                  limits=Limits(args.client_calls_max,
                                                args.request_arrival_seconds,
                                                args.stream_stall_seconds,
                                                args.stream_end_grace_seconds),
                                  history=History(args.history_replays_max,
                                                  args.history_events_per_second,
                                                  args.stream_stall_seconds)))
        except (OSError, TableError) as error:
            return _fail(str(error))
        finally:
            if node is not None:
                node.stop()
            store.close()
        return 0

    def keep_log() -> int:
        """The log keeper of a replicated node's workers (storage/keeper.py): the node's
        lease, log, follower, intake and snapshots, served to the workers on the data dir's
        socket until SIGTERM (the supervisor's, once the workers have stopped)."""
        from yikatong.storage import keeper
        from yikatong.storage.replication import Node, shown

        stop, kept = threading.Event(), threading.Event()
        try:
            store = open_store(periodic=False)
        except StoreUnavailable as error:
            return _fail(str(error))
        try:
            node = Node(store, args.replicate.split(","), args.node_id,
                        args.advertise or args.listen, config.lease_seconds,
                        snapshots=snapshot_policy(args), work=args.data_dir, take_back=True,
                        retain_days=args.retain_days)
        except Exception as error:  # noqa: BLE001 - cannot reach the log: one line
            store.close()
            return _fail(f"--replicate {','.join(map(shown, args.replicate.split(',')))}: "
                         f"{error}")
        node_metrics = None
        try:
            server = keeper.Server(node, keeper.socket_path(args.data_dir))
            if args.metrics_listen:
                node_metrics = metrics.NodeMetrics(node)
                node_metrics.keep()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())  # the lease given up
            signal.signal(signal.SIGUSR1, lambda *_: (kept.set(), stop.set()))  # renewed
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the workers first
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            worker.ready()
            while not stop.wait(1.0):
                if store.writer_error is not None:  # it applies nothing more: started again
                    logging.getLogger("yikatong.keeper").critical(
                        "the log keeper's LMDB writer has stopped (%r); ending, for its "
                        "supervisor to start another", store.writer_error)
                    server.close()
                    return 1
            server.close()
        finally:
            if node_metrics is not None:
                node_metrics.stop()
            node.stop(release=not kept.is_set())
            store.close()
        logging.getLogger("yikatong.keeper").info("the log keeper stopped")
        return 0

    def serving():
        if exporter is not None:
            exporter.wait_ready()  # so a scrape right after the ready line is answered
        ready()

    # the metrics endpoint: a process of its own (server/exporter.py), kept by this process
    # (one worker) or by the supervisor (--workers N); its values under the data dir, emptied
    # now that the lock is held (a killed server's are never served)
    exporter = metrics.Exporter(args) if args.metrics_listen and worker is None else None
    log_keeper = None  # with --replicate and --workers N (server/keeper.py)
    values = metrics.prepare(args.data_dir) if exporter is not None else ""
    try:
        if args.keeper_of:
            return keep_log()
        if worker is not None:
            return run(worker.ready)
        if exporter is not None:
            metrics.clean(values)
        if workers == 1:
            if exporter is not None:
                exporter.keep()
            code = run(serving)
        else:  # the parent keeps the metrics endpoint, once every worker is forked
            # a worker started anew: this command in a fresh interpreter, with the lock and
            # the manual clock's shared memory; so is a replicated node's log keeper
            command = [sys.executable, "-m", "yikatong", *args.argv]
            fds = {"lock": lock, **({"clock": clock.fd} if clock.manual else {})}
            if args.replicate:
                from yikatong.server.keeper import Keeper
                log_keeper = Keeper(command, fds, metrics=bool(args.metrics_listen))
            code = supervise(workers, run, serving,
                             stop_seconds=args.drain_seconds + SHUTDOWN_GRACE_SECONDS + 5,
                             on_ended=metrics.process_ended if args.metrics_listen
                             else lambda pid: None,
                             on_restart=metrics.worker_restarted if args.metrics_listen
                             else lambda: None,
                             command=command, fds=fds,
                             companions=[c for c in (exporter, log_keeper) if c])
    finally:
        if log_keeper is not None:  # after the workers have drained their writes
            log_keeper.stop(15.0)  # its node stops its threads and gives the lease up
        if exporter is not None:
            exporter.stop()
            metrics.remove(values)
        os.close(lock)
    if code == 0:
        print("yikatong: stopped", flush=True)
    return code


def _version() -> str:
    from yikatong import __version__

    return __version__


def _issuing_banks(path: str):
    """GZ-9c: the published list of issuing banks, versioned; BJ-7: Beijing's own, in
    `[beijing]`."""
    from yikatong.config_file import read_toml
    from yikatong.model import IssuingBanks

    doc = read_toml(path, f"issuing-banks file {path}")
    version, names = doc.get("version"), doc.get("banks")
    if not isinstance(version, str) or not version or not isinstance(names, list) or not names \
            or not all(isinstance(n, str) and 0 < len(n.encode()) <= 32 for n in names):
        raise ValueError(f"issuing-banks file {path}: needs version = \"...\" and banks = "
                         "[\"...\", ...] (names of at most 32 bytes)")
    try:
        rules = _bank_loss_rules(doc.get("bank_loss", {}))
    except ValueError as error:
        raise ValueError(f"issuing-banks file {path}: {error}") from None
    beijing = doc.get("beijing")  # BJ-7: Beijing's own catalogue of cooperative banks
    if beijing is not None:
        bj = beijing if isinstance(beijing, dict) else {}
        bj_names = bj.get("banks")
        if set(bj) != {"version", "banks"} or not isinstance(bj["version"], str) \
                or not bj["version"] or not isinstance(bj_names, list) or not bj_names \
                or not all(isinstance(n, str) and 0 < len(n.encode()) <= 32 for n in bj_names):
            raise ValueError(f"issuing-banks file {path}: [beijing] needs version = \"...\" "
                             "and banks = [\"...\", ...] (names of at most 32 bytes), nothing "
                             "else")
        beijing = IssuingBanks(bj["version"], frozenset(bj_names))
    return IssuingBanks(version, frozenset(names), rules, beijing)


def _bank_loss_rules(table) -> dict:
    """SH-20: `[bank_loss."NAME"]` tables, one per service bank with rules of its own:
    `loss_valid_days` (0 or absent: the report stands until cancelled; N: it lapses at 24:00
    of the N-th day after it) and `cancelled_by` (BANK_OUTLET, BANK_SWITCH or both; absent:
    both; empty: only the lapse ends it). ValueError naming the entry and what is wrong."""
    from yikatong.model import BankLossRules, Role

    if not isinstance(table, dict):
        raise ValueError('bank_loss must be tables [bank_loss."NAME"], one per bank')
    rules = {}
    for name, entry in table.items():
        where = f"bank_loss.{name}"
        if not 0 < len(name.encode()) <= 32:
            raise ValueError(f"{where}: a bank's name is 1 to 32 bytes")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a table (loss_valid_days, cancelled_by)")
        unknown = sorted(set(entry) - {"loss_valid_days", "cancelled_by"})
        if unknown:
            raise ValueError(f"{where}: unknown key {', '.join(unknown)} (known: "
                             "loss_valid_days, cancelled_by)")
        days = entry.get("loss_valid_days", 0)
        if type(days) is not int or not 0 <= days <= config.bank_loss_valid_days_max:
            raise ValueError(f"{where}: loss_valid_days must be a whole number of days from 0 "
                             "(the report stands until cancelled) to "
                             f"{config.bank_loss_valid_days_max}, not {days!r}")
        by = entry.get("cancelled_by", ["BANK_OUTLET", "BANK_SWITCH"])
        if not isinstance(by, list) or len(set(map(str, by))) != len(by) \
                or not set(map(str, by)) <= {"BANK_OUTLET", "BANK_SWITCH"}:
            raise ValueError(f"{where}: cancelled_by must list BANK_OUTLET, BANK_SWITCH or both "
                             f"(the bank roles of API.md), not {by!r}")
        if not by and not days:
            raise ValueError(f"{where}: cancelled_by is empty and loss_valid_days 0: the report "
                             "would stand for ever")
        rules[name] = BankLossRules(days, frozenset(Role[r] for r in by))
    return rules


def _probe_listen(listen: str) -> str:
    """Why HOST:PORT cannot be bound ('' if it can), said plainly before gRPC tries."""
    import socket

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return "expected HOST:PORT"
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            # as gRPC binds: a port left in TIME_WAIT by our last run is free, a listener is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as error:
        return error.strerror or str(error)
    return ""


def _print_demo(showcase: list[tuple[str, str]]) -> None:
    from yikatong.server import demo
    from yikatong.server.clients import ROLES

    print("\nDemo tokens (guessable: demo only):")
    for role in ROLES:
        print(f"  {role:<17} {demo.token_for(role)}")
    print("\nDemo cards: paste any of these in another shell; each prints the answer shown.")
    for command, answer in showcase:
        print(f"  {command}\n      -> {answer}")
    print("  (any unknown number -> DECLINED CARD_NOT_FOUND)\n", flush=True)


def client(args) -> int:
    import grpc

    from yikatong.v1 import yikatong_pb2 as pb
    from yikatong.v1 import yikatong_pb2_grpc as rpc

    metadata = (("authorization", f"Bearer {args.token}"),)
    with grpc.insecure_channel(args.target) as channel:
        try:
            if args.command == "status":
                reply = rpc.CardStatusStub(channel).GetStatus(
                    pb.GetStatusRequest(card_number=args.card), metadata=metadata, timeout=10)
                print(f"card {reply.card_number}: found={reply.found} "
                      f"pack={pb.Pack.Name(reply.pack)} state={pb.CardState.Name(reply.state)} "
                      f"medical={pb.DeclineReason.Name(reply.reason)}"
                      + (f" replaced_by={reply.replaced_by}" if reply.replaced_by else ""))
                return 0
            reply = rpc.AuthorizationStub(channel).Authorize(pb.AuthorizeRequest(
                request_id=args.request_id or uuid.uuid4().hex, card_number=args.card,
                channel=pb.Channel.Value("CHANNEL_" + args.channel.upper()),
                service_code=args.service_code, terminal_id="cli"), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return _fail(f"{error.code().name}: {error.details()}")
    reason = pb.DeclineReason.Name(reply.reason).removeprefix("DECLINE_REASON_")
    print(f"{pb.Decision.Name(reply.decision).removeprefix('DECISION_')}"
          + ("" if reply.reason == 0 else f" {reason}"))
    return 0 if reply.decision == pb.DECISION_APPROVED else 1
