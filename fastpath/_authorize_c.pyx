# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The authorization decision in Cython: the same table as _authorize_py.py, rule for rule,
reading the card record's first 24 bytes in place (offsets: storage/records.py). No Python
objects are made per call. It never grows a rule the reference lacks."""
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy


cdef enum:
    RECORD_SIZE = 136
    RECORD_VERSION = 2
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
    CH_FINANCIAL = 4
    CH_SERVICE = 5
    FLAG_TRANSIT = 1
    FLAG_FINANCIAL_OPEN = 2
    FLAG_FINANCIAL_FROZEN = 4

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


cdef int c_decide(Policy policy, const uint8_t* rec, Py_ssize_t n, int channel, int64_t now,
                  int points_required, int64_t amount, int64_t available) noexcept:
    if n != RECORD_SIZE or rec[0] != RECORD_VERSION or rec[1] < 1 or rec[1] > 4 \
            or rec[2] < 1 or rec[2] > 9:
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
    if state == ISSUED and not financial:
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
    if financial and (flags & FLAG_FINANCIAL_FROZEN):
        return 12
    if channel == CH_SERVICE and pack == PACK_RC \
            and <int>(rec[6] | (rec[7] << 8)) < points_required:
        return 13
    if amount > available:
        return 14
    return 0


def decide(Policy policy, record, int channel, int64_t now, int points_required,
           int64_t amount=0, int64_t available=0):
    """See _authorize_py.decide."""
    if record is None:
        return 1
    cdef const uint8_t[::1] view
    if isinstance(record, bytes):
        return c_decide(policy, <const uint8_t*><char*>record, len(<bytes>record), channel,
                        now, points_required, amount, available)
    view = record
    if view.shape[0] == 0:
        return -1
    return c_decide(policy, &view[0], view.shape[0], channel, now, points_required, amount,
                    available)
