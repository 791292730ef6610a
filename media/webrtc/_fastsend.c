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
 * class (Rewriter, its _Template, TransportSeq, LayerPacket): the slot's
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
 * rewritten here (0: nothing was, the rewriter is not on ``layer``). */
static PyObject *
rewrite_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    destination d;
    PyObject *rw, *layer, *packets, *now_obj, *cur, *tmpl = NULL, *tbuf = NULL, *twcc = NULL, *mpt = NULL,
        *map = NULL, *result = NULL;
    long long abs_off, abs_top, twcc_off, ts_off, vseq, lseq, max_gap, mask, packets_sent, octets_sent;
    long long tw_value = 0, vts = 0, layer_value;
    unsigned pt0, pt1;
    unsigned long abs_word = 0;
    double now;
    Py_ssize_t n, i, hlen, sent_packets = 0, octets = 0;
    size_t pos = 0;
    int same, status = 0;

    (void)module;
    if (parse_destination(args, nargs, 4, "rewrite_send", &d) < 0)
        return NULL;
    rw = args[7];
    layer = args[8];
    packets = args[9];
    now_obj = args[10];
    if (!PyList_CheckExact(packets) || !PyLong_CheckExact(layer)) {
        PyErr_SetString(PyExc_TypeError, "packets must be a list and layer an int");
        return NULL;
    }
    now = PyFloat_AsDouble(now_obj);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (busy)
        return outcome(0, 0, 0, 0, NULL, 0);
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

    busy = 1;
    n = PyList_GET_SIZE(packets);
    if (n > MAX_PACKETS)
        n = MAX_PACKETS;
    for (i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i), *seq_obj, *ts_obj, *payload;
        long long seq, ts, dist;
        Py_ssize_t plen;
        unsigned char *out;
        int disc, marker, len;

        if ((seq_obj = GET(p, s_seq)) == NULL)
            goto fail;
        seq = PyLong_AsLongLong(seq_obj);
        if (seq == -1 && PyErr_Occurred()) {
            Py_DECREF(seq_obj);
            goto fail;
        }
        dist = (seq - lseq) & 0xFFFF;
        {
            PyObject *flag = GET(p, s_discontinuity);
            if (flag == NULL) {
                Py_DECREF(seq_obj);
                goto fail;
            }
            disc = PyObject_IsTrue(flag);
            Py_DECREF(flag);
        }
        if (disc != 0 || dist <= 0 || dist > max_gap) {
            Py_DECREF(seq_obj);
            if (disc < 0)
                goto fail;
            break;  /* the per-packet rules: rewrite_frame */
        }
        if ((payload = GET(p, s_payload)) == NULL) {
            Py_DECREF(seq_obj);
            goto fail;
        }
        plen = PyBytes_CheckExact(payload) ? PyBytes_GET_SIZE(payload) : -1;
        if (plen < 0 || hlen + plen > d.max_len || pos + (size_t)(hlen + plen) + SRTP_TRAILER > BUF_BYTES) {
            Py_DECREF(payload);
            Py_DECREF(seq_obj);
            break;  /* the Python path sends it, or raises what it raises */
        }
        if ((ts_obj = GET(p, s_timestamp)) == NULL) {
            Py_DECREF(payload);
            Py_DECREF(seq_obj);
            goto fail;
        }
        ts = PyLong_AsLongLong(ts_obj);
        {
            PyObject *flag = GET(p, s_marker);
            marker = flag == NULL ? -1 : PyObject_IsTrue(flag);
            Py_XDECREF(flag);
        }
        if ((ts == -1 && PyErr_Occurred()) || marker < 0) {
            Py_DECREF(ts_obj);
            Py_DECREF(payload);
            Py_DECREF(seq_obj);
            goto fail;
        }
        vseq += dist;
        lseq = seq;
        vts = (ts + ts_off) & 0xFFFFFFFFLL;
        out = buf + pos;
        memcpy(out, PyByteArray_AS_STRING(tbuf), (size_t)hlen);
        out[1] = (unsigned char)(marker ? pt1 : pt0);
        put_be16(out + 2, (unsigned)(vseq & 0xFFFF));
        put_be32(out + 4, (unsigned long)vts);
        if (abs_off)
            put_be32(out + abs_off, abs_word);
        if (twcc_off) {
            put_be16(out + twcc_off, (unsigned)tw_value);
            tw_value = (tw_value + 1) & 0xFFFF;
        }
        memcpy(out + hlen, PyBytes_AS_STRING(payload), (size_t)plen);
        Py_DECREF(payload);
        Py_DECREF(ts_obj);
        Py_DECREF(seq_obj);
        {
            /* the NACK map (rewrite._ENTRY): viewer seq, layer, layer seq,
             * layer ts, viewer ts as native int64s */
            int64_t entry[5];
            entry[0] = vseq;
            entry[1] = layer_value;
            entry[2] = seq;
            entry[3] = ts;
            entry[4] = vts;
            memcpy(PyByteArray_AS_STRING(map) + (vseq & mask) * MAP_ENTRY, entry, sizeof(entry));
        }
        sent_packets++;
        octets += plen;
        len = (int)(hlen + plen);
        status = d.protect(d.ctx, out, &len);
        if (status != 0) {
            i++;
            break;
        }
        offsets[i] = pos;
        lengths[i] = len;
        pos += (size_t)len;
    }
    busy = 0;
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
    if (status != 0) {
        result = outcome(i, 0, 0, 0, NULL, status);
        goto done;
    }
    busy = 1;
    result = send_prepared(&d, i, i, i == PyList_GET_SIZE(packets));
    busy = 0;
    goto done;
fail:
    busy = 0;
    /* An exception mid-frame: what was rewritten stays rewritten (as in
     * rewrite_frame); nothing was sent. */
    if (sent_packets) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        set_longlong(rw, s_vseq, vseq);
        set_longlong(rw, s_lseq, lseq);
        set_longlong(rw, s_packets_sent, packets_sent + sent_packets);
        set_longlong(rw, s_octets_sent, octets_sent + octets);
        if (twcc_off)
            set_longlong(twcc, s_value, tw_value);
        PyErr_Restore(type, value, tb);
    }
done:
    Py_XDECREF(tmpl);
    Py_XDECREF(tbuf);
    Py_XDECREF(mpt);
    Py_XDECREF(map);
    Py_XDECREF(twcc);
    return result;
}

static PyMethodDef methods[] = {
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL,
     "Protect one frame's RTP packets with libsrtp and send them in GSO runs."},
    {"rewrite_send", (PyCFunction)(void (*)(void))rewrite_send, METH_FASTCALL,
     "Rewriter.rewrite_frame's in-order path fused with send_frame."},
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
#undef INTERN
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
