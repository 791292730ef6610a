/*
 * media.webrtc._fastsend: one viewer's frame, SRTP-protected and sent, in
 * one call (issue 15: the fan-out's per packet-viewer cost).
 *
 * The pure-Python path (aiortc_adapter.FastPath.send_frame: _protect_with,
 * then send_runs) does per packet a buffer copy, a cffi call into libsrtp
 * and a slice, then builds a list, joins the runs and calls sendmsg with
 * a Python ancillary list. This does the same work with no Python object
 * per packet: each packet is copied into one static buffer, protected there
 * in place by libsrtp (the function and context pylibsrtp already holds,
 * passed in as addresses), and the frame goes out in runs of equal-size
 * datagrams, one sendmsg with UDP_SEGMENT (GSO) per run, the shorter last
 * datagram riding in its run, exactly as send_runs groups them.
 *
 * Optional, like the C speedups of websockets and aiohttp: when it is not
 * built (no compiler) or webrtc.c_fastpath is false, the Python path
 * runs and sends the same bytes (tests/unit/test_fastsend.py compares them).
 *
 * send_frame(protect, ctx, fd, sockaddr, ancillary, packets, gso, max_len)
 *   protect    address of libsrtp 2's srtp_protect(srtp_t, void *, int *)
 *   ctx        the srtp_t to protect with
 *   fd         a non-blocking UDP socket
 *   sockaddr   the destination as a struct sockaddr's bytes
 *   ancillary  a sequence of (level, type, bytes) every datagram carries
 *   packets    a list of RTP packets (bytes)
 *   gso        false: one datagram per sendmsg
 *   max_len    the longest packet the Python path protects (pylibsrtp's
 *              buffer less the trailer)
 * returns
 *   int        every datagram was sent: the bytes written
 *   None       this frame is not for this path (a packet that is not
 *              bytes or longer than max_len, or a frame larger than the
 *              buffers): nothing was protected; the Python path sends it,
 *              or raises what it always raised
 *   (sent, backlogged, any_sent, rest, code)
 *              otherwise. code > 0: srtp_protect failed with that status
 *              and nothing was sent; code < 0: sendmsg failed with errno
 *              -code (not EAGAIN) and ``rest`` holds the protected
 *              datagrams from the failed one on, to be sent by the Python
 *              path, which counts or raises that error as it always has.
 *              ``backlogged`` datagrams were dropped on a full buffer.
 *
 * Single-threaded by design: the GIL is held throughout (a sendmsg costs
 * less than releasing it), so one static buffer serves every call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

/* The same limits as aiortc_adapter's (a test checks they agree). */
#define GSO_MAX_SEGMENTS 64
#define GSO_MAX_BYTES 65000
/* libsrtp 2's SRTP_MAX_TRAILER_LEN: room protect may append. */
#define SRTP_TRAILER 144
#define MAX_PACKETS 512
/* media.rtp.rewrite._ENTRY: five int64s per NACK-map slot */
#define MAP_ENTRY 40
#define BUF_BYTES (1 << 20)
#define MAX_ANCILLARY 4
#define CONTROL_BYTES 256

typedef int (*srtp_protect_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

static unsigned char buf[BUF_BYTES];
static size_t offsets[MAX_PACKETS];
static int lengths[MAX_PACKETS];

/* Fill ``control`` with the ancillary items plus, when segment > 0, a
 * UDP_SEGMENT one. Returns its length, or -1 with an exception set. */
static Py_ssize_t
build_control(unsigned char *control, PyObject *ancillary, int segment)
{
    struct msghdr msg;
    struct cmsghdr *cmsg;
    Py_ssize_t i, n, used = 0;
    PyObject *seq;

    memset(control, 0, CONTROL_BYTES);
    memset(&msg, 0, sizeof(msg));
    msg.msg_control = control;
    msg.msg_controllen = CONTROL_BYTES;
    cmsg = CMSG_FIRSTHDR(&msg);
    if (segment > 0) {
        uint16_t size = (uint16_t)segment;
        cmsg->cmsg_level = SOL_UDP;
        cmsg->cmsg_type = UDP_SEGMENT;
        cmsg->cmsg_len = CMSG_LEN(sizeof(size));
        memcpy(CMSG_DATA(cmsg), &size, sizeof(size));
        used += CMSG_SPACE(sizeof(size));
        cmsg = CMSG_NXTHDR(&msg, cmsg);
    }
    if (ancillary == Py_None)
        return used;
    seq = PySequence_Fast(ancillary, "ancillary must be a sequence");
    if (seq == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_ANCILLARY) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many ancillary items");
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        int level, type;
        Py_buffer data;
        if (!PyArg_ParseTuple(item, "iiy*", &level, &type, &data)) {
            Py_DECREF(seq);
            return -1;
        }
        if (cmsg == NULL || used + (Py_ssize_t)CMSG_SPACE(data.len) > CONTROL_BYTES) {
            PyBuffer_Release(&data);
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "ancillary data too long");
            return -1;
        }
        cmsg->cmsg_level = level;
        cmsg->cmsg_type = type;
        cmsg->cmsg_len = CMSG_LEN(data.len);
        memcpy(CMSG_DATA(cmsg), data.buf, data.len);
        used += CMSG_SPACE(data.len);
        PyBuffer_Release(&data);
        cmsg = CMSG_NXTHDR(&msg, cmsg);
    }
    Py_DECREF(seq);
    return used;
}

/* One sendmsg of ``count`` datagrams starting at packet ``first`` (their
 * bytes are contiguous in buf). Returns 0 or an errno. */
static int
send_run(int fd, const void *addr, socklen_t addrlen, PyObject *ancillary, Py_ssize_t first,
         Py_ssize_t count, size_t nbytes, int *py_error)
{
    unsigned char control[CONTROL_BYTES];
    struct msghdr msg;
    struct iovec iov;
    Py_ssize_t clen;
    ssize_t rc;

    clen = build_control(control, ancillary, count > 1 ? lengths[first] : 0);
    if (clen < 0) {
        *py_error = 1;
        return 0;
    }
    iov.iov_base = buf + offsets[first];
    iov.iov_len = nbytes;
    memset(&msg, 0, sizeof(msg));
    msg.msg_name = (void *)addr;
    msg.msg_namelen = addrlen;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = clen ? control : NULL;
    msg.msg_controllen = (size_t)clen;
    do {
        rc = sendmsg(fd, &msg, 0);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? errno : 0;
}

/* Where and how a frame goes: the arguments both calls start with. */
typedef struct {
    srtp_protect_fn protect;
    void *ctx;
    int fd;
    int gso;
    char *addr;
    Py_ssize_t addrlen;
    Py_ssize_t max_len;
    PyObject *ancillary;
} destination;

#define DESTINATION_ARGS 7

/* protect, ctx, fd, sockaddr, ancillary, gso, max_len, then ``more``
 * arguments of the call ``name`` */
static int
parse_destination(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t more, const char *name, destination *d)
{
    long v;
    if (nargs != DESTINATION_ARGS + more) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, DESTINATION_ARGS + more);
        return -1;
    }
    d->protect = (srtp_protect_fn)PyLong_AsVoidPtr(args[0]);
    d->ctx = PyLong_AsVoidPtr(args[1]);
    if (d->protect == NULL || d->ctx == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "protect and ctx must not be NULL");
        return -1;
    }
    v = PyLong_AsLong(args[2]);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    d->fd = (int)v;
    if (PyBytes_AsStringAndSize(args[3], &d->addr, &d->addrlen) < 0)
        return -1;
    d->ancillary = args[4];
    d->gso = PyObject_IsTrue(args[5]);
    if (d->gso < 0)
        return -1;
    d->max_len = PyLong_AsSsize_t(args[6]);
    if (d->max_len == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* The answer when not everything went: (handled, sent, backlogged,
 * any_sent, rest, code); ``rest`` is stolen (may be NULL: None). */
static PyObject *
outcome(Py_ssize_t handled, Py_ssize_t sent, Py_ssize_t backlogged, int any_sent, PyObject *rest, int code)
{
    if (rest == NULL) {
        rest = Py_None;
        Py_INCREF(rest);
    }
    return Py_BuildValue("(nnniNi)", handled, sent, backlogged, any_sent, rest, code);
}

/* Send the ``n`` protected datagrams in buf (offsets/lengths) in runs, as
 * aiortc_adapter.send_runs groups them. ``handled`` is the caller's count
 * of packets, returned with the outcome. */
static PyObject *
send_prepared(const destination *d, Py_ssize_t n, Py_ssize_t handled, int all_handled)
{
    Py_ssize_t i = 0, j, sent = 0, backlogged = 0;
    int any_sent = 0, py_error = 0;

    while (i < n) {
        int size = lengths[i];
        size_t run_bytes = (size_t)size;
        int err;
        j = i + 1;
        if (d->gso && size > 0) {
            Py_ssize_t limit = GSO_MAX_BYTES / size;
            if (limit > GSO_MAX_SEGMENTS)
                limit = GSO_MAX_SEGMENTS;
            while (j < n && j - i < limit) {
                if (lengths[j] == size) {
                    run_bytes += (size_t)size;
                    j++;
                } else {
                    if (lengths[j] < size) {  /* the shorter last segment ends the run */
                        run_bytes += (size_t)lengths[j];
                        j++;
                    }
                    break;
                }
            }
        }
        err = send_run(d->fd, d->addr, (socklen_t)d->addrlen, d->ancillary, i, j - i, run_bytes, &py_error);
        if (py_error)
            return NULL;
        if (err == 0) {
            sent += (Py_ssize_t)run_bytes;
            any_sent = 1;
        } else if (err == EAGAIN || err == EWOULDBLOCK) {
            backlogged += j - i;
        } else {
            /* Hand the rest to the Python path: it counts or raises. */
            Py_ssize_t k;
            PyObject *rest = PyList_New(n - i);
            if (rest == NULL)
                return NULL;
            for (k = i; k < n; k++) {
                PyObject *datagram = PyBytes_FromStringAndSize((const char *)buf + offsets[k], lengths[k]);
                if (datagram == NULL) {
                    Py_DECREF(rest);
                    return NULL;
                }
                PyList_SET_ITEM(rest, k - i, datagram);
            }
            return outcome(handled, sent, backlogged, any_sent, rest, -err);
        }
        i = j;
    }
    if (backlogged == 0 && all_handled)
        return PyLong_FromSsize_t(sent);
    return outcome(handled, sent, backlogged, any_sent, NULL, 0);
}

/* The static buffers serve one call at a time. A call cannot re-enter
 * (nothing here runs Python code) unless a garbage collection triggered by
 * an allocation runs a finalizer that sends: then the inner call declines. */
static int busy;

static PyObject *
send_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    destination d;
    PyObject *packets, *result;
    Py_ssize_t n, i;
    size_t pos = 0;

    (void)module;
    if (parse_destination(args, nargs, 1, "send_frame", &d) < 0)
        return NULL;
    packets = args[DESTINATION_ARGS];
    if (!PyList_CheckExact(packets)) {
        PyErr_SetString(PyExc_TypeError, "packets must be a list");
        return NULL;
    }
    n = PyList_GET_SIZE(packets);
    if (n > MAX_PACKETS || busy)
        Py_RETURN_NONE;
    /* Room first, so that a frame that does not fit protects nothing. */
    for (i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i);
        if (!PyBytes_CheckExact(p) || PyBytes_GET_SIZE(p) > d.max_len)
            Py_RETURN_NONE;
        pos += (size_t)PyBytes_GET_SIZE(p) + SRTP_TRAILER;
    }
    if (pos > BUF_BYTES)
        Py_RETURN_NONE;

    /* Protect in place; protected datagrams lie back to back. */
    pos = 0;
    for (i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i);
        int len = (int)PyBytes_GET_SIZE(p);
        int status;
        memcpy(buf + pos, PyBytes_AS_STRING(p), (size_t)len);
        status = d.protect(d.ctx, buf + pos, &len);
        if (status != 0)
            return outcome(n, 0, 0, 0, NULL, status);
        offsets[i] = pos;
        lengths[i] = len;
        pos += (size_t)len;
    }
    busy = 1;
    result = send_prepared(&d, n, n, 1);
    busy = 0;
    return result;
}

/* Interned attribute names (module init). */
static PyObject *s_layer, *s_tmpl, *s_buf, *s_abs_off, *s_abs_top, *s_twcc_off, *s_twcc, *s_value, *s_mpt,
    *s_ts_off, *s_vseq, *s_lseq, *s_max_gap, *s_map, *s_mask, *s_last_vts, *s_last_now, *s_packets_sent,
    *s_octets_sent, *s_seq, *s_timestamp, *s_marker, *s_payload, *s_discontinuity;

/* Attribute access at a call site that always sees the same __slots__
 * class (Rewriter, its _Template, TransportSeq, LayerPacket, and the fan-out's
 * FrameLane, FastPath, DatagramSender, ViewerEgress, SessionStats): the slot's
 * offset is looked up once and read or written directly, as the member
 * descriptor would (perf: the generic lookups were ~9 % of a worker's CPU).
 * Any other object, or a slot that is not an object slot, takes the generic
 * path. The cached type is kept alive so that its address cannot be reused. */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset;
} attr_site;

static int
site_resolve(attr_site *site, PyObject *obj, PyObject *name, int for_write)
{
    PyTypeObject *type = Py_TYPE(obj);
    PyObject *descr = _PyType_Lookup(type, name);  /* borrowed */
    PyMemberDef *member;
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
        return 0;
    member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || (for_write && (member->flags & READONLY)))
        return 0;
    Py_INCREF(type);
    Py_XDECREF(site->type);
    site->type = type;
    site->offset = member->offset;
    return 1;
}

static PyObject *
site_get(attr_site *site, PyObject *obj, PyObject *name)
{
    if (Py_TYPE(obj) == site->type || site_resolve(site, obj, name, 0)) {
        PyObject *v = *(PyObject **)((char *)obj + site->offset);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttr(obj, name);  /* the error for an unset slot */
}

static int
site_set(attr_site *site, PyObject *obj, PyObject *name, PyObject *value)
{
    if (Py_TYPE(obj) == site->type || site_resolve(site, obj, name, 1)) {
        PyObject **slot = (PyObject **)((char *)obj + site->offset);
        PyObject *old = *slot;
        Py_INCREF(value);
        *slot = value;
        Py_XDECREF(old);
        return 0;
    }
    return PyObject_SetAttr(obj, name, value);
}

#define GET(obj, name) ({ static attr_site site_; site_get(&site_, (obj), (name)); })

static int
get_longlong_at(attr_site *site, PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = site_get(site, obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
set_longlong_at(attr_site *site, PyObject *obj, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    int rc;
    if (v == NULL)
        return -1;
    rc = site_set(site, obj, name, v);
    Py_DECREF(v);
    return rc;
}

#define get_longlong(obj, name, out) ({ static attr_site site_; get_longlong_at(&site_, (obj), (name), (out)); })
#define set_longlong(obj, name, value) ({ static attr_site site_; set_longlong_at(&site_, (obj), (name), (value)); })

static void
put_be16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void
put_be32(unsigned char *p, unsigned long v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* One frame's packets as the rewrite reads them, taken off the LayerPackets
 * once per frame (the batched fan-out then rewrites it for every viewer
 * without touching a Python object per packet). ``payload`` is borrowed:
 * the packet list the caller holds keeps it alive. */
typedef struct {
    long long seq;
    long long ts;
    const char *payload;
    Py_ssize_t plen;  /* -1: not bytes (the Python path's case) */
    int marker;
    int disc;
} packet_info;

static packet_info infos[MAX_PACKETS];

/* Fill infos from the first min(len, MAX_PACKETS) packets; returns how many,
 * or -1 with an exception set. */
static Py_ssize_t
read_packets(PyObject *packets)
{
    Py_ssize_t n = PyList_GET_SIZE(packets), i;
    if (n > MAX_PACKETS)
        n = MAX_PACKETS;
    for (i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i), *v;
        packet_info *info = &infos[i];
        if (get_longlong(p, s_seq, &info->seq) < 0 || get_longlong(p, s_timestamp, &info->ts) < 0)
            return -1;
        if ((v = GET(p, s_marker)) == NULL)
            return -1;
        info->marker = PyObject_IsTrue(v);
        Py_DECREF(v);
        if ((v = GET(p, s_discontinuity)) == NULL)
            return -1;
        info->disc = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (info->marker < 0 || info->disc < 0)
            return -1;
        if ((v = GET(p, s_payload)) == NULL)
            return -1;
        if (PyBytes_CheckExact(v)) {
            info->payload = PyBytes_AS_STRING(v);
            info->plen = PyBytes_GET_SIZE(v);
        } else {
            info->payload = NULL;
            info->plen = -1;
        }
        Py_DECREF(v);  /* the packet keeps it */
    }
    return n;
}

/* The rewrite and send of infos[0..n) (of a frame of ``n_all`` packets) for
 * one rewriter and destination: see rewrite_send. The caller holds ``busy``. */
static PyObject *
rewrite_into(const destination *d, PyObject *rw, PyObject *layer, Py_ssize_t n, Py_ssize_t n_all, double now)
{
    PyObject *cur, *tmpl = NULL, *tbuf = NULL, *twcc = NULL, *mpt = NULL, *map = NULL, *result = NULL;
    long long abs_off, abs_top, twcc_off, ts_off, vseq, lseq, max_gap, mask, packets_sent, octets_sent;
    long long tw_value = 0, vts = 0, layer_value;
    unsigned pt0, pt1;
    unsigned long abs_word = 0;
    Py_ssize_t i, hlen, sent_packets = 0, octets = 0;
    size_t pos = 0;
    int same, status = 0;

    cur = GET(rw, s_layer);
    if (cur == NULL)
        return NULL;
    /* (a failed comparison is -1, which && would turn into true) */
    same = cur == Py_None ? 0 : PyObject_RichCompareBool(cur, layer, Py_EQ);
    Py_DECREF(cur);
    if (same < 0)
        return NULL;
    if (!same)
        return outcome(0, 0, 0, 0, NULL, 0);

    if ((tmpl = GET(rw, s_tmpl)) == NULL || (tbuf = GET(tmpl, s_buf)) == NULL || (mpt = GET(rw, s_mpt)) == NULL
        || (map = GET(rw, s_map)) == NULL || (twcc = GET(rw, s_twcc)) == NULL)
        goto done;
    if (!PyByteArray_CheckExact(tbuf) || !PyTuple_CheckExact(mpt) || PyTuple_GET_SIZE(mpt) != 2
        || !PyByteArray_CheckExact(map)) {
        PyErr_SetString(PyExc_TypeError, "unexpected Rewriter layout");
        goto done;
    }
    if (get_longlong(tmpl, s_abs_off, &abs_off) < 0 || get_longlong(tmpl, s_abs_top, &abs_top) < 0
        || get_longlong(tmpl, s_twcc_off, &twcc_off) < 0 || get_longlong(rw, s_ts_off, &ts_off) < 0
        || get_longlong(rw, s_vseq, &vseq) < 0 || get_longlong(rw, s_lseq, &lseq) < 0
        || get_longlong(rw, s_max_gap, &max_gap) < 0 || get_longlong(rw, s_mask, &mask) < 0
        || get_longlong(rw, s_packets_sent, &packets_sent) < 0
        || get_longlong(rw, s_octets_sent, &octets_sent) < 0)
        goto done;
    if (twcc_off && (twcc == Py_None || get_longlong(twcc, s_value, &tw_value) < 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "transport-cc without a TransportSeq");
        goto done;
    }
    pt0 = (unsigned)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(mpt, 0));
    pt1 = (unsigned)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(mpt, 1));
    if (PyErr_Occurred())
        goto done;
    hlen = PyByteArray_GET_SIZE(tbuf);
    if (hlen < 12 || (abs_off && abs_off + 4 > hlen) || (twcc_off && twcc_off + 2 > hlen)
        || (mask + 1) * MAP_ENTRY != PyByteArray_GET_SIZE(map)) {
        PyErr_SetString(PyExc_ValueError, "unexpected Rewriter template");
        goto done;
    }
    layer_value = PyLong_AsLongLong(layer);
    if (layer_value == -1 && PyErr_Occurred())
        goto done;
    /* One now for the whole frame: one abs-send-time for all of it. */
    abs_word = (unsigned long)(abs_top | ((long long)(now * 262144.0) & 0xFFFFFF));

    for (i = 0; i < n; i++) {
        const packet_info *info = &infos[i];
        long long dist = (info->seq - lseq) & 0xFFFF;
        unsigned char *out;
        int len;

        if (info->disc || dist <= 0 || dist > max_gap)
            break;  /* the per-packet rules: rewrite_frame */
        if (info->plen < 0 || hlen + info->plen > d->max_len
            || pos + (size_t)(hlen + info->plen) + SRTP_TRAILER > BUF_BYTES)
            break;  /* the Python path sends it, or raises what it raises */
        vseq += dist;
        lseq = info->seq;
        vts = (info->ts + ts_off) & 0xFFFFFFFFLL;
        out = buf + pos;
        memcpy(out, PyByteArray_AS_STRING(tbuf), (size_t)hlen);
        out[1] = (unsigned char)(info->marker ? pt1 : pt0);
        put_be16(out + 2, (unsigned)(vseq & 0xFFFF));
        put_be32(out + 4, (unsigned long)vts);
        if (abs_off)
            put_be32(out + abs_off, abs_word);
        if (twcc_off) {
            put_be16(out + twcc_off, (unsigned)tw_value);
            tw_value = (tw_value + 1) & 0xFFFF;
        }
        memcpy(out + hlen, info->payload, (size_t)info->plen);
        {
            /* the NACK map (rewrite._ENTRY): viewer seq, layer, layer seq,
             * layer ts, viewer ts as native int64s */
            int64_t entry[5];
            entry[0] = vseq;
            entry[1] = layer_value;
            entry[2] = info->seq;
            entry[3] = info->ts;
            entry[4] = vts;
            memcpy(PyByteArray_AS_STRING(map) + (vseq & mask) * MAP_ENTRY, entry, sizeof(entry));
        }
        sent_packets++;
        octets += info->plen;
        len = (int)(hlen + info->plen);
        status = d->protect(d->ctx, out, &len);
        if (status != 0) {
            i++;
            break;
        }
        offsets[i] = pos;
        lengths[i] = len;
        pos += (size_t)len;
    }
    if (sent_packets) {
        /* rewrite_frame's write-back */
        PyObject *now_copy = PyFloat_FromDouble(now);
        if (now_copy == NULL)
            goto done;
        if (set_longlong(rw, s_vseq, vseq) < 0 || set_longlong(rw, s_lseq, lseq) < 0
            || set_longlong(rw, s_last_vts, vts) < 0 || ({ static attr_site site_; site_set(&site_, rw, s_last_now, now_copy); }) < 0
            || set_longlong(rw, s_packets_sent, packets_sent + sent_packets) < 0
            || set_longlong(rw, s_octets_sent, octets_sent + octets) < 0
            || (twcc_off && set_longlong(twcc, s_value, tw_value) < 0)) {
            Py_DECREF(now_copy);
            goto done;
        }
        Py_DECREF(now_copy);
    }
    if (status != 0)
        result = outcome(i, 0, 0, 0, NULL, status);
    else
        result = send_prepared(d, i, i, i == n_all);
done:
    Py_XDECREF(tmpl);
    Py_XDECREF(tbuf);
    Py_XDECREF(mpt);
    Py_XDECREF(map);
    Py_XDECREF(twcc);
    return result;
}

/* rewrite_send(protect, ctx, fd, sockaddr, ancillary, gso, max_len,
 *              rewriter, layer, packets, now)
 *
 * media.rtp.rewrite.Rewriter.rewrite_frame's in-order path, fused with
 * send_frame: the packets of ``layer`` that follow the rewriter's last one
 * within max_gap (no discontinuity), from the first on, are rewritten
 * straight into the send buffer (the template, then M/PT, sequence number,
 * timestamp, abs-send-time and transport-wide sequence number, then the
 * payload), entered in the rewriter's NACK map, protected and sent; the
 * rewriter's state and counters move exactly as rewrite_frame moves them.
 * At the first packet that is anything else it stops: the caller gives the
 * rest to rewrite_frame (its per-packet rules) and send_frame.
 * Returns an int (every packet rewritten and every datagram sent: the bytes
 * written) or send_frame's tuple, whose ``handled`` counts the packets
 * rewritten here (0: nothing was, the rewriter is not on ``layer``). A
 * packet without the LayerPacket fields raises before anything is
 * rewritten. */
static PyObject *
rewrite_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    destination d;
    PyObject *rw, *layer, *packets, *result;
    double now;
    Py_ssize_t n;

    (void)module;
    if (parse_destination(args, nargs, 4, "rewrite_send", &d) < 0)
        return NULL;
    rw = args[7];
    layer = args[8];
    packets = args[9];
    if (!PyList_CheckExact(packets) || !PyLong_CheckExact(layer)) {
        PyErr_SetString(PyExc_TypeError, "packets must be a list and layer an int");
        return NULL;
    }
    now = PyFloat_AsDouble(args[10]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (busy)
        return outcome(0, 0, 0, 0, NULL, 0);
    busy = 1;
    n = read_packets(packets);
    result = n < 0 ? NULL : rewrite_into(&d, rw, layer, n, PyList_GET_SIZE(packets), now);
    busy = 0;
    return result;
}

/* Interned names of what fanout reads of a lane (media.webrtc.whep.FrameLane),
 * its FastPath, the sender and the viewer core. */
static PyObject *s_fast, *s_core, *s_native, *s_nominated, *s_pair, *s_protocol, *s_transport, *s_sock_of,
    *s_sender, *s_addr, *s_wire_of, *s_wire, *s_failing_since, *s_sock, *s_fileno, *s_ancillary, *s_gso,
    *s_core_failing, *s_audio, *s_video, *s_frozen_since, *s_keyframe_start, *s_stats, *s_bytes_sent,
    *s_events, *s_timer_changed, *one;

#define MAX_HELD 24

/* Where one lane's frame goes, as FastPath.rewrite_send and
 * ViewerEgress.fast_rewriter decide it, read straight from those objects:
 * the nominated pair still the one the sender was made for, on the same
 * transport, a DatagramSender to the address its wire form was made from,
 * no send failing (the core's on_sent then needs only its two counters),
 * the track's rewriter, and no freeze ending on this frame. Returns 1 with
 * ``d`` and ``*rw`` filled (borrowed from ``held``), 0 when the lane takes
 * the per-viewer path, -1 with an exception set. */
static int
lane_destination(PyObject *lane, int audio, int keyframe_start, PyObject *sender_type, destination *d,
                 PyObject **rw, PyObject **core_out, PyObject **held, int *nheld)
{
    PyObject *fast, *native, *nominated, *pair, *transport, *sock_of, *addr, *wire_of, *v, *sender, *core, *sock;
    long fd;

#define HOLD(expr) ({ PyObject *h_ = (expr); if (h_ != NULL) held[(*nheld)++] = h_; h_; })
    if ((fast = HOLD(GET(lane, s_fast))) == NULL)
        return -1;
    if (fast == Py_None)
        return 0;
    if ((native = HOLD(GET(fast, s_native))) == NULL)
        return -1;
    if (!PyTuple_CheckExact(native) || PyTuple_GET_SIZE(native) != 3)
        return 0;
    if ((nominated = HOLD(GET(fast, s_nominated))) == NULL || (pair = HOLD(GET(fast, s_pair))) == NULL)
        return -1;
    if (!PyDict_CheckExact(nominated) || pair == Py_None || PyDict_GetItemWithError(nominated, one) != pair)
        return PyErr_Occurred() ? -1 : 0;
    if ((v = HOLD(PyObject_GetAttr(pair, s_protocol))) == NULL
        || (transport = HOLD(PyObject_GetAttr(v, s_transport))) == NULL
        || (sock_of = HOLD(GET(fast, s_sock_of))) == NULL)
        return -1;
    if (transport == Py_None || transport != sock_of)
        return 0;
    if ((sender = HOLD(GET(fast, s_sender))) == NULL)
        return -1;
    if ((PyObject *)Py_TYPE(sender) != sender_type)
        return 0;
    if ((v = HOLD(GET(sender, s_failing_since))) == NULL)
        return -1;
    if (v != Py_None)
        return 0;
    if ((addr = HOLD(GET(sender, s_addr))) == NULL || (wire_of = HOLD(GET(fast, s_wire_of))) == NULL)
        return -1;
    if (addr != wire_of)
        return 0;
    if ((v = HOLD(GET(fast, s_wire))) == NULL)
        return -1;
    if (!PyBytes_CheckExact(v))
        return 0;
    d->addr = PyBytes_AS_STRING(v);
    d->addrlen = PyBytes_GET_SIZE(v);
    if ((sock = HOLD(GET(sender, s_sock))) == NULL || (v = HOLD(PyObject_CallMethodNoArgs(sock, s_fileno))) == NULL)
        return -1;
    fd = PyLong_AsLong(v);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX)
        return 0;
    d->fd = (int)fd;
    if ((d->ancillary = HOLD(GET(sender, s_ancillary))) == NULL || (v = HOLD(GET(sender, s_gso))) == NULL)
        return -1;
    if ((d->gso = PyObject_IsTrue(v)) < 0)
        return -1;
    d->protect = (srtp_protect_fn)PyLong_AsVoidPtr(PyTuple_GET_ITEM(native, 0));
    d->ctx = PyLong_AsVoidPtr(PyTuple_GET_ITEM(native, 1));
    d->max_len = PyLong_AsSsize_t(PyTuple_GET_ITEM(native, 2));
    if (PyErr_Occurred())
        return -1;
    if (d->protect == NULL || d->ctx == NULL)
        return 0;
    if ((core = HOLD(GET(lane, s_core))) == NULL || (v = HOLD(GET(core, s_core_failing))) == NULL)
        return -1;
    if (v != Py_None)
        return 0;
    if ((*rw = HOLD(audio ? GET(core, s_audio) : GET(core, s_video))) == NULL)
        return -1;
    if (*rw == Py_None)
        return 0;
    if (!audio && keyframe_start) {
        if ((v = HOLD(GET(core, s_frozen_since))) == NULL)
            return -1;
        if (v != Py_None)
            return 0;  /* the end of a freeze is counted in on_packets */
    }
    *core_out = core;
    return 1;
#undef HOLD
}

/* The core's on_sent for a frame that went out whole with nothing failing
 * (its per-frame case: two counters), then whether its shell has anything
 * to do (events, a moved timer). Returns 1 (it has), 0, or -1. */
static int
count_sent(PyObject *core, Py_ssize_t count, long long nbytes)
{
    PyObject *stats = GET(core, s_stats), *v;
    long long value;
    int rc = -1;
    if (stats == NULL)
        return -1;
    if (get_longlong(stats, s_bytes_sent, &value) < 0 || set_longlong(stats, s_bytes_sent, value + nbytes) < 0
        || get_longlong(stats, s_packets_sent, &value) < 0
        || set_longlong(stats, s_packets_sent, value + count) < 0)
        goto out;
    if ((v = GET(core, s_events)) == NULL)
        goto out;
    rc = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (rc != 0)
        goto out;
    if ((v = GET(core, s_timer_changed)) == NULL) {
        rc = -1;
        goto out;
    }
    rc = PyObject_IsTrue(v);
    Py_DECREF(v);
out:
    Py_DECREF(stats);
    return rc;
}

/* fanout(lanes, start, layer, audio_layer, packets, now, sender_type)
 *
 * One frame of ``layer`` (``audio_layer``: the audio track) to every lane
 * of ``lanes`` (media.webrtc.whep.FrameLane: a viewer's FastPath and core;
 * None for a viewer without one), starting at position ``start`` and going
 * round: for each lane on the fast path, exactly what whep.forward_frame
 * does through FastPath.rewrite_send and the core's on_sent, with no Python
 * code run per viewer. The packets are read once for all of them.
 * Returns a list of (position, what) for the lanes whose shell still has
 * work, in the order they were served:
 *   None    nothing was done: the viewer's whole per-frame path
 *           (WhepSession.on_packets)
 *   True    the frame went out and was counted; the core has events or a
 *           moved timer for its shell
 *   tuple   rewrite_send's outcome, for the shell to finish as
 *           forward_frame does (the rest of the frame, the counters, errors)
 *   an exception  what rewrite_send (or the counting) raised for this
 *           viewer, for its shell to raise
 * None (not a list) when a call is already running: every lane takes the
 * per-viewer path. */
static PyObject *
fanout(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *lanes, *layer, *packets, *sender_type, *todo, *first, *v;
    Py_ssize_t n_lanes, start, n, n_all, k;
    long long layer_value, audio_value;
    int keyframe_start;
    double now;

    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "fanout takes 7 arguments");
        return NULL;
    }
    lanes = args[0];
    layer = args[2];
    packets = args[4];
    sender_type = args[6];
    if (!PyList_CheckExact(lanes) || !PyList_CheckExact(packets) || !PyLong_CheckExact(layer)
        || !PyType_Check(sender_type)) {
        PyErr_SetString(PyExc_TypeError, "fanout(list, int, int, int, list, float, type)");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    layer_value = PyLong_AsLongLong(layer);
    audio_value = PyLong_AsLongLong(args[3]);
    now = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (busy)
        Py_RETURN_NONE;
    n_lanes = PyList_GET_SIZE(lanes);
    n_all = PyList_GET_SIZE(packets);
    if ((todo = PyList_New(0)) == NULL)
        return NULL;
    if (n_lanes == 0 || n_all == 0)
        return todo;
    first = PyList_GET_ITEM(packets, 0);
    if ((v = GET(first, s_keyframe_start)) == NULL)
        goto fail_unlocked;
    keyframe_start = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (keyframe_start < 0)
        goto fail_unlocked;
    busy = 1;
    if ((n = read_packets(packets)) < 0)
        goto fail;
    if (start < 0 || start >= n_lanes)
        start = 0;
    for (k = 0; k < n_lanes; k++) {
        Py_ssize_t pos = (start + k) % n_lanes;
        PyObject *lane = PyList_GET_ITEM(lanes, pos), *rw = NULL, *core = NULL, *result = NULL, *what;
        PyObject *held[MAX_HELD];
        int nheld = 0, route, after = 0;
        destination d;

        Py_INCREF(lane);
        route = lane == Py_None ? 0
            : lane_destination(lane, layer_value == audio_value, keyframe_start, sender_type, &d, &rw, &core,
                               held, &nheld);
        if (route < 0) {
            /* Whatever this lane's objects raised, its per-viewer path
             * raises (or copes) for this viewer alone. */
            PyErr_Clear();
            route = 0;
        }
        if (route == 1) {
            result = rewrite_into(&d, rw, layer, n, n_all, now);
            if (result != NULL && PyLong_CheckExact(result)) {
                after = count_sent(core, n_all, PyLong_AsLongLong(result));
                if (after < 0)
                    Py_CLEAR(result);
            }
        }
        while (nheld)
            Py_DECREF(held[--nheld]);
        Py_DECREF(lane);
        if (route == 1 && result == NULL) {
            /* What rewrite_send would have raised: handed over for this
             * viewer's shell to raise, after the lanes before it were served. */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL && value != NULL)
                PyException_SetTraceback(value, tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            if (value == NULL)
                goto fail;
            what = value;
        } else if (route == 0) {
            what = Py_None;
            Py_INCREF(what);
        } else if (PyLong_CheckExact(result)) {
            Py_DECREF(result);
            if (!after)
                continue;
            what = Py_True;
            Py_INCREF(what);
        } else if (PyTuple_GET_SIZE(result) == 6 && PyLong_AsSsize_t(PyTuple_GET_ITEM(result, 0)) == 0) {
            /* nothing taken (not on this layer): the per-viewer path */
            Py_DECREF(result);
            what = Py_None;
            Py_INCREF(what);
        } else {
            what = result;
        }
        v = Py_BuildValue("(nN)", pos, what);
        if (v == NULL || PyList_Append(todo, v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    busy = 0;
    return todo;
fail:
    busy = 0;
fail_unlocked:
    Py_DECREF(todo);
    return NULL;
}

static PyMethodDef methods[] = {
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL,
     "Protect one frame's RTP packets with libsrtp and send them in GSO runs."},
    {"rewrite_send", (PyCFunction)(void (*)(void))rewrite_send, METH_FASTCALL,
     "Rewriter.rewrite_frame's in-order path fused with send_frame."},
    {"fanout", (PyCFunction)(void (*)(void))fanout, METH_FASTCALL,
     "One frame to every viewer on the fast path: rewrite_send and the core's on_sent per lane."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "media.webrtc._fastsend", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__fastsend(void)
{
    PyObject *m;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_layer, "_layer");
    INTERN(s_tmpl, "_tmpl");
    INTERN(s_buf, "buf");
    INTERN(s_abs_off, "abs_off");
    INTERN(s_abs_top, "abs_top");
    INTERN(s_twcc_off, "twcc_off");
    INTERN(s_twcc, "_twcc");
    INTERN(s_value, "value");
    INTERN(s_mpt, "_mpt");
    INTERN(s_ts_off, "_ts_off");
    INTERN(s_vseq, "_vseq");
    INTERN(s_lseq, "_lseq");
    INTERN(s_max_gap, "max_gap");
    INTERN(s_map, "_map");
    INTERN(s_mask, "_mask");
    INTERN(s_last_vts, "_last_vts");
    INTERN(s_last_now, "_last_now");
    INTERN(s_packets_sent, "packets_sent");
    INTERN(s_octets_sent, "octets_sent");
    INTERN(s_seq, "seq");
    INTERN(s_timestamp, "timestamp");
    INTERN(s_marker, "marker");
    INTERN(s_payload, "payload");
    INTERN(s_discontinuity, "discontinuity");
    INTERN(s_fast, "fast");
    INTERN(s_core, "core");
    INTERN(s_native, "_native");
    INTERN(s_nominated, "_nominated");
    INTERN(s_pair, "_pair");
    INTERN(s_protocol, "protocol");
    INTERN(s_transport, "transport");
    INTERN(s_sock_of, "_sock_of");
    INTERN(s_sender, "sender");
    INTERN(s_addr, "addr");
    INTERN(s_wire_of, "_wire_of");
    INTERN(s_wire, "_wire");
    INTERN(s_failing_since, "failing_since");
    INTERN(s_sock, "sock");
    INTERN(s_fileno, "fileno");
    INTERN(s_ancillary, "ancillary");
    INTERN(s_gso, "gso");
    INTERN(s_core_failing, "_failing_since");
    INTERN(s_audio, "audio");
    INTERN(s_video, "video");
    INTERN(s_frozen_since, "_frozen_since");
    INTERN(s_keyframe_start, "keyframe_start");
    INTERN(s_stats, "stats");
    INTERN(s_bytes_sent, "bytes_sent");
    INTERN(s_events, "events");
    INTERN(s_timer_changed, "timer_changed");
#undef INTERN
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "GSO_MAX_SEGMENTS", GSO_MAX_SEGMENTS) < 0
        || PyModule_AddIntConstant(m, "GSO_MAX_BYTES", GSO_MAX_BYTES) < 0
        || PyModule_AddIntConstant(m, "SRTP_TRAILER", SRTP_TRAILER) < 0
        || PyModule_AddIntConstant(m, "MAX_PACKETS", MAX_PACKETS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
