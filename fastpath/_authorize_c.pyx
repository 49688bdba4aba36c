# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The authorization decision in Cython: the same table as _authorize_py.py, rule for rule,
reading the card record's first 24 bytes in place (offsets: storage/records.py). No Python
objects are made per call. It never grows a rule the reference lacks."""
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy


cdef enum:
    RECORD_SIZE = 136
    RECORD_VERSION = 2
    OFF_HOLDER_ID = 24  # storage/records.py
    PACK_GZ = 2
    PACK_BJ = 3
    PACK_RC = 4
    APPLIED = 1
    VERIFIED = 2
    REJECTED = 3
    ISSUED = 4
    TEMP_LOSS = 6
    LOST = 7
    SUPERSEDED = 8
    CANCELLED = 9
    CH_TRANSIT = 1
    CH_MEDICAL = 2
    CH_BENEFIT = 3
    CH_FINANCIAL = 4
    CH_SERVICE = 5
    FLAG_TRANSIT = 1
    FLAG_FINANCIAL_OPEN = 2
    FLAG_FINANCIAL_FROZEN = 4
    FLAG_UNACTIVATED = 32

APPROVED = 0
CORRUPT = -1


cdef class Policy:
    """See _authorize_py.Policy."""
    cdef int64_t retired_at[256]

    def __init__(self, dict generation_retired_at):
        cdef int i
        for i in range(256):
            self.retired_at[i] = 0
        for generation, moment in generation_retired_at.items():
            self.retired_at[<uint8_t>generation] = moment


cdef inline int64_t _i64(const uint8_t* p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)  # records are little-endian; so is every machine we build for
    return v


cdef inline bint _valid(const uint8_t* rec, Py_ssize_t n) noexcept nogil:
    """records.check: the layout's size, version, and a known pack and state."""
    return n == RECORD_SIZE and rec[0] == RECORD_VERSION and 1 <= rec[1] <= 4 \
        and 1 <= rec[2] <= 9


cdef inline void _holder_key(const uint8_t* rec, uint8_t* key) noexcept nogil:
    """The card's holder id as the store's keys hold it (big-endian; the record: little)."""
    cdef int k
    for k in range(8):
        key[k] = rec[OFF_HOLDER_ID + 7 - k]


cdef int c_decide(Policy policy, const uint8_t* rec, Py_ssize_t n, int channel, int64_t now,
                  int points_required, int64_t amount, int64_t available,
                  int64_t bank_loss_until) noexcept:
    if not _valid(rec, n):
        return -1
    cdef uint8_t pack = rec[1]
    cdef uint8_t state = rec[2]
    cdef uint8_t flags = rec[3]
    cdef bint financial = channel == CH_FINANCIAL
    cdef int64_t moment
    if state == SUPERSEDED:
        return 2
    if state == CANCELLED:
        return 3
    moment = policy.retired_at[rec[4]]
    if moment != 0 and now >= moment:
        return 4
    if state == APPLIED or state == VERIFIED or state == REJECTED:
        return 5
    if not financial and (state == ISSUED or (state == TEMP_LOSS and (flags & FLAG_UNACTIVATED)
                                               and now >= _i64(rec + 8))):
        return 6
    if state == LOST and (not financial or pack == PACK_GZ or pack == PACK_BJ):
        return 7
    if state == TEMP_LOSS and not financial and now < _i64(rec + 8):
        return 8
    if pack == PACK_RC and _i64(rec + 16) != 0 and now >= _i64(rec + 16):
        return 9
    if channel >= 0 and channel < 8 and (rec[5] & (1 << channel)):
        return 10
    if channel == CH_TRANSIT and not (flags & FLAG_TRANSIT):
        return 11
    if financial and not (flags & FLAG_FINANCIAL_OPEN):
        return 11
    if pack == PACK_RC and (channel == CH_MEDICAL or channel == CH_BENEFIT):
        return 11  # RC-6
    if financial and (flags & FLAG_FINANCIAL_FROZEN) \
            and (bank_loss_until == 0 or now < bank_loss_until):  # SH-20
        return 12
    if channel == CH_SERVICE and points_required \
            and (pack != PACK_RC or <int>(rec[6] | (rec[7] << 8)) < points_required):
        return 13  # RC-20
    if amount > available:
        return 14
    return 0


def decide(Policy policy, record, int channel, int64_t now, int points_required,
           int64_t amount=0, int64_t available=0, int64_t bank_loss_until=0):
    """See _authorize_py.decide."""
    if record is None:
        return 1
    cdef const uint8_t[::1] view
    if isinstance(record, bytes):
        return c_decide(policy, <const uint8_t*><char*>record, len(<bytes>record), channel,
                        now, points_required, amount, available, bank_loss_until)
    view = record
    if view.shape[0] == 0:
        return -1
    return c_decide(policy, &view[0], view.shape[0], channel, now, points_required, amount,
                    available, bank_loss_until)


# ---------------------------------------------------------------------------- the wire path
#
# Status-only authorizations and status batches from the request's wire bytes to the
# response's, with no protobuf object in between (server/app.py registers these methods with
# bytes in and out). A request is taken here only when it is plainly valid and moves no money:
# every string ASCII and printable (card numbers digits), every known field in its own wire
# type, the channel one the caller's role may use, no money field set, a batch of 1 to
# batch_size_max. Anything else returns None, and the Python path (the reference) decodes it,
# validates it and answers or refuses it, so every error and its message is the Python path's.
# The answer for a request taken here is byte for byte what the Python path would serialize.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    ID_MAX = 64  # config.request_id_bytes_max
    CARD_MAX = 20  # records.CARD_NUMBER_BYTES (config.card_number_length_max)
    ECARD_DIGITS = 18  # config.ecard_number_digits
    CHANNEL_MAX = 6
    REASONS = 15  # server.metrics.REASONS: APPROVED and the 14 declines
    SPLIT = 21  # AuthorizeRequest.split (issue 28 item 2): a split tap is the Python path's


cdef uint64_t TAG_MAX = 0xffffffff  # the largest tag: field number 2**29 - 1


cdef struct Req:
    const uint8_t* rid
    Py_ssize_t rid_n
    const uint8_t* card
    Py_ssize_t card_n
    const uint8_t* code
    Py_ssize_t code_n
    int channel


cdef inline Py_ssize_t _varint(const uint8_t* p, Py_ssize_t i, Py_ssize_t end,
                               uint64_t* out) noexcept nogil:
    """The varint at p[i]: the index after it, or -1 (cut short, or longer than 10 bytes)."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while i < end and shift < 70:
        b = p[i]
        i += 1
        v |= (<uint64_t>(b & 0x7f)) << shift
        if not (b & 0x80):
            out[0] = v
            return i
        shift += 7
    return -1


cdef inline Py_ssize_t _varint32(const uint8_t* p, Py_ssize_t i, Py_ssize_t end,
                                 uint64_t* out) noexcept nogil:
    """A tag or a length: a varint of at most 5 bytes, as protobuf reads them (a longer one
    is corrupt wire format to it, so -1 here: the Python path says so)."""
    cdef Py_ssize_t after = _varint(p, i, end, out)
    return after if after - i <= 5 else -1


cdef inline Py_ssize_t _skip(const uint8_t* p, Py_ssize_t i, Py_ssize_t end,
                             int wire_type) noexcept nogil:
    """Past an unknown field's value, as protobuf skips it: the index after, or -1."""
    cdef uint64_t n
    if wire_type == 0:
        return _varint(p, i, end, &n)
    if wire_type == 1:
        return i + 8 if i + 8 <= end else -1
    if wire_type == 5:
        return i + 4 if i + 4 <= end else -1
    if wire_type == 2:
        i = _varint32(p, i, end, &n)
        if i < 0 or n > <uint64_t>(end - i):
            return -1
        return i + <Py_ssize_t>n
    return -1  # groups (3, 4) and the undefined 6, 7: the Python path says what is wrong


cdef inline bint _ascii(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        if s[k] & 0x80:
            return False
    return True


cdef inline bint _printable(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        if s[k] < 0x20 or s[k] > 0x7e:
            return False
    return True


cdef inline bint _digits(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    if n < 1 or n > CARD_MAX:
        return False
    for k in range(n):
        if s[k] < 0x30 or s[k] > 0x39:
            return False
    return True


cdef bint _request(const uint8_t* p, Py_ssize_t i, Py_ssize_t end, Req* r,
                   uint32_t channels) noexcept nogil:
    """One AuthorizeRequest in p[i:end], into `r`: True when it is plainly valid, moves no
    money and its channel is one of `channels` (bit 1 << channel)."""
    cdef uint64_t key, v, n
    cdef int field, wire_type
    cdef const uint8_t* term = NULL
    cdef Py_ssize_t term_n = 0
    r.rid, r.rid_n, r.card, r.card_n, r.code, r.code_n, r.channel = NULL, 0, NULL, 0, NULL, 0, 0
    while i < end:
        i = _varint32(p, i, end, &key)
        if i < 0 or key > TAG_MAX:
            return False
        field, wire_type = <int>(key >> 3), <int>(key & 7)
        if field == 0:
            return False
        if field in (1, 2, 5, 6, 8, 9):  # strings: the last one wins, as in protobuf
            if wire_type != 2:
                return False
            i = _varint32(p, i, end, &n)
            if i < 0 or n > <uint64_t>(end - i) or not _ascii(p + i, <Py_ssize_t>n):
                return False  # protobuf checks every occurrence's UTF-8, not only the last
            if field == 1:
                r.rid, r.rid_n = p + i, <Py_ssize_t>n
            elif field == 2:
                r.card, r.card_n = p + i, <Py_ssize_t>n
            elif field == 5:
                term, term_n = p + i, <Py_ssize_t>n
            elif field == 9:
                r.code, r.code_n = p + i, <Py_ssize_t>n
            elif n:  # payee_account (6), hold_request_id (8): money
                return False
            i += <Py_ssize_t>n
        elif field in (3, 4, 7, 10, 16, 17):  # channel; amount_fen, phase,
            # hold_timeout_seconds; max_fare_fen, on_timeout (issue 28): money
            if wire_type != 0:
                return False
            i = _varint(p, i, end, &v)
            if i < 0:
                return False
            if field == 3:
                if v < 1 or v > CHANNEL_MAX:
                    return False
                r.channel = <int>v
            elif v:
                return False
        elif field == SPLIT:
            return False
        else:
            i = _skip(p, i, end, wire_type)
            if i < 0:
                return False
    return (0 < r.rid_n <= ID_MAX and _printable(r.rid, r.rid_n) and _digits(r.card, r.card_n)
            and r.channel != 0 and (channels >> r.channel) & 1
            and term_n <= ID_MAX and _printable(term, term_n)
            and r.code_n <= ID_MAX and _printable(r.code, r.code_n))


cdef inline Py_ssize_t _put_varint(uint8_t* out, Py_ssize_t o, uint64_t v) noexcept nogil:
    while v >= 0x80:
        out[o] = <uint8_t>(v | 0x80)
        v >>= 7
        o += 1
    out[o] = <uint8_t>v
    return o + 1


cdef inline Py_ssize_t _put_string(uint8_t* out, Py_ssize_t o, int field, const uint8_t* s,
                                   Py_ssize_t n) noexcept nogil:
    if n == 0:
        return o
    out[o] = <uint8_t>((field << 3) | 2)
    o = _put_varint(out, o + 1, <uint64_t>n)
    memcpy(out + o, s, n)
    return o + n


cdef inline Py_ssize_t _put_answer(uint8_t* out, Py_ssize_t o, Req* r, int reason) noexcept nogil:
    """An AuthorizeResponse: request_id, decision, reason (none on an approval)."""
    o = _put_string(out, o, 1, r.rid, r.rid_n)
    out[o] = 0x10
    out[o + 1] = 1 if reason == 0 else 2
    o += 2
    if reason:
        out[o] = 0x18
        out[o + 1] = <uint8_t>reason
        o += 2
    return o


cdef Py_ssize_t _entries(const uint8_t* p, Py_ssize_t end, bint card_numbers) noexcept nogil:
    """How many field-1 entries a batch holds (AuthorizeBatchRequest.requests,
    GetStatusBatchRequest.card_numbers, each a card number when `card_numbers`), unknown
    fields skipped; -1 when it is not plainly such a batch."""
    cdef Py_ssize_t i = 0, count = 0
    cdef uint64_t key, n
    while i < end:
        i = _varint32(p, i, end, &key)
        if i < 0 or key > TAG_MAX or (key >> 3) == 0:
            return -1
        if key == 0x0a:
            i = _varint32(p, i, end, &n)
            if i < 0 or n > <uint64_t>(end - i) \
                    or (card_numbers and not _digits(p + i, <Py_ssize_t>n)):
                return -1
            i += <Py_ssize_t>n
            count += 1
        elif (key >> 3) == 1:
            return -1
        else:
            i = _skip(p, i, end, <int>(key & 7))
            if i < 0:
                return -1
    return count


cdef object _record(object get, const uint8_t* number, Py_ssize_t n, object cards,
                    object ecards, object holder_cards):
    """The record a use of `number` is decided on (Book.use_bytes): the card's own, or for
    an electronic card its holder's current card's."""
    cdef bytes key = PyBytes_FromStringAndSize(<const char*>number, n)
    if n != ECARD_DIGITS:
        return get(key, None, cards)
    found = get(key, None, ecards)
    if found is None:
        return None
    current = get(bytes(found[:9]), None, holder_cards)
    return None if current is None else get(bytes(current), None, cards)


cdef object _bank_loss_end(object get, const uint8_t* number, Py_ssize_t n, object ecards,
                           object holder_cards, object bank_losses):
    """SH-20: the stored end of the bank loss report on the card a use of `number` is decided
    on (Book.bank_loss_end), as its raw value; None when none is stored (it stands until
    cancelled). Read only on the rare path: FINANCIAL on a card whose report flag is set."""
    key = PyBytes_FromStringAndSize(<const char*>number, n)
    if n == ECARD_DIGITS:
        found = get(key, None, ecards)
        if found is None:
            return None
        key = get(bytes(found[:9]), None, holder_cards)
        if key is None:
            return None
    return get(bytes(key), None, bank_losses)


cdef int _other_cards(object get, object cards, object holder_cards, const uint8_t* rec,
                     int64_t now) except -2:
    """authorize.other_cards (cards.account_stopped) for a card the table left usable at
    MEDICAL or BENEFIT: the holder's current SH, GZ and BJ cards but its own pack's, in that
    order; the first lost (7) or frozen (8) one answers, 0 if none. -1: the Python path
    decides (a cancelled card, whose ground is a text; a record it would refuse)."""
    cdef uint8_t key[9]
    cdef uint8_t pack, state
    cdef const uint8_t* other
    _holder_key(rec, key)  # holder_cards keys: the holder id and a pack
    for pack in range(1, 4):  # Pack.SH, GZ, BJ (cards._ACCOUNT_PACKS)
        if pack == rec[1]:
            continue
        key[8] = pack
        number = get(PyBytes_FromStringAndSize(<const char*>key, 9), None, holder_cards)
        if number is None:
            continue
        record = get(bytes(number), None, cards)
        if record is None:
            continue
        other = <const uint8_t*>PyBytes_AS_STRING(record)
        if not _valid(other, PyBytes_GET_SIZE(record)):
            return -1
        state = other[2]
        if state == LOST:
            return 7
        if state == TEMP_LOSS and now < _i64(other + 8):
            return 8
        if state == CANCELLED:
            return -1
    return 0


cdef object _decide_all(Policy policy, const uint8_t* p, Req* reqs, Py_ssize_t count,
                        bint batch, object get, object cards, object ecards,
                        object holder_cards, int64_t now, object points_required,
                        object tally, object bank_losses):
    cdef Py_ssize_t k, o = 0, size = 16
    cdef int reason, need, stop
    cdef int counts[(CHANNEL_MAX + 1) * REASONS]
    cdef uint8_t* out
    cdef uint8_t inner[ID_MAX + 16]
    cdef Py_ssize_t inner_n
    cdef const uint8_t* rec
    for k in range(count):
        size += reqs[k].rid_n + 16
    out = <uint8_t*>PyMem_Malloc(size)
    if out == NULL:
        raise MemoryError()
    try:
        for k in range((CHANNEL_MAX + 1) * REASONS):
            counts[k] = 0
        for k in range(count):
            record = _record(get, reqs[k].card, reqs[k].card_n, cards, ecards, holder_cards)
            need = 0
            if reqs[k].channel == CH_SERVICE:
                need = points_required(PyBytes_FromStringAndSize(
                    <const char*>reqs[k].code, reqs[k].code_n).decode("ascii"))
            if record is None:
                reason = 1
            else:
                reason = c_decide(policy, <const uint8_t*>PyBytes_AS_STRING(record),
                                  PyBytes_GET_SIZE(record), reqs[k].channel, now, need, 0, 0,
                                  0)
                if reason < 0:
                    return None  # a corrupt record: the Python path refuses it
                if reason == 12 and bank_losses is not None:  # SH-20: has it lapsed?
                    end = _bank_loss_end(get, reqs[k].card, reqs[k].card_n, ecards,
                                         holder_cards, bank_losses)
                    if end is not None:
                        end = bytes(end)
                        if len(end) != 8:
                            return None  # corrupt: the Python path refuses it
                        reason = c_decide(policy, <const uint8_t*>PyBytes_AS_STRING(record),
                                          PyBytes_GET_SIZE(record), reqs[k].channel, now,
                                          need, 0, 0,
                                          _i64(<const uint8_t*>PyBytes_AS_STRING(end)))
                if (reason == 0 or reason == 10) and (reqs[k].channel == CH_MEDICAL
                                                      or reqs[k].channel == CH_BENEFIT):
                    stop = _other_cards(get, cards, holder_cards,
                                        <const uint8_t*>PyBytes_AS_STRING(record), now)
                    if stop < 0:
                        return None  # the Python path decides
                    if stop:
                        reason = stop
            counts[reqs[k].channel * REASONS + reason] += 1
            if batch:
                inner_n = _put_answer(inner, 0, &reqs[k], reason)
                out[o] = 0x0a
                o = _put_varint(out, o + 1, <uint64_t>inner_n)
                memcpy(out + o, inner, inner_n)
                o += inner_n
            else:
                o = _put_answer(out, o, &reqs[k], reason)
        for k in range((CHANNEL_MAX + 1) * REASONS):
            if counts[k]:
                tally[k] += counts[k]
        return PyBytes_FromStringAndSize(<const char*>out, o)
    finally:
        PyMem_Free(out)


def authorize_wire(Policy policy, bytes raw, bint batch, object get, object cards,
                   object ecards, object holder_cards, int64_t now, uint32_t channels,
                   object points_required, object tally, Py_ssize_t batch_max,
                   object bank_losses=None):
    """An AuthorizeBatchRequest (`batch`) or an AuthorizeRequest, as wire bytes, answered as
    the AuthorizeBatchResponse or AuthorizeResponse wire bytes; None when the Python path
    must take it. `get` is the read transaction's get(key, default, db); `channels` the
    caller's role's channels (bit 1 << channel); `tally` gets each decision counted at
    [channel * 15 + reason]; `points_required(service_code)` the RC-20 gate; `bank_losses`
    the database of SH-20's stored ends (None: every bank loss report stands)."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(raw), i = 0, count = 0, start
    cdef uint64_t key, n
    cdef Req one
    cdef Req* reqs
    if len(tally) != (CHANNEL_MAX + 1) * REASONS:
        raise ValueError("tally must have a count per channel and reason")
    if not batch:
        if not _request(p, 0, end, &one, channels):
            return None
        return _decide_all(policy, p, &one, 1, False, get, cards, ecards, holder_cards, now,
                           points_required, tally, bank_losses)
    count = _entries(p, end, False)
    if count < 1 or count > batch_max:
        return None
    reqs = <Req*>PyMem_Malloc(count * sizeof(Req))
    if reqs == NULL:
        raise MemoryError()
    try:
        i, count = 0, 0
        while i < end:
            i = _varint32(p, i, end, &key)
            if key == 0x0a:
                i = _varint32(p, i, end, &n)
                start, i = i, i + <Py_ssize_t>n
                if not _request(p, start, i, &reqs[count], channels):
                    return None
                count += 1
            else:
                i = _skip(p, i, end, <int>(key & 7))
        return _decide_all(policy, p, reqs, count, True, get, cards, ecards, holder_cards, now,
                           points_required, tally, bank_losses)
    finally:
        PyMem_Free(reqs)


cdef enum:
    OFF_REPLACED_BY = 64  # storage/records.py
    OFF_REPLACES = 84
    OFF_BANK = 104
    BANK_BYTES = 32
    ACTIVE = 5


cdef inline Py_ssize_t _stripped(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """The length of a NUL-padded text field without its trailing NULs."""
    while n > 0 and s[n - 1] == 0:
        n -= 1
    return n


cdef Py_ssize_t _put_status(uint8_t* out, Py_ssize_t o, const uint8_t* number, Py_ssize_t n,
                            object record, Policy policy, int64_t now, object get,
                            object ecards, object holder_cards, object bank_losses,
                            object cards):
    """A CardStatusResponse as CardStatus._status makes it; -1 when the Python path must
    answer (a record it would refuse as corrupt)."""
    cdef const uint8_t* rec
    cdef int reason, stop
    cdef Py_ssize_t k, replaced_n
    cdef uint8_t state
    cdef bint frozen
    o = _put_string(out, o, 1, number, n)
    if record is None:
        out[o] = 0x28
        out[o + 1] = 1  # CARD_NOT_FOUND; found false
        return o + 2
    rec = <const uint8_t*>PyBytes_AS_STRING(record)
    reason = c_decide(policy, rec, PyBytes_GET_SIZE(record), CH_MEDICAL, now, 0, 0, 0, 0)
    if reason < 0:
        return -1
    if reason == 0 or reason == 10:  # as a debit: the holder's other cards (authorize)
        stop = _other_cards(get, cards, holder_cards, rec, now)
        if stop < 0:
            return -1
        if stop:
            reason = stop
    replaced_n = _stripped(rec + OFF_REPLACED_BY, CARD_MAX)
    if not _ascii(rec + OFF_REPLACED_BY, replaced_n) \
            or not _ascii(rec + OFF_REPLACES, _stripped(rec + OFF_REPLACES, CARD_MAX)):
        return -1
    k = _stripped(rec + OFF_BANK, BANK_BYTES)
    if not _ascii(rec + OFF_BANK, k):
        try:  # a bank's name in Chinese: decodable, as records.decode_card requires
            PyBytes_FromStringAndSize(<const char*>(rec + OFF_BANK), k).decode("utf-8")
        except UnicodeDecodeError:
            return -1
    state = rec[2]
    if state == TEMP_LOSS and now >= _i64(rec + 8):  # cards.effective_state: lapsed (SH-18b)
        state = ISSUED if rec[3] & FLAG_UNACTIVATED else ACTIVE
    out[o] = 0x10
    out[o + 1] = 1
    out[o + 2] = 0x18
    out[o + 3] = rec[1]
    out[o + 4] = 0x20
    out[o + 5] = state
    o += 6
    if reason:
        out[o] = 0x28
        out[o + 1] = <uint8_t>reason
        o += 2
    if rec[3] & FLAG_TRANSIT:
        out[o] = 0x30
        out[o + 1] = 1
        o += 2
    if rec[3] & FLAG_FINANCIAL_OPEN:
        out[o] = 0x38
        out[o + 1] = 1
        o += 2
    frozen = rec[3] & FLAG_FINANCIAL_FROZEN
    if frozen and bank_losses is not None:  # SH-20: cards.financial_frozen (lapsed?)
        end = _bank_loss_end(get, number, n, ecards, holder_cards, bank_losses)
        if end is not None:
            end = bytes(end)
            if len(end) != 8:
                return -1
            frozen = now < _i64(<const uint8_t*>PyBytes_AS_STRING(end))
    if frozen:
        out[o] = 0x40
        out[o + 1] = 1
        o += 2
    return _put_string(out, o, 9, rec + OFF_REPLACED_BY, replaced_n)


def status_wire(Policy policy, bytes raw, object get, object cards, object ecards,
                object holder_cards, int64_t now, Py_ssize_t batch_max,
                object bank_losses=None):
    """A GetStatusBatchRequest's wire bytes answered as the GetStatusBatchResponse's, or
    None when the Python path must take it (see authorize_wire)."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(raw), i = 0, count = 0, o = 0, size = 0
    cdef Py_ssize_t inner_n, at
    cdef uint64_t key, n
    cdef uint8_t inner[CARD_MAX + 64]
    cdef uint8_t* out
    count = _entries(p, end, True)
    if count < 1 or count > batch_max:
        return None
    out = <uint8_t*>PyMem_Malloc(count * (CARD_MAX + 64) + 16)
    if out == NULL:
        raise MemoryError()
    try:
        i = 0
        while i < end:
            i = _varint32(p, i, end, &key)
            if key != 0x0a:
                i = _skip(p, i, end, <int>(key & 7))
                continue
            i = _varint32(p, i, end, &n)
            at, i = i, i + <Py_ssize_t>n
            record = _record(get, p + at, <Py_ssize_t>n, cards, ecards, holder_cards)
            inner_n = _put_status(inner, 0, p + at, <Py_ssize_t>n, record, policy, now, get,
                                  ecards, holder_cards, bank_losses, cards)
            if inner_n < 0:
                return None
            out[o] = 0x0a
            o = _put_varint(out, o + 1, <uint64_t>inner_n)
            memcpy(out + o, inner, inner_n)
            o += inner_n
        return PyBytes_FromStringAndSize(<const char*>out, o)
    finally:
        PyMem_Free(out)


# ------------------------------------------------------------------- the wire path with money
#
# Authorizations that move money, from the request's wire bytes to compact commands the
# writer applies (server/services/authorization.py, `Authorization.debits`: the same domain
# logic as the Python path, yikatong.authorize.with_money and the Book), each with its request
# fingerprint computed as server/core.py's `fingerprint` does (the same bytes, so a request id
# remembered by either path replays on the other). A message is taken here only when every
# request in it is plainly valid and moves money: every string ASCII and printable, every
# known field in its own wire type, the channel one the caller's role may use and one that
# moves money, the money fields as server/validate.py requires them; anything else returns
# None and the Python path takes the whole message. _authorize_py.money_wire is its twin.

from cpython.unicode cimport PyUnicode_DecodeASCII

cdef enum:
    PHASE_HOLD = 1
    PHASE_POST = 2
    PHASE_VOID = 3
    OPERATOR_MAX = 39  # config.operator_name_bytes_max
    NUMBER_MAX = 9  # bytes of a varint taken here: a canonical one up to 2**63 - 1

cdef int64_t AMOUNT_MAX = 100_000_000_000  # config.amount_fen_max
cdef int64_t TIMEOUT_MAX = 30 * 86400  # config.hold_timeout_seconds_max


cdef struct Money:
    const uint8_t* s[10]  # the string fields by number (1, 2, 5, 6, 8, 9), the last wins
    Py_ssize_t n[10]
    int channel
    int phase
    int64_t amount
    int64_t timeout


cdef inline bint _operator(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """validate.operator's plain case: 'op:<name>', letters, digits, '-', '_', '.', ':'."""
    cdef Py_ssize_t k
    cdef uint8_t c
    if n < 4 or n > OPERATOR_MAX or s[0] != 0x6f or s[1] != 0x70 or s[2] != 0x3a:
        return False
    for k in range(3, n):
        c = s[k]
        if not ((c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5a)
                or (c >= 0x61 and c <= 0x7a) or c == 0x2d or c == 0x5f or c == 0x2e
                or c == 0x3a):
            return False
    return True


cdef bint _money(const uint8_t* p, Py_ssize_t i, Py_ssize_t end, Money* r, uint32_t channels,
                 uint32_t money_channels) noexcept nogil:
    """One AuthorizeRequest in p[i:end], into `r`: True when it is plainly valid (as
    validate.authorize_request and require_channel would pass it) and moves money."""
    cdef uint64_t key, v, n
    cdef int field, wire_type, k
    cdef Py_ssize_t after
    for k in range(10):
        r.s[k], r.n[k] = NULL, 0
    r.channel, r.phase, r.amount, r.timeout = 0, 0, 0, 0
    while i < end:
        i = _varint32(p, i, end, &key)
        if i < 0 or key > TAG_MAX:
            return False
        field, wire_type = <int>(key >> 3), <int>(key & 7)
        if field == 0:
            return False
        if field in (1, 2, 5, 6, 8, 9):
            if wire_type != 2:
                return False
            i = _varint32(p, i, end, &n)
            if i < 0 or n > <uint64_t>(end - i) or not _ascii(p + i, <Py_ssize_t>n):
                return False
            r.s[field], r.n[field] = p + i, <Py_ssize_t>n
            i += <Py_ssize_t>n
        elif field == 16 or field == 17:  # a journey's tap-in (issue 28): the Python path's
            return False
        elif field in (3, 4, 7, 10):
            if wire_type != 0:
                return False
            after = _varint(p, i, end, &v)
            if after < 0 or after - i > NUMBER_MAX:
                return False
            i = after
            if field == 3:
                if v < 1 or v > CHANNEL_MAX:
                    return False
                r.channel = <int>v
            elif field == 7:
                if v > PHASE_VOID:
                    return False
                r.phase = <int>v
            elif field == 4:
                if v > <uint64_t>AMOUNT_MAX:
                    return False
                r.amount = <int64_t>v
            else:
                if v > <uint64_t>TIMEOUT_MAX:
                    return False
                r.timeout = <int64_t>v
        elif field == SPLIT:
            return False
        else:
            i = _skip(p, i, end, wire_type)
            if i < 0:
                return False
    if not (0 < r.n[1] <= ID_MAX and _printable(r.s[1], r.n[1]) and _digits(r.s[2], r.n[2])
            and r.channel != 0 and (channels >> r.channel) & 1
            and (money_channels >> r.channel) & 1
            and r.n[5] <= ID_MAX and _printable(r.s[5], r.n[5])
            and r.n[9] <= ID_MAX and _printable(r.s[9], r.n[9])):
        return False
    if r.amount == 0 and r.phase == 0:
        return False  # moves no money: the status path's, or refused by the Python path
    if r.timeout and r.phase != PHASE_HOLD:
        return False
    if r.n[6] and not _operator(r.s[6], r.n[6]):
        return False
    if r.phase == PHASE_POST or r.phase == PHASE_VOID:
        if not (0 < r.n[8] <= ID_MAX and _printable(r.s[8], r.n[8])):
            return False
        if r.phase == PHASE_VOID and r.amount:
            return False
    elif r.n[8] or r.amount == 0:
        return False
    return True


cdef Py_ssize_t _canonical(uint8_t* out, Py_ssize_t o, Money* r) noexcept nogil:
    """The request as protobuf serializes it deterministically, unknown fields discarded:
    fields in number order, defaults left out."""
    o = _put_string(out, o, 1, r.s[1], r.n[1])
    o = _put_string(out, o, 2, r.s[2], r.n[2])
    out[o] = 0x18
    o = _put_varint(out, o + 1, <uint64_t>r.channel)
    if r.amount:
        out[o] = 0x20
        o = _put_varint(out, o + 1, <uint64_t>r.amount)
    o = _put_string(out, o, 5, r.s[5], r.n[5])
    o = _put_string(out, o, 6, r.s[6], r.n[6])
    if r.phase:
        out[o] = 0x38
        o = _put_varint(out, o + 1, <uint64_t>r.phase)
    o = _put_string(out, o, 8, r.s[8], r.n[8])
    o = _put_string(out, o, 9, r.s[9], r.n[9])
    if r.timeout:
        out[o] = 0x50
        o = _put_varint(out, o + 1, <uint64_t>r.timeout)
    return o


cdef inline str _text(const uint8_t* s, Py_ssize_t n):
    return PyUnicode_DecodeASCII(<const char*>s, n, NULL) if n else ""


cdef object _command(Py_ssize_t index, Money* r, bytes prefix, object sha256):
    """(index, request_id, card_number, channel, amount_fen, phase, hold_request_id,
    payee_account, hold_timeout_seconds, fingerprint): Authorization.debits' command."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(prefix) + 64, k, o
    for k in range(10):
        size += r.n[k]
    cdef uint8_t* buf = <uint8_t*>PyMem_Malloc(size)
    if buf == NULL:
        raise MemoryError()
    try:
        o = PyBytes_GET_SIZE(prefix)
        memcpy(buf, PyBytes_AS_STRING(prefix), o)
        o = _canonical(buf, o, r)
        fp = sha256(PyBytes_FromStringAndSize(<const char*>buf, o)).digest()
    finally:
        PyMem_Free(buf)
    return (index, _text(r.s[1], r.n[1]), _text(r.s[2], r.n[2]), r.channel, r.amount,
            r.phase, _text(r.s[8], r.n[8]), _text(r.s[6], r.n[6]), r.timeout, fp)


def money_wire(bytes raw, bint batch, uint32_t channels, uint32_t money_channels,
               Py_ssize_t batch_max, bytes prefix, object sha256):
    """An AuthorizeBatchRequest (`batch`) or an AuthorizeRequest, as wire bytes, every request
    in it moving money: the list of commands (see _command) in order, or None when the Python
    path must take the message. `channels`: the caller's role's channels, `money_channels`
    those that move money (bit 1 << channel); `prefix`: the fingerprint's
    f"{client.id}\\0Authorize\\0" in UTF-8; `sha256`: hashlib.sha256."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(raw), i = 0, count = 0, start
    cdef uint64_t key, n
    cdef Money one
    if not batch:
        if not _money(p, 0, end, &one, channels, money_channels):
            return None
        return [_command(0, &one, prefix, sha256)]
    count = _entries(p, end, False)
    if count < 1 or count > batch_max:
        return None
    out = []
    while i < end:
        i = _varint32(p, i, end, &key)
        if key == 0x0a:
            i = _varint32(p, i, end, &n)
            start, i = i, i + <Py_ssize_t>n
            if not _money(p, start, i, &one, channels, money_channels):
                return None
            out.append(_command(len(out), &one, prefix, sha256))
        else:
            i = _skip(p, i, end, <int>(key & 7))
    return out


def money_answer(str request_id, int reason, int64_t available):
    """The AuthorizeResponse's wire bytes for a decision with money, as protobuf serializes
    pb.AuthorizeResponse(request_id, decision, reason, available_fen)."""
    cdef bytes rid = request_id.encode("utf-8")
    cdef Py_ssize_t n = PyBytes_GET_SIZE(rid), o
    cdef uint8_t* out = <uint8_t*>PyMem_Malloc(n + 32)
    if out == NULL:
        raise MemoryError()
    try:
        o = _put_string(out, 0, 1, <const uint8_t*>PyBytes_AS_STRING(rid), n)
        out[o] = 0x10
        out[o + 1] = 1 if reason == 0 else 2
        o += 2
        if reason:
            out[o] = 0x18
            o = _put_varint(out, o + 1, <uint64_t>reason)
        if available:
            out[o] = 0x20
            o = _put_varint(out, o + 1, <uint64_t>available)  # two's complement, as int64
        return PyBytes_FromStringAndSize(<const char*>out, o)
    finally:
        PyMem_Free(out)


cdef int _reason(const uint8_t* p, Py_ssize_t end) noexcept nogil:
    """An AuthorizeResponse's reason (field 3; 0 when absent); -1 when it does not parse."""
    cdef Py_ssize_t i = 0
    cdef uint64_t key, v
    cdef int reason = 0
    while i < end:
        i = _varint32(p, i, end, &key)
        if i < 0 or (key >> 3) == 0:
            return -1
        if key == 0x18:
            i = _varint(p, i, end, &v)
            if i < 0:
                return -1
            reason = <int>v if v < REASONS else -1
        else:
            i = _skip(p, i, end, <int>(key & 7))
            if i < 0:
                return -1
    return reason


def money_answers(list answers, list commands, object tally, bint batch):
    """The writer's answers (AuthorizeResponse bytes, one per command) as the
    AuthorizeBatchResponse's wire bytes (`batch`) or the one AuthorizeResponse's, each decision
    counted in `tally` at [channel * 15 + reason] as the Python path counts them."""
    cdef Py_ssize_t k, size = 0, o = 0, n
    cdef int reason, channel
    cdef int counts[(CHANNEL_MAX + 1) * REASONS]
    cdef bytes answer
    cdef uint8_t* out
    if len(answers) != len(commands):
        raise ValueError("one answer per command")
    for k in range((CHANNEL_MAX + 1) * REASONS):
        counts[k] = 0
    for k in range(len(answers)):
        answer = answers[k]
        n = PyBytes_GET_SIZE(answer)
        reason = _reason(<const uint8_t*>PyBytes_AS_STRING(answer), n)
        channel = commands[k][3]
        if reason < 0 or channel < 1 or channel > CHANNEL_MAX:
            raise ValueError(f"answer {k} is not an AuthorizeResponse of a known channel")
        counts[channel * REASONS + reason] += 1
        size += n + 11
    for k in range((CHANNEL_MAX + 1) * REASONS):
        if counts[k]:
            tally[k] += counts[k]
    if not batch:
        return answers[0]
    out = <uint8_t*>PyMem_Malloc(size + 1)
    if out == NULL:
        raise MemoryError()
    try:
        for answer in answers:
            n = PyBytes_GET_SIZE(answer)
            out[o] = 0x0a
            o = _put_varint(out, o + 1, <uint64_t>n)
            memcpy(out + o, PyBytes_AS_STRING(answer), n)
            o += n
        return PyBytes_FromStringAndSize(<const char*>out, o)
    finally:
        PyMem_Free(out)


# ------------------------------------------------------------------ a fare in the writer
#
# issue 27: the writer's domain work for the commonest debit, a single-phase TRANSIT fare,
# compiled. The reference is the Python path (yikatong.authorize.with_money through
# Authorization.debits): Fares.fare writes exactly what it writes (every record's bytes, in
# the same order, into the same journal), held equal by tests/test_fares.py; anything else
# (a replay, a hold, a journey to tell, an electronic card, holds on the purse, a record the
# Python path would refuse or fail on) is left to the Python path: None, before anything is
# written. One refusal it makes itself, as the Python path makes it: a transfer id taken
# (EXISTS, after the held accounts changed: the command fails whole). Layouts:
# storage/records.py, storage/lmdb_store.py.

from yikatong.errors import CorruptRecord, TransferRefused


cdef enum:
    TRANSFER_VERSION = 3
    KIND_SINGLE_POSTED = 1 | 1 << 4  # TransferKind.SINGLE | TransferStatus.POSTED << 4
    HAS_DECISION = 4
    CHANGE_VERSION = 3
    CHANGE_TRANSFER = 2  # ChangeKind.TRANSFER
    CHANGED_BALANCE = 16  # Changed.BALANCE
    ANSWER_VERSION = 1
    AUDIT_VERSION = 2
    ACCOUNT_TRANSIT = 2  # AccountKind.TRANSIT
    ACCOUNT_KEY_MAX = 40  # model.ACCOUNT_KEY_BYTES_MAX
    DIGEST_BYTES = 16  # storage/archive.py


cdef inline Py_ssize_t _put_le(uint8_t* out, Py_ssize_t o, uint64_t v, int n) noexcept nogil:
    cdef int k
    for k in range(n):
        out[o + k] = (v >> (8 * k)) & 0xff
    return o + n


cdef inline bytes _be64(uint64_t v):
    cdef uint8_t b[8]
    cdef int k
    for k in range(8):
        b[k] = (v >> (8 * (7 - k))) & 0xff
    return PyBytes_FromStringAndSize(<const char*>b, 8)


cdef class Fares:
    """One money command's constants: its caller (role, and the audit event's texts but the
    card number, each as `records.audit_text` makes them), the store's databases, the audit
    trail's empty hash and the archived ids' prefix hash (copied per use)."""
    cdef Policy policy
    cdef int role
    cdef int rule_pack
    cdef bytes pre_canonical, pre_stored, post_canonical, post_stored
    cdef int algorithm
    cdef object audit_hash, id_hash, dbs, name_of, default_credit
    cdef object requests, answers, archived_ids, cards, transfers, changes, audit
    cdef object journeys_untold

    def __init__(self, Policy policy, int role, int rule_pack, tuple audit_texts,
                 int algorithm, object audit_hash, object id_hash, object dbs,
                 bytes default_credit):
        """`audit_texts`: ((canonical, stored) of the client id, role, method) and of the
        purpose, outcome and holder, each pair from records.audit_text."""
        if not 0 < rule_pack <= 127 or not 0 <= role <= 31:  # records.encode_decision's
            raise ValueError(f"rule pack {rule_pack}, role {role}")
        self.policy, self.role, self.rule_pack = policy, role, rule_pack
        self.pre_canonical = b"".join([t[0] for t in audit_texts[0]])
        self.pre_stored = b"".join([t[1] for t in audit_texts[0]])
        self.post_canonical = b"".join([t[0] for t in audit_texts[1]])
        self.post_stored = b"".join([t[1] for t in audit_texts[1]])
        self.algorithm, self.audit_hash, self.id_hash = algorithm, audit_hash, id_hash
        self.dbs, self.name_of, self.default_credit = dbs, dbs.name_of, default_credit
        self.requests, self.answers, self.archived_ids = dbs.requests, dbs.answers, \
            dbs.archived_ids
        self.cards, self.transfers, self.changes = dbs.cards, dbs.transfers, dbs.changes
        self.audit, self.journeys_untold = dbs.audit, dbs.journeys_untold

    cdef bint _put(self, object txn, object journal, bytes key, bytes value, object db,
                   bint append, bint overwrite) except -1:
        """Book._put: False for a key that exists (not `overwrite`)."""
        if not txn.put(key, value, False, overwrite, append, db):
            if append:  # LMDB says False for a key not after the last: a lost write
                raise CorruptRecord(f"{self.name_of[db].decode()} key {key.hex()} is not "
                                    "after the last; nothing of this command is written")
            return False
        if journal is not None:
            journal.append((self.name_of[db], key, value))
        return True

    def fare(self, object book, tuple c, int64_t now):
        """The answer's bytes for command `c` (Authorization.debits' compact form) decided,
        debited, audited and remembered in `book` (whose accounts are held:
        Book.hold_accounts); None, nothing written, when the Python path must take it."""
        if len(c) != 10 or c[3] != CH_TRANSIT or c[5] != 0 or type(c[1]) is not str \
                or type(c[2]) is not str or type(c[7]) is not str or type(c[9]) is not bytes:
            return None
        held = book._held
        if held is None or book.dbs is not self.dbs:
            return None
        cdef str request_id = c[1], card_number = c[2], payee = c[7]
        cdef int64_t amount = c[4]
        cdef bytes fingerprint = c[9]
        txn = book.txn
        cdef bytes rid = request_id.encode("utf-8")
        cdef Py_ssize_t nr = PyBytes_GET_SIZE(rid), nc = len(card_number)
        if nr == 0 or nr > ID_MAX or nc == ECARD_DIGITS or nc > CARD_MAX \
                or not card_number.isascii() or PyBytes_GET_SIZE(fingerprint) != 32 \
                or amount <= 0 or amount > AMOUNT_MAX:
            return None
        if txn.get(rid, None, self.requests) is not None:
            return None  # a replay (or ID_REUSED): the Python path answers it
        h = self.id_hash.copy()
        h.update(rid)
        if txn.get(h.digest()[:DIGEST_BYTES], None, self.archived_ids) is not None:
            return None  # an archived id: answered from its segment
        cdef bytes card = card_number.encode("ascii")
        record = txn.get(card, None, self.cards)
        if type(record) is not bytes:
            return None  # no such card
        cdef const uint8_t* rec = <const uint8_t*>PyBytes_AS_STRING(record)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(record)
        if not _valid(rec, n):
            return None  # not a valid record (records.check): the Python path says so
        cdef uint64_t holder_id
        memcpy(&holder_id, rec + OFF_HOLDER_ID, 8)
        cdef uint8_t key_b[10]  # model.holder_account_key: b"h", the holder id, the kind
        key_b[0] = ord("h")
        _holder_key(rec, key_b + 1)
        key_b[9] = ACCOUNT_TRANSIT
        cdef bytes debit = PyBytes_FromStringAndSize(<const char*>key_b, 10)
        if txn.get(debit, None, self.journeys_untold) is not None:
            return None  # a journey to tell (issue 28)
        d = book.account(debit)  # held: read once a command
        if d.debits_pending:
            return None  # holds on the purse: released first (ledger.settle)
        cdef object left_o = d.credits_posted - d.debits_posted
        cdef int64_t left = left_o
        cdef int reason = c_decide(self.policy, rec, n, CH_TRANSIT, now, 0, amount, left, 0)
        if reason < 0:
            return None  # corrupt: the Python path says so
        cdef bytes credit = b"o" + payee.encode("utf-8") if payee else self.default_credit
        cr = None
        if reason == 0:
            # a transfer of the narrow layout only (records.encode_transfer: amount and time
            # in a u32 each), between two accounts
            if amount > left or PyBytes_GET_SIZE(credit) > ACCOUNT_KEY_MAX \
                    or now < 0 or now > 0xffffffff or amount > 0xffffffff:
                return None
            cr = book.account(credit)
            if cr.credits_posted + amount > 0x7fffffffffffffff:
                return None  # OVERFLOWS_CREDITS, refused by the Python path
            if d.credits_pending < 0 or cr.debits_pending < 0 or cr.credits_pending < 0:
                return None  # a corrupt account: ledger._move's assertion refuses it
        journal = book.journal
        dbs = self.dbs
        cdef uint8_t buf[256]
        cdef Py_ssize_t o
        if reason == 0:
            # ledger._move: both accounts held (written at the command's end), the totals
            d.debits_posted += amount
            cr.credits_posted += amount
            changed = book._changed
            changed[debit] = None  # both held already (Book.account)
            changed[credit] = None
            dp, dpost, cp, cpost = book.add_to_ledger_totals(0, amount)
            assert dp == cp and dpost == cpost, "ledger totals out of balance"
            # the transfer (records.encode_transfer, narrow, with its decision)
            buf[0] = TRANSFER_VERSION
            buf[1] = KIND_SINGLE_POSTED
            buf[2] = CH_TRANSIT | self.role << 3
            buf[3] = HAS_DECISION
            o = _put_le(buf, 4, <uint64_t>amount, 4)
            o = _put_le(buf, o, <uint64_t>now, 4)
            buf[o] = 10
            buf[o + 1] = <uint8_t>PyBytes_GET_SIZE(credit)
            o += 2
            # records.encode_decision(rule_pack, record, left, asked 0)
            buf[o] = self.rule_pack
            buf[o + 1] = rec[2] | rec[1] << 4
            buf[o + 2], buf[o + 3], buf[o + 4] = rec[3], rec[4], rec[5]
            o += 5
            o = _put_varint(buf, o, <uint64_t>left)
            if rec[2] == TEMP_LOSS:
                memcpy(buf + o, rec + 8, 8)
                o += 8
            if rec[1] == PACK_RC:
                memcpy(buf + o, rec + 16, 8)
                o += 8
            value = PyBytes_FromStringAndSize(<const char*>buf, o) + debit + credit
            if not self._put(txn, journal, rid, value, self.transfers, False, False):
                raise TransferRefused("EXISTS", f"transfer {request_id!r} already exists")
            # its change event (records.encode_change)
            buf[0], buf[1], buf[2], buf[3], buf[4] = CHANGE_VERSION, CHANGE_TRANSFER, 0, 0, 0
            buf[5] = CHANGED_BALANCE
            o = _put_le(buf, 6, <uint64_t>now, 8)
            o = _put_le(buf, o, holder_id, 8)
            o = _put_le(buf, o, <uint64_t>amount, 8)
            buf[o] = <uint8_t>nc
            o += 1
            dbs.change_seq = seq = dbs.change_seq + 1
            self._put(txn, journal, _be64(seq),
                      PyBytes_FromStringAndSize(<const char*>buf, o) + card + rid, self.changes,
                      True, True)
            # the audit event (Book.append_audit: no purpose)
            seq, prev = dbs.audit_head
            seq += 1
            o = _put_le(buf, 0, <uint64_t>seq, 8)
            o = _put_le(buf, o, <uint64_t>now, 8)
            o = _put_le(buf, o, 1, 4)
            head = PyBytes_FromStringAndSize(<const char*>buf, o)
            buf[0] = <uint8_t>nc
            buf[1] = 0
            h = self.audit_hash.copy()
            h.update(prev)
            h.update(head + self.pre_canonical + PyBytes_FromStringAndSize(<const char*>buf, 2)
                     + card + self.post_canonical)
            digest = h.digest()
            buf[0], buf[1] = AUDIT_VERSION, self.algorithm
            buf[2] = <uint8_t>nc  # records._SHORT: the card number's one-byte length
            self._put(txn, journal, _be64(seq), PyBytes_FromStringAndSize(<const char*>buf, 2)
                      + digest + head + self.pre_stored
                      + PyBytes_FromStringAndSize(<const char*>buf + 2, 1) + card
                      + self.post_stored, self.audit, True, True)
            dbs.audit_head = (seq, digest)
            answer = money_answer(request_id, 0, left - amount)
        else:
            answer = money_answer(request_id, reason, left)
        # remembered (Book.remember)
        cdef int64_t t = dbs.now()
        if t < 0:
            t = 0
        buf[0] = ANSWER_VERSION
        o = _put_le(buf, 1, <uint64_t>t, 8)
        buf[o] = <uint8_t>nr
        memcpy(buf + o + 1, PyBytes_AS_STRING(fingerprint), 16)
        o += 17
        dbs.answer_seq = seq = dbs.answer_seq + 1
        key = _be64(seq)
        self._put(txn, journal, key, PyBytes_FromStringAndSize(<const char*>buf, o) + rid + answer,
                  self.answers, True, True)
        self._put(txn, journal, rid, key, self.requests, False, True)
        return answer


# ------------------------------------------------------------------ the replication record
#
# records.encode_journal, decode_journal and journal_size compiled (the twins, held to the
# same bytes, ops and errors by tests/test_fastpath.py): a writer encodes each commit group's
# puts and deletes, and every follower decodes every record. Layout: records.py, "A commit
# group's replication record".

cdef enum:
    JOURNAL_HEAD = 13  # <BQI: version, log sequence, count
    JOURNAL_PLAIN = 1  # the operations as they are (records.JOURNAL_PLAIN)
    JOURNAL_VERSION = 2  # ... compressed after the head, as written today
cdef uint64_t JOURNAL_DELETED = 0xFFFFFFFF  # a delete's value length (no C int enum holds it)


from yikatong.storage import records as _records


def journal_size(object ops):
    """records.journal_size(ops): a record's bytes before compression (the writer's bound
    on a record, counted a command at a time); anything else than a list of (bytes, bytes,
    bytes or None) goes to that twin."""
    cdef Py_ssize_t size = JOURNAL_HEAD
    cdef object name, key, value
    if type(ops) is not list:
        return _records.journal_size(ops)
    for op in ops:
        if type(op) is not tuple or len(<tuple>op) != 3:
            return _records.journal_size(ops)
        name, key, value = <tuple>op
        if type(name) is not bytes or type(key) is not bytes or (
                value is not None and type(value) is not bytes):
            return _records.journal_size(ops)
        size += 9 + PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(key)
        if value is not None:
            size += PyBytes_GET_SIZE(value)
    return size


def encode_journal(object seq, object ops):
    """records.encode_journal(seq, ops); anything else than a list of (bytes name, bytes key,
    bytes value or None for a delete) within their length fields and a sequence within a
    u64 goes to that twin (its bytes, or its error)."""
    twin = _records.encode_journal
    cdef Py_ssize_t size = JOURNAL_HEAD, o, n
    cdef object name, key, value
    if type(ops) is not list or type(seq) is not int or not 0 <= seq <= 0xFFFFFFFFFFFFFFFF \
            or len(ops) > 0xFFFFFFFF:
        return twin(seq, ops)
    for op in ops:
        if type(op) is not tuple or len(<tuple>op) != 3:
            return twin(seq, ops)
        name, key, value = <tuple>op
        if type(name) is not bytes or type(key) is not bytes or PyBytes_GET_SIZE(name) > 255 \
                or PyBytes_GET_SIZE(key) > 0xFFFFFFFE:
            return twin(seq, ops)
        size += 9 + PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(key)
        if value is not None:
            if type(value) is not bytes \
                    or <uint64_t>PyBytes_GET_SIZE(value) >= JOURNAL_DELETED:
                return twin(seq, ops)
            size += PyBytes_GET_SIZE(value)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    p[0] = JOURNAL_PLAIN  # then compressed as the version written today
    o = _put_le(p, 1, <uint64_t>seq, 8)
    o = _put_le(p, o, <uint64_t>len(ops), 4)
    for op in ops:
        name, key, value = <tuple>op
        n = PyBytes_GET_SIZE(name)
        p[o] = <uint8_t>n
        memcpy(p + o + 1, PyBytes_AS_STRING(name), n)
        o += 1 + n
        n = PyBytes_GET_SIZE(key)
        o = _put_le(p, o, <uint64_t>n, 4)
        memcpy(p + o, PyBytes_AS_STRING(key), n)
        o += n
        if value is None:
            o = _put_le(p, o, JOURNAL_DELETED, 4)
        else:
            n = PyBytes_GET_SIZE(value)
            o = _put_le(p, o, <uint64_t>n, 4)
            memcpy(p + o, PyBytes_AS_STRING(value), n)
            o += n
    return _records.seal_journal(out)


cdef inline uint64_t _le(const uint8_t* p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(n):
        v |= (<uint64_t>p[k]) << (8 * k)
    return v


def decode_journal(object record):
    """records.decode_journal(record): (log sequence, [(database name, key, value or None)]),
    or CorruptRecord with its messages."""
    cdef bytes raw = record if type(record) is bytes else bytes(record)
    if PyBytes_GET_SIZE(raw) >= 1 and (<const uint8_t*>PyBytes_AS_STRING(raw))[0] == JOURNAL_VERSION:
        raw = _records.unseal_journal(raw)  # compressed (records.JOURNAL_VERSION 2)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(raw), at, end
    cdef uint64_t count, n, k
    if size < JOURNAL_HEAD:
        raise CorruptRecord(f"replication record of {size} bytes is cut")
    if p[0] != JOURNAL_PLAIN:
        raise CorruptRecord(f"replication record version {p[0]}")
    seq = _le(p + 1, 8)
    count = _le(p + 9, 4)
    at = JOURNAL_HEAD
    ops = []
    for k in range(count):
        if at + 1 > size:
            raise CorruptRecord(f"replication record of {size} bytes is cut")
        end = at + 1 + p[at]
        if end + 4 > size:
            raise CorruptRecord(f"replication record of {size} bytes is cut")
        name = PyBytes_FromStringAndSize(<const char*>p + at + 1, end - at - 1)
        n = _le(p + end, 4)
        at = end + 4 + <Py_ssize_t>n
        if at + 4 > size:
            raise CorruptRecord(f"replication record of {size} bytes is cut")
        key = PyBytes_FromStringAndSize(<const char*>p + end + 4, <Py_ssize_t>n)
        n = _le(p + at, 4)
        if n == JOURNAL_DELETED:
            at += 4
            ops.append((name, key, None))
        else:
            if at + 4 + <Py_ssize_t>n > size:
                raise CorruptRecord(f"replication record of {size} bytes is cut")
            ops.append((name, key, PyBytes_FromStringAndSize(<const char*>p + at + 4,
                                                              <Py_ssize_t>n)))
            at += 4 + <Py_ssize_t>n
    if at != size:
        raise CorruptRecord(f"replication record has {size - at} bytes too many")
    return seq, ops


def apply_ops(object txn, list ops, dict by_name, Py_ssize_t start=0):
    """_authorize_py.apply_ops, compiled: Book.apply_journal's loop over a record's ops."""
    put, delete = txn.put, txn.delete
    cdef Py_ssize_t i, n = len(ops)
    for i in range(start, n):
        name, key, value = <tuple>ops[i]
        db = by_name.get(name)
        if db is None:
            return i
        if value is None:
            delete(key, b"", db)
        else:
            put(key, value, False, True, False, db)
    return n


def layout():
    """The constants Fares and the codec write with, and the wire path's limits, copied from
    the Python side: by their Python names, for tests/test_fares.py to hold equal to their
    sources."""
    return {
        "config.request_id_bytes_max": ID_MAX, "records.CARD_NUMBER_BYTES": CARD_MAX,
        "config.ecard_number_digits": ECARD_DIGITS, "config.amount_fen_max": AMOUNT_MAX,
        "config.hold_timeout_seconds_max": TIMEOUT_MAX, "records.TRANSFER_VERSION":
        TRANSFER_VERSION, "records.CHANGE_VERSION": CHANGE_VERSION,
        "records.ANSWER_VERSION": ANSWER_VERSION, "records.AUDIT_VERSION": AUDIT_VERSION,
        "records.VERSION": RECORD_VERSION, "records.SIZE": RECORD_SIZE,
        "records.OFF_HOLDER_ID": OFF_HOLDER_ID, "model.ACCOUNT_KEY_BYTES_MAX": ACCOUNT_KEY_MAX,
        "archive.DIGEST_BYTES": DIGEST_BYTES, "AccountKind.TRANSIT": ACCOUNT_TRANSIT,
        "Channel.TRANSIT": CH_TRANSIT, "ChangeKind.TRANSFER": CHANGE_TRANSFER,
        "Changed.BALANCE": CHANGED_BALANCE,
        "TransferKind.SINGLE | TransferStatus.POSTED << 4": KIND_SINGLE_POSTED,
        "State.TEMP_LOSS": TEMP_LOSS, "Pack.RC": PACK_RC,
        "records._HAS_DECISION": HAS_DECISION, "records._JOURNAL_HEAD.size": JOURNAL_HEAD,
        "records._DELETED": JOURNAL_DELETED, "records.JOURNAL_PLAIN": JOURNAL_PLAIN,
        "records.JOURNAL_VERSION": JOURNAL_VERSION,
    }
