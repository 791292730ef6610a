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
 * built (no compiler) or RETURNFEED_NO_EXTENSIONS is set, the Python path
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

static PyObject *
send_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    srtp_protect_fn protect;
    void *ctx;
    int fd, gso, i_err = 0;
    Py_ssize_t n, i, j;
    size_t pos = 0;
    char *addr;
    Py_ssize_t addrlen;
    PyObject *packets, *ancillary;
    Py_ssize_t sent = 0, backlogged = 0, max_len;
    int any_sent = 0;

    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "send_frame takes 8 arguments");
        return NULL;
    }
    protect = (srtp_protect_fn)PyLong_AsVoidPtr(args[0]);
    if (protect == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "protect is NULL");
        return NULL;
    }
    ctx = PyLong_AsVoidPtr(args[1]);
    if (ctx == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "ctx is NULL");
        return NULL;
    }
    {
        long v = PyLong_AsLong(args[2]);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 0 || v > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "bad file descriptor");
            return NULL;
        }
        fd = (int)v;
    }
    if (PyBytes_AsStringAndSize(args[3], &addr, &addrlen) < 0)
        return NULL;
    ancillary = args[4];
    packets = args[5];
    if (!PyList_CheckExact(packets)) {
        PyErr_SetString(PyExc_TypeError, "packets must be a list");
        return NULL;
    }
    gso = PyObject_IsTrue(args[6]);
    if (gso < 0)
        return NULL;
    max_len = PyLong_AsSsize_t(args[7]);
    if (max_len == -1 && PyErr_Occurred())
        return NULL;

    n = PyList_GET_SIZE(packets);
    if (n > MAX_PACKETS)
        Py_RETURN_NONE;
    /* Room first, so that a frame that does not fit protects nothing. */
    for (i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i);
        if (!PyBytes_CheckExact(p) || PyBytes_GET_SIZE(p) > max_len)
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
        status = protect(ctx, buf + pos, &len);
        if (status != 0)
            return Py_BuildValue("(nniOi)", (Py_ssize_t)0, (Py_ssize_t)0, 0, Py_None, status);
        offsets[i] = pos;
        lengths[i] = len;
        pos += (size_t)len;
    }

    /* Send in runs, as aiortc_adapter.send_runs groups them. */
    i = 0;
    while (i < n) {
        int size = lengths[i];
        size_t run_bytes = (size_t)size;
        int err;
        j = i + 1;
        if (gso && size > 0) {
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
        err = send_run(fd, addr, (socklen_t)addrlen, ancillary, i, j - i, run_bytes, &i_err);
        if (i_err)
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
                PyObject *d = PyBytes_FromStringAndSize((const char *)buf + offsets[k], lengths[k]);
                if (d == NULL) {
                    Py_DECREF(rest);
                    return NULL;
                }
                PyList_SET_ITEM(rest, k - i, d);
            }
            return Py_BuildValue("(nniNi)", sent, backlogged, any_sent, rest, -err);
        }
        i = j;
    }
    if (backlogged == 0)
        return PyLong_FromSsize_t(sent);
    return Py_BuildValue("(nniOi)", sent, backlogged, any_sent, Py_None, 0);
}

static PyMethodDef methods[] = {
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL,
     "Protect one frame's RTP packets with libsrtp and send them in GSO runs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "media.webrtc._fastsend", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__fastsend(void)
{
    PyObject *m = PyModule_Create(&module_def);
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
