"""Every limit and constant of the server, in one place (TIGER_STYLE: name them `*_max`)."""
from yikatong.model import AccountKind, Channel, Pack

# ---- sizes checked at the edge
card_number_length_max = 20  # digits; card numbers are ASCII digits only
request_id_bytes_max = 64  # UTF-8 bytes: stored in fixed 64-byte fields (a transfer's ref_id)
text_field_length_max = 200  # names, addresses, reasons, bank names
batch_size_max = 1000  # AuthorizeBatch / AuthorizeStream / GetStatusBatch entries per message
message_size_max = 4 * 1024 * 1024  # bytes, gRPC receive limit
clients_max = 10_000  # entries in a clients file
# Configuration files (clients, points table, calendar, issuing banks, TLS PEM): regular
# files of at most this many bytes, read once (yikatong/config_file.py). A clients file of
# clients_max entries with every field at its longest is about 2.6 MB.
config_file_bytes_max = 4 * 1024 * 1024
concurrent_rpcs_max = 4096  # calls in progress at once; more are refused RESOURCE_EXHAUSTED
# Calls one client (token or certificate) may have in progress on one worker; more are
# refused RESOURCE_EXHAUSTED, so one client cannot take every slot of concurrent_rpcs_max.
client_calls_max = 1024
# A unary call's request message must arrive this soon after its headers, or the call ends
# DEADLINE_EXCEEDED and gives its slot back (callers that send headers and then nothing).
request_arrival_seconds_max = 10.0
# A server stream (WatchChanges, AuthorizeStream, Audit.Export) whose caller takes no message
# for this long is ended RESOURCE_EXHAUSTED: it holds its slot and nothing else.
stream_stall_seconds_max = 10.0
# A stream so ended gets this long to take its status (which waits behind the message it
# refused); then it is cancelled (RST_STREAM) and gives back its slot and its client's share.
stream_end_grace_seconds_max = 10.0
# Messages of one AuthorizeStream worked on at once (read ahead while earlier ones wait for
# the writer's commit, answered in order): a stream of debits keeps the writer's groups full
# instead of one message per commit. Each holds at most batch_size_max parsed requests.
stream_messages_in_flight_max = 8
# Refused calls are audited once a second, per client, method and status (a flood is counted,
# not written line by line); at most this many such keys a second.
refusal_keys_max = 1000
# An audit event's free text (purpose, reason, evidence), masked, is cut to this many characters
# (a text field is at most text_field_length_max; a service may prefix it).
audit_text_length_max = 400
# The change feed: each worker looks for changes committed by any worker this often while
# someone watches, and reads at most this many events per read transaction.
watch_poll_seconds = 0.005
watch_batch_max = 256
# History replays (a watcher from far behind the feed's head), per client and worker: at most
# this many at once (more are refused RESOURCE_EXHAUSTED), sharing this many events a second
# (a replay of the demo's 46,000 changes took 3 CPU-seconds of the loop unbudgeted).
history_replays_max = 4
history_events_per_second_max = 5000
# A watcher this many changes or more behind the head whose lag has not shrunk over a whole
# --stream-stall-seconds is stalled, as one whose write is blocked: ended RESOURCE_EXHAUSTED.
watch_lag_max = 4 * watch_batch_max
# issue 28: a deny-list page holds at most this many entries (GetDenyList page_size; 0 asks
# for the default) and reads at most deny_list_scan_max cards, so one page holds the event
# loop for a bounded time whatever the city's size
deny_list_page_default = 1000
deny_list_page_max = 10_000
deny_list_scan_max = 10_000
# `yikatong gates` and the alert: a gate whose last acknowledgement is older is stale
gate_stale_seconds = 300

# ---- replication (issue 18, docs/SCALE.md)
lease_seconds = 3.0  # the write lease lapses this long after its last renewal
# a node's start waits this long for a cluster started with it (streams, buckets, leaders
# being elected) before it gives up in one line
cluster_start_seconds = 20.0
# records kept below the purge floor (the oldest kept snapshot, the slowest node up): a
# replicated node's commit is flushed without its meta page (NOMETASYNC), so a power cut
# may undo its last commits; it replays them from the log, which must still hold them
log_purge_margin_records = 1000
# a read with min_sequence waits at most this long (and never past its deadline) for the
# follower to apply the log that far, then UNAVAILABLE (LOG_BEHIND)
min_sequence_wait_seconds = 5.0
# the writer's commit groups whose records may await the log's acknowledgement at once, while
# it gathers and applies the next ones (serve --log-in-flight-max; issue 27 item 2)
log_in_flight_max = 8
# `yikatong cluster status`: how long it waits for the NATS cluster's answer (JetStream answers
# in milliseconds; a cluster short of its quorum never does)
cluster_status_seconds = 8.0
# a failed snapshot is tried again after this, doubling up to the max (storage/snapshots.py)
snapshot_retry_seconds = 60.0
snapshot_retry_seconds_max = 1800.0
# a failure a replicated node's loop meets on every turn: logged whole once, then a line this
# often (storage/replication.py Repeated)
repeated_failure_log_seconds = 60.0
log_ack_wait_seconds = 15.0  # at most, for an appended record's answer (the log's own is 5 s)
# a replication record's operations are one zstd frame at this level (records.JOURNAL_VERSION
# 2); plain, a record is at most this many bytes (a writer's record is cut far below it, at
# half the log's max_payload: a follower refuses a frame that says more, never allocating it)
log_record_zstd_level = 1
log_record_bytes_max = 64 * 1024**2
# a worker of a replicated node (--workers N) waits this long for its log keeper's first word
# before it gives up (the keeper's own start is bounded by cluster_start_seconds and the log's
# connection timeouts)
keeper_wait_seconds = 90.0

# ---- processes
workers_max = 64  # --workers (0: one per core)
drain_seconds = 5.0  # after SIGTERM: health NOT_SERVING but still answering, this long

# ---- the metrics endpoint (server/exporter.py, a process of its own)
metrics_read_seconds_max = 5.0  # to send a whole request (and TLS handshake) after connecting
metrics_connections_max = 64  # open at once; beyond it a new connection is closed at once

# ---- connections (grpc's keep_alive example): every connection has a bounded life
connection_idle_seconds_max = 300  # an idle connection is closed (GOAWAY) after this
connection_age_seconds_max = 3600  # and any connection after this, so clients re-balance
connection_age_grace_seconds = 30  # calls in progress get this long to finish
keepalive_seconds = 60  # the server pings an idle peer; a dead one is dropped
keepalive_timeout_seconds = 20
streams_per_connection_max = 128  # concurrent calls on one connection

# ---- storage
lmdb_map_size = 8 * 1024**3  # bytes of address space; grows on disk only as used
# The writer doubles the map when it is this full, up to lmdb_map_size_max (--map-size-max-mib)
lmdb_map_grow_at = 0.8
lmdb_map_size_max = 1024**4
# health NOT_SERVING when this much of lmdb_map_size_max is used (--map-high-water)
lmdb_map_high_water = 0.9
lmdb_max_dbs = 32
lmdb_max_readers = 512
writer_group_max = 512  # commands folded into one write transaction (one fsync)
# Commands waiting for the writer; more are refused RESOURCE_EXHAUSTED, never queued without
# end. A few seconds of the writer's work at its measured group-commit rate.
writer_queue_max = 65_536
writer_idle_seconds = 1.0  # an idle writer runs its periodic jobs (the hold sweep) this often
# A periodic job that fails this many times in a row turns health NOT_SERVING (the archive's
# move: the metric yikatong_archive_failing only, a warning).
periodic_failures_max = 3

# ---- the archive (issue 26; storage/archive.py): records older than --retain-days leave LMDB
# for segments in data_dir/archive/, in the writer's periodic group. 400 days: every dispute
# and the year's fund audit are answered from the hot store (docs/DECISIONS.md, "Data
# lifecycle"); 0 keeps everything hot. The law's record-keeping is the archive's, never deleted.
retain_days = 400
retain_days_max = 36_500
# records of each kind (change events, audit events, transfers, remembered answers) moved into
# one segment, one segment per periodic group: the writer is held for one segment's work
archive_batch_max = 2_000
archive_zstd_level = 9
archive_segment_bytes_max = 64 * 1024**2  # a segment's records, uncompressed: refused beyond

# ---- time: the manual clock moves only within these (unix seconds, 1970 to 2200), so every
# deadline computed from it stays far from int64's end and from datetime's year 9999.
time_min = 0
time_max = 7_258_089_600  # 2200-01-01T00:00:00+08:00

# ---- law
temp_loss_valid_days = 5  # SH-18b: a temporary loss report is valid 5 days (SPEC.md section 6)
# SH-20: the longest validity a bank's loss rules may give its reports (the file is refused
# beyond it: a typo of days for something else would freeze a card for years)
bank_loss_valid_days_max = 3660
rc_valid_years = 1  # RC-14
rc_residence_months_min = 6  # RC-9

# The time zone the regulations count days in.
law_utc_offset_seconds = 8 * 3600

# SH-30: a card generation's retirement moment (unix seconds), after which its cards decline
# GENERATION_RETIRED. Generation 1 lacked the SH-5 basic functions and was discontinued from
# 2020-12-31 (00:00 Shanghai time). Cards issued now carry model.GENERATION_CURRENT.
generation_retired_at = {1: 1609344000}


# SH-24, GZ-27, RC-33: what a card made again costs the holder (fen), recorded as owed in the
# replacement's transaction (yikatong.cards._charge_fee). SH-24: free. EXAMPLE VALUES for GZ,
# BJ and RC, NOT THE OFFICIAL ONES: the real costs are set by the price authorities.
replacement_fee_fen = {Pack.SH: 0, Pack.GZ: 2000, Pack.BJ: 2000, Pack.RC: 2000}
fee_account = "op:fees"
fee_owed_account = "op:fees-owed"

# Card-number prefixes per pack (the rest is a 10-digit sequence).
pack_card_prefix = {Pack.SH: "31", Pack.GZ: "44", Pack.BJ: "11", Pack.RC: "90"}
# SH-31, GZ-35: an electronic card's number: the pack's prefix, "9", a 15-digit sequence (a
# physical card's has 12 digits, so the two never meet).
ecard_number_digits = 18

# ---- money (integer fen)
amount_fen_max = 10**11  # one transfer: 1 billion yuan; keeps every sum far from int64's end
operator_name_bytes_max = 39  # "op:<name>", UTF-8
holds_per_account_max = 64  # open holds on one account (a purse tapped in at many gates is a bug)
hold_timeout_seconds_max = 30 * 86400
hold_sweep_max = 10_000  # holds released by one periodic sweep
# issue 28: a journey settled at its max fare when its tap-in hold timed out is corrected to
# the real fare by a tap-out within this many seconds of the settlement (serve
# --journey-grace-seconds); a day covers a journey's end the operator reconciles overnight
journey_grace_seconds = 86_400
journey_grace_seconds_max = 30 * 86_400
# Channel -> (debited holder account kind, default payee operator, default hold timeout s).
# TRANSIT: a tap-in holds the maximum fare for a journey; MEDICAL: pre-authorisation.
channel_money: dict[int, tuple[int, str, int]] = {  # keyed by Channel
    Channel.TRANSIT: (AccountKind.TRANSIT, "op:transit", 4 * 3600),
    Channel.MEDICAL: (AccountKind.MEDICAL, "op:medical", 72 * 3600),
    Channel.BENEFIT: (AccountKind.BENEFIT, "op:benefit-drawl", 3600),
}
