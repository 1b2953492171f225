/* Our C glue around libvhost-user: adapts its callbacks to ours (see vhost/lvu.py).
 *
 * libvhost-user calls back with a VuDev *; our LwDev starts with the VuDev, so the glue finds
 * the Python owner (an ffi handle) from it and upcalls through the extern "Python" functions
 * declared in _lvu.cdef. The glue also pops and parses virtio-blk requests (header first in
 * the driver-written buffers, status byte last in the device-written ones, either possibly
 * split across descriptors) so that Python sees one flat request per element, and fills and
 * publishes used entries in batches.
 *
 * In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): libvhost-user marks each popped
 * head in-flight in a region QEMU keeps across a backend restart, and clears the mark in
 * vu_queue_push (fill one entry, note it as the last batch head, move used->idx by one, clear).
 * After a restart it resubmits every head still marked, and trusts only the *last* head to have
 * been published if used->idx moved past its record. A batch of many entries published with one
 * used->idx update breaks that (a kill between the update and the clears leaves published heads
 * marked: they would be resubmitted, i.e. completed twice). So when the feature is negotiated,
 * lw_fill only notes (head, length) and lw_publish pushes them one at a time, in pop order,
 * then notifies the guest once; otherwise the batched path (fill all, one used->idx update).
 *
 * Each popped request carries its identity: queue, head and libvhost-user's in-flight
 * `counter` (pop order, kept across restarts in the region). A resubmitted request the Python
 * side declared already done (lw_expect: the killed backend completed and recorded it but never
 * published it; see vhost/pending.py) is not handed to Python: lw_pop writes its status byte
 * (OK), queues its used entry with the batch and pops on.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include "libvhost-user.h"
#include "standard-headers/linux/virtio_blk.h"

typedef struct LwFast LwFast;
typedef struct LwReq LwReq;

#define LW_WATCH_MAX 64         /* libvhost-user watches one kick eventfd per queue */

typedef struct LwDev {
    VuDev dev;                  /* first: a VuDev * from libvhost-user is our LwDev * */
    void *owner;                /* ffi.new_handle() of the Python owner */
    bool disconnected;          /* set when libvhost-user reads end-of-file (request 0) */
    uint64_t features;          /* device features offered on top of libvhost-user's */
    uint64_t protocol_features;
    struct virtio_blk_config config;
    VuDevIface iface;
    /* The request lw_pop returned last (what vhost/pending.py journals with a record). */
    uint16_t cur_qidx;
    uint16_t cur_head;
    uint64_t cur_counter;
    /* Queues started since their last pop (bit per queue): the next pop reports the queue's
     * resubmissions first (lw_py_queue_resumed). */
    uint64_t resume_check;
    /* With in-flight tracking: used entries of the batch, pushed one by one by lw_publish. */
    unsigned int npending;
    struct { unsigned int head; uint32_t len; } pending[VIRTQUEUE_MAX_SIZE];
    /* Resubmissions to complete without Python (already done by a killed backend). */
    unsigned int nexpect;
    unsigned int expect_cap;
    struct LwExpect { uint16_t qidx; uint16_t head; uint64_t counter; } *expect;
    uint64_t duplicates;        /* resubmissions completed that way */
    uint64_t resubmitted;       /* resubmissions popped (handed to Python or not) */
    /* libvhost-user's watches (the queues' kick eventfds), which lw_wait serves itself. */
    unsigned int nwatch;
    struct LwWatch { int fd; vu_watch_cb cb; void *data; } watch[LW_WATCH_MAX];
    /* While lw_wait runs with them: the plain path's state and request for kicks served in
     * C; NULL: every kick goes to Python. */
    LwFast *kick_fast;
    LwReq *kick_req;
    bool upcalled;              /* Python ran since lw_wait began its round */
} LwDev;

struct LwReq {
    VuVirtqElement *elem;
    uint32_t type;
    uint64_t sector;            /* virtio's req_sector: 512-byte units */
    struct iovec *iov;          /* the payload buffers: header and status stripped */
    unsigned int niov;
    uint64_t len;               /* bytes in iov */
    uint8_t *status;            /* NULL when the element has no device-writable byte */
    int problem;                /* LW_REQ_OK or why the request cannot be served */
    uint16_t qidx;              /* identity: queue, head, libvhost-user's in-flight counter */
    uint16_t head;
    uint64_t counter;
    bool resubmitted;           /* from libvhost-user's resubmit list after a reconnect */
};

#define LW_REQ_OK 0
#define LW_REQ_NO_HEADER 1      /* fewer than 16 driver-written bytes */
#define LW_REQ_NO_STATUS 2      /* no device-writable byte for the status */

static const int LW_WCE_OFFSET = offsetof(struct virtio_blk_config, wce);
static const int LW_CONFIG_SIZE = sizeof(struct virtio_blk_config);

/* extern "Python" (see _lvu.cdef); cffi defines them, we only declare them for the glue. */
static void lw_py_panic(void *owner, const char *err);
static void lw_py_set_watch(void *owner, int fd, int condition, void *cb, void *data);
static void lw_py_remove_watch(void *owner, int fd);
static void lw_py_queue_started(void *owner, int qidx, bool started);
static void lw_py_kick(void *owner, int qidx);
static void lw_py_kick_from(void *owner, int qidx, int got, unsigned int filled);
static int lw_py_set_config(void *owner, const uint8_t *data, uint32_t offset,
                            uint32_t size, uint32_t flags);
static void lw_py_queue_resumed(void *owner, int qidx, int resubmits);

#define LW_OF(vudev) ((LwDev *)(vudev))

/* Every call into Python goes through here: lw_wait must know that Python ran (its state may
 * have moved while C held the plain path). */
#define LW_UPCALL(d, fn, ...) ((d)->upcalled = true, fn((d)->owner, __VA_ARGS__))

static void lw_panic(VuDev *dev, const char *err)
{
    LW_UPCALL(LW_OF(dev), lw_py_panic, err);
}

static struct LwWatch *lw_watch_find(LwDev *d, int fd)
{
    for (unsigned int i = 0; i < d->nwatch; i++) {
        if (d->watch[i].fd == fd) {
            return &d->watch[i];
        }
    }
    return NULL;
}

/* Python watches every fd (its loop's epoll set, its callbacks); the glue keeps its own table
 * of libvhost-user's, so that lw_wait can serve them without Python. One the table has no room
 * for is served through Python, as before. */
static void lw_set_watch(VuDev *dev, int fd, int condition, vu_watch_cb cb, void *data)
{
    LwDev *d = LW_OF(dev);
    struct LwWatch *w = lw_watch_find(d, fd);
    if (!w && d->nwatch < LW_WATCH_MAX) {
        w = &d->watch[d->nwatch++];
    }
    if (w) {
        w->fd = fd;
        w->cb = cb;
        w->data = data;
    }
    LW_UPCALL(d, lw_py_set_watch, fd, condition, (void *)cb, data);
}

static void lw_remove_watch(VuDev *dev, int fd)
{
    LwDev *d = LW_OF(dev);
    struct LwWatch *w = lw_watch_find(d, fd);
    if (w) {
        *w = d->watch[--d->nwatch];
    }
    LW_UPCALL(d, lw_py_remove_watch, fd);
}

static uint64_t lw_get_features(VuDev *dev)
{
    return LW_OF(dev)->features;
}

static void lw_set_features(VuDev *dev, uint64_t features)
{
}

static uint64_t lw_get_protocol_features(VuDev *dev)
{
    return LW_OF(dev)->protocol_features;
}

/* libvhost-user trusts the in-flight region's sizes: more queues than it has would be written
 * past its queue array, a region smaller than the sizes claim read past the mapping (SIGBUS),
 * a ring larger than the region's descriptor array, or a last batch head outside it, written
 * past it. Checked here, before it acts on them; a front-end that gets them wrong is dropped
 * like any other protocol error. */
static const char *lw_inflight_fd_problem(VuDev *dev, VhostUserMsg *vmsg)
{
    if (vmsg->fd_num != 1 || vmsg->size != sizeof(vmsg->payload.inflight)) {
        return NULL;            /* libvhost-user refuses these itself */
    }
    uint16_t num_queues = vmsg->payload.inflight.num_queues;
    uint16_t queue_size = vmsg->payload.inflight.queue_size;
    uint64_t need = vu_inflight_queue_size(queue_size) * num_queues;
    struct stat st;
    if (!num_queues || num_queues > dev->max_queues) {
        return "SET_INFLIGHT_FD: queue count out of range";
    }
    if (!queue_size || queue_size > VIRTQUEUE_MAX_SIZE) {
        return "SET_INFLIGHT_FD: queue size out of range";
    }
    if (vmsg->payload.inflight.mmap_size < need) {
        return "SET_INFLIGHT_FD: region smaller than its queues";
    }
    if (fstat(vmsg->fds[0], &st) || (S_ISREG(st.st_mode)
            && (uint64_t)st.st_size < vmsg->payload.inflight.mmap_offset + need)) {
        return "SET_INFLIGHT_FD: file smaller than the region";
    }
    return NULL;
}

static const char *lw_vring_kick_problem(VuDev *dev, VhostUserMsg *vmsg)
{
    unsigned int index = vmsg->payload.u64 & VHOST_USER_VRING_IDX_MASK;
    if (index >= dev->max_queues || !dev->vq[index].inflight
            || !vu_has_protocol_feature(dev, VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)) {
        return NULL;
    }
    VuVirtqInflight *inflight = dev->vq[index].inflight;
    if (inflight->desc_num != dev->vq[index].vring.num) {
        return "in-flight region: its queue size is not the ring's";
    }
    if (inflight->version && inflight->last_batch_head >= inflight->desc_num) {
        return "in-flight region: last batch head outside the ring";
    }
    return NULL;
}

/* libvhost-user turns end-of-file into request 0 (VHOST_USER_NONE) and would exit(0). */
static int lw_process_msg(VuDev *dev, VhostUserMsg *vmsg, int *do_reply)
{
    const char *problem = NULL;
    if (vmsg->request == VHOST_USER_NONE) {
        LW_OF(dev)->disconnected = true;
        *do_reply = 0;
        return 1;
    }
    if (vmsg->request == VHOST_USER_SET_INFLIGHT_FD) {
        problem = lw_inflight_fd_problem(dev, vmsg);
    } else if (vmsg->request == VHOST_USER_SET_VRING_KICK) {
        problem = lw_vring_kick_problem(dev, vmsg);
    }
    if (problem) {
        vmsg_close_fds(vmsg);
        *do_reply = 0;
        vu_panic(dev, "%s", problem);
        return 1;
    }
    return 0;
}

static void lw_kick_in_c(LwDev *d, int qidx);

static void lw_queue_handler(VuDev *dev, int qidx)
{
    LwDev *d = LW_OF(dev);
    if (d->kick_fast) {
        lw_kick_in_c(d, qidx);
        return;
    }
    LW_UPCALL(d, lw_py_kick, qidx);
}

static void lw_queue_set_started(VuDev *dev, int qidx, bool started)
{
    /* Called before libvhost-user reads the in-flight region for this queue
     * (vu_check_queue_inflights): the first pop reports what it found. */
    if (started && qidx < 64) {
        LW_OF(dev)->resume_check |= 1ULL << qidx;
    }
    vu_set_queue_handler(dev, &dev->vq[qidx], started ? lw_queue_handler : NULL);
    LW_UPCALL(LW_OF(dev), lw_py_queue_started, qidx, started);
}

static int lw_get_config(VuDev *dev, uint8_t *config, uint32_t len)
{
    LwDev *d = LW_OF(dev);
    uint32_t n = len < sizeof(d->config) ? len : sizeof(d->config);
    memset(config, 0, len);
    memcpy(config, &d->config, n);
    return 0;
}

static int lw_set_config(VuDev *dev, const uint8_t *data, uint32_t offset, uint32_t size,
                         uint32_t flags)
{
    return LW_UPCALL(LW_OF(dev), lw_py_set_config, data, offset, size, flags);
}

LwDev *lw_new(void *owner)
{
    LwDev *d = calloc(1, sizeof(*d));
    if (!d) {
        return NULL;
    }
    d->owner = owner;
    d->dev.sock = -1;
    d->iface.get_features = lw_get_features;
    d->iface.set_features = lw_set_features;
    d->iface.get_protocol_features = lw_get_protocol_features;
    d->iface.process_msg = lw_process_msg;
    d->iface.queue_set_started = lw_queue_set_started;
    d->iface.get_config = lw_get_config;
    d->iface.set_config = lw_set_config;
    return d;
}

void lw_free(LwDev *d)
{
    free(d->expect);
    free(d);
}

bool lw_init(LwDev *d, uint16_t max_queues, int sock)
{
    d->disconnected = false;
    d->resume_check = 0;
    d->npending = 0;
    d->nwatch = 0;
    return vu_init(&d->dev, max_queues, sock, lw_panic, NULL, lw_set_watch, lw_remove_watch,
                   &d->iface);
}

void lw_set_blk_config(LwDev *d, uint64_t capacity, uint32_t size_max, uint32_t seg_max,
                       uint32_t blk_size, uint8_t wce, uint16_t num_queues,
                       uint32_t max_discard_sectors, uint32_t max_discard_seg,
                       uint32_t discard_sector_alignment, uint32_t max_write_zeroes_sectors,
                       uint32_t max_write_zeroes_seg, uint8_t write_zeroes_may_unmap)
{
    struct virtio_blk_config *c = &d->config;
    memset(c, 0, sizeof(*c));
    /* virtio 1.0: little-endian fields; the host is little-endian (x86_64, aarch64). */
    c->capacity = htole64(capacity);
    c->size_max = htole32(size_max);
    c->seg_max = htole32(seg_max);
    c->blk_size = htole32(blk_size);
    c->min_io_size = htole16(1);
    c->opt_io_size = htole32(1);
    c->wce = wce;
    c->num_queues = htole16(num_queues);
    c->max_discard_sectors = htole32(max_discard_sectors);
    c->max_discard_seg = htole32(max_discard_seg);
    c->discard_sector_alignment = htole32(discard_sector_alignment);
    c->max_write_zeroes_sectors = htole32(max_write_zeroes_sectors);
    c->max_write_zeroes_seg = htole32(max_write_zeroes_seg);
    c->write_zeroes_may_unmap = write_zeroes_may_unmap;
}

void lw_set_wce(LwDev *d, uint8_t wce)
{
    d->config.wce = wce;
}

void lw_call_watch(LwDev *d, void *cb, int condition, void *data)
{
    ((vu_watch_cb)cb)(&d->dev, condition, data);
}

/* Drop `n` bytes from the front of an iovec array, in place; returns the first one left. */
static struct iovec *lw_iov_skip(struct iovec *iov, unsigned int *cnt, size_t n)
{
    while (*cnt && n >= iov->iov_len) {
        n -= iov->iov_len;
        iov++;
        (*cnt)--;
    }
    if (*cnt && n) {
        iov->iov_base = (char *)iov->iov_base + n;
        iov->iov_len -= n;
    }
    return iov;
}

static size_t lw_iov_size(const struct iovec *iov, unsigned int cnt)
{
    size_t total = 0;
    for (unsigned int i = 0; i < cnt; i++) {
        total += iov[i].iov_len;
    }
    return total;
}

/* Whether in-flight tracking is on for queue `qidx` (negotiated, region mapped). */
static bool lw_tracking(LwDev *d, int qidx)
{
    return vu_has_protocol_feature(&d->dev, VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
        && d->dev.vq[qidx].inflight != NULL;
}

bool lw_inflight(LwDev *d, int qidx)
{
    return d->dev.vq && lw_tracking(d, qidx);
}

/* Resubmissions still to be popped from queue `qidx`, and the i-th of them (in pop order). */
int lw_resubmits(LwDev *d, int qidx)
{
    VuVirtq *vq = &d->dev.vq[qidx];
    return vq->resubmit_list ? vq->resubmit_num : 0;
}

void lw_resubmit(LwDev *d, int qidx, int i, uint16_t *head, uint64_t *counter)
{
    VuVirtq *vq = &d->dev.vq[qidx];
    /* vu_queue_pop takes them from the end of the list (sorted by counter, descending). */
    VuVirtqInflightDesc *r = &vq->resubmit_list[vq->resubmit_num - 1 - i];
    *head = r->index;
    *counter = r->counter;
}

/* Declare a resubmission of (queue, head, counter) already done: lw_pop completes it OK. */
bool lw_expect(LwDev *d, uint16_t qidx, uint16_t head, uint64_t counter)
{
    if (d->nexpect == d->expect_cap) {
        unsigned int cap = d->expect_cap ? 2 * d->expect_cap : 64;
        void *grown = realloc(d->expect, cap * sizeof(*d->expect));
        if (!grown) {
            return false;
        }
        d->expect = grown;
        d->expect_cap = cap;
    }
    d->expect[d->nexpect].qidx = qidx;
    d->expect[d->nexpect].head = head;
    d->expect[d->nexpect].counter = counter;
    d->nexpect++;
    return true;
}

static bool lw_take_expected(LwDev *d, uint16_t qidx, uint16_t head, uint64_t counter)
{
    for (unsigned int i = 0; i < d->nexpect; i++) {
        struct LwExpect *e = &d->expect[i];
        if (e->qidx == qidx && e->head == head && e->counter == counter) {
            *e = d->expect[--d->nexpect];
            return true;
        }
    }
    return false;
}

static int lw_parse(LwDev *d, int qidx, VuVirtqElement *elem, LwReq *req);

/* Pop one element of queue `qidx` and parse it as a virtio-blk request; 0 if none. */
int lw_pop(LwDev *d, int qidx, LwReq *req)
{
    VuDev *dev = &d->dev;
    VuVirtq *vq = &dev->vq[qidx];
    if (d->resume_check & (1ULL << qidx)) {
        d->resume_check &= ~(1ULL << qidx);
        LW_UPCALL(d, lw_py_queue_resumed, qidx, lw_resubmits(d, qidx));
    }
    for (;;) {
        bool resubmitted = vq->resubmit_list && vq->resubmit_num > 0;
        VuVirtqElement *elem = vu_queue_pop(dev, vq, sizeof(VuVirtqElement));
        if (!elem) {
            return 0;
        }
        lw_parse(d, qidx, elem, req);
        req->qidx = qidx;
        req->head = elem->index;
        req->counter = lw_tracking(d, qidx) ? vq->inflight->desc[elem->index].counter : 0;
        req->resubmitted = resubmitted;
        if (resubmitted) {
            d->resubmitted++;
        }
        if (resubmitted && req->problem == LW_REQ_OK && d->nexpect
                && lw_take_expected(d, qidx, req->head, req->counter)) {
            /* Done and recorded by the backend that was killed before publishing it. */
            *req->status = VIRTIO_BLK_S_OK;
            d->pending[d->npending].head = elem->index;
            d->pending[d->npending].len = 1;
            d->npending++;
            d->duplicates++;
            free(elem);
            req->elem = NULL;
            continue;
        }
        d->cur_qidx = qidx;
        d->cur_head = req->head;
        d->cur_counter = req->counter;
        return 1;
    }
}

static int lw_parse(LwDev *d, int qidx, VuVirtqElement *elem, LwReq *req)
{
    memset(req, 0, sizeof(*req));
    req->elem = elem;

    /* The status byte is the last device-writable byte. */
    unsigned int in_num = elem->in_num;
    while (in_num && elem->in_sg[in_num - 1].iov_len == 0) {
        in_num--;
    }
    if (in_num) {
        struct iovec *last = &elem->in_sg[in_num - 1];
        req->status = (uint8_t *)last->iov_base + last->iov_len - 1;
        last->iov_len--;
    } else {
        req->problem = LW_REQ_NO_STATUS;
    }

    /* The 16-byte header (type, ioprio, sector) leads the driver-written buffers. */
    struct virtio_blk_outhdr hdr;
    unsigned int out_num = elem->out_num;
    size_t got = 0;
    for (unsigned int i = 0; i < out_num && got < sizeof(hdr); i++) {
        size_t take = elem->out_sg[i].iov_len;
        if (take > sizeof(hdr) - got) {
            take = sizeof(hdr) - got;
        }
        memcpy((char *)&hdr + got, elem->out_sg[i].iov_base, take);
        got += take;
    }
    if (got < sizeof(hdr)) {
        if (req->problem == LW_REQ_OK) {
            req->problem = LW_REQ_NO_HEADER;
        }
        return 1;
    }
    req->type = le32toh(hdr.type);
    req->sector = le64toh(hdr.sector);
    struct iovec *out = lw_iov_skip(elem->out_sg, &out_num, sizeof(hdr));

    /* Reads and GET_ID fill device-writable buffers; everything else reads driver-written
     * ones. Buffers of the other direction are ignored, as QEMU's virtio-blk does. */
    if (req->type == VIRTIO_BLK_T_IN || req->type == VIRTIO_BLK_T_GET_ID) {
        req->iov = elem->in_sg;
        req->niov = in_num;
    } else {
        req->iov = out;
        req->niov = out_num;
    }
    req->len = lw_iov_size(req->iov, req->niov);
    return 1;
}

/* Complete a popped request: status byte, used entry `idx` of this batch, element freed.
 * With in-flight tracking the entry waits for lw_publish (which pushes in pop order). */
void lw_fill(LwDev *d, int qidx, LwReq *req, uint8_t status, uint32_t used_len,
             unsigned int idx)
{
    VuDev *dev = &d->dev;
    if (req->status) {
        *req->status = status;
    }
    if (lw_tracking(d, qidx)) {
        if (d->npending < VIRTQUEUE_MAX_SIZE) {
            d->pending[d->npending].head = req->elem->index;
            d->pending[d->npending].len = used_len;
            d->npending++;
        } else {
            vu_panic(dev, "more used entries pending than a ring holds");
        }
    } else {
        vu_queue_fill(dev, &dev->vq[qidx], req->elem, used_len, idx);
    }
    free(req->elem);
    req->elem = NULL;
}

/* Notify the guest about queue `qidx`. A queue may be kicked before its call eventfd arrives
 * (a front-end sends SET_VRING_KICK, then SET_VRING_CALL; after a reconnect libvhost-user kicks
 * itself to resubmit, and that kick may be served first): libvhost-user would panic writing
 * to fd -1. Nothing is lost by skipping: it signals the call eventfd as soon as it gets it. */
static void lw_notify(LwDev *d, int qidx)
{
    VuVirtq *vq = &d->dev.vq[qidx];
    if (vq->call_fd >= 0) {
        vu_queue_notify(&d->dev, vq);
    }
}

/* Publish the batch's filled entries and notify the guest once (if it wants to be):
 * `count` entries filled at once (batched path), or every pending entry pushed one at a
 * time (in-flight tracking: libvhost-user's own bookkeeping stays exact at every instant). */
void lw_publish(LwDev *d, int qidx, unsigned int count)
{
    VuDev *dev = &d->dev;
    VuVirtq *vq = &dev->vq[qidx];
    if (d->npending) {
        VuVirtqElement one;
        memset(&one, 0, sizeof(one));
        for (unsigned int i = 0; i < d->npending; i++) {
            one.index = d->pending[i].head;
            vu_queue_push(dev, vq, &one, d->pending[i].len);
        }
        d->npending = 0;
        lw_notify(d, qidx);
    } else if (count && !lw_tracking(d, qidx)) {
        vu_queue_flush(dev, vq, count);
        lw_notify(d, qidx);
    }
}

/* The plain requests' path, in C (see vhost/blk.py, "the hot path"): reads, writes that
 * need nothing but the image and, in `logwrites` mode, one staged record at the end of the
 * log's zeroed room, and FLUSHes. lw_serve pops and serves such requests until the ring is
 * empty, the batch must be published, or it pops one it leaves to Python (anything else,
 * anything near a limit, a write whose system call failed): Python then serves that request
 * from the start, as if C had never seen it (writing the same guest data to the same place
 * again is harmless, and nothing of it was counted). A FLUSH whose sync failed is not served
 * again (a second fdatasync could succeed where the first lost the error): it is handed back
 * with its errno. What C did is left in `f` for Python to take over: the entries it appended
 * in order (`blocks`: a record's log blocks, 0 for a FLUSH, which carried every record before
 * it), the counters. */
#define LW_SERVE_EMPTY 0        /* the ring is empty */
#define LW_SERVE_POPPED 1       /* `req` holds a popped request for Python */
#define LW_SERVE_PUBLISH 2      /* the batch must be published now */
#define LW_SERVE_FLUSHED 3      /* a FLUSH completed (filled): the batch is published */
#define LW_SERVE_IMAGE_NOT_DURABLE 4   /* `req` is a FLUSH whose image sync failed (`error`) */
#define LW_SERVE_LOG_NOT_DURABLE 5     /* `req` is a FLUSH whose log sync or count failed */
#define LW_FAST_BATCH 64        /* = vhost/blk.py BATCH */
#define LW_FAST_STAGED_MAX 1024 /* entries C appends before Python takes them */
#define LW_FAST_PUBLISH_AFTER (64 << 10)
#define LW_ENTRY_MAX 4096       /* the largest sectorsize: one header block */

struct LwFast {
    int image_fd;
    int log_fd;                 /* -1: nothing is logged (passthrough) */
    uint64_t size;              /* the device's bytes */
    uint32_t sectorsize;
    bool writes;                /* writes may be served here (not read-only, log not full,
                                   write cache on) */
    uint64_t write_max;         /* writes of fewer bytes are served here */
    uint64_t entry_max;         /* log entries of fewer bytes (else they go direct, in Python) */
    bool flushes;               /* FLUSHes may be served here (no observer of the log, not
                                   read-only, log not full) */
    bool start_writeback;       /* sync_file_range works on the image */
    uint64_t next_block;        /* the log's next entry, in sectorsize blocks */
    uint64_t next_index;        /* the log's next entry's index */
    uint64_t room_end;          /* the log's zeroed room ends here (bytes) */
    unsigned int staged;        /* entries appended by C since Python last took them */
    uint32_t blocks[LW_FAST_STAGED_MAX];    /* their log blocks in order; 0: a FLUSH */
    int error;                  /* errno of the failed sync (LW_SERVE_*_NOT_DURABLE) */
    uint64_t reads, writes_done, flushes_done, bytes_read, bytes_written;
    uint64_t kicks;             /* kicks served wholly in C, Python asleep (lw_wait) */
    /* Big writes (vhost/pipeline.py's, in C): see "Big writes in flight" below. */
    bool big_writes;            /* logged big writes may be served here (on_log_full fail) */
    int log_direct_fd;          /* an O_DIRECT descriptor on the log; -1: none */
    uint64_t log_limit;         /* the log may not grow past this many bytes */
    uint64_t errors;            /* requests C completed with IOERR (a big write not logged) */
    int big_failed;             /* 0, or why big writes were not logged: an errno, or
                                   LW_BIG_SIZE_LIMIT (Python says what it means) */
    uint64_t big_unlogged;      /* big writes completed IOERR since Python last looked */
    uint64_t big_done;          /* big writes completed OK, logged by the log thread */
    struct LwBig *big;          /* the log thread and its slots; NULL until first needed */
    uint8_t header[LW_ENTRY_MAX];        /* a write's header block: zeros, sector and size go in */
    uint8_t flush_header[LW_ENTRY_MAX];  /* the FLUSH entry (Python encodes it) */
    uint8_t super_block[LW_ENTRY_MAX];   /* the super block (Python encodes it; count at 16) */
};

LwFast *lw_fast_new(void)
{
    LwFast *f = calloc(1, sizeof(LwFast));
    if (f) {
        f->log_direct_fd = -1;
        f->log_limit = UINT64_MAX;
    }
    return f;
}

static void lw_big_stop(LwFast *f);

void lw_fast_free(LwFast *f)
{
    lw_big_stop(f);
    free(f);
}

int lw_start_writeback(int fd);    /* below, with the other system calls */

static void lw_put_le64(uint8_t *at, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        at[i] = (uint8_t)(v >> (8 * i));
    }
}

/* Whether `req` is well formed and inside the device, in whole sectors. */
static bool lw_in_range(LwFast *f, LwReq *req)
{
    uint64_t offset = req->sector * 512, nbytes = req->len, ss = f->sectorsize;
    return req->problem == LW_REQ_OK && req->sector <= (UINT64_MAX >> 9)
        && !(offset % ss) && !(nbytes % ss) && offset <= f->size && nbytes <= f->size - offset;
}

/* A write's record in `iov`: its header block (`header`: zeros but for the sector and size
 * put in here; flags and data_len stay 0), then the guest's buffers. Returns the count. */
static int lw_record_iov(LwFast *f, LwReq *req, uint8_t *header, struct iovec *iov)
{
    uint64_t ss = f->sectorsize;
    lw_put_le64(header, req->sector * 512 / ss);
    lw_put_le64(header + 8, req->len / ss);
    iov[0].iov_base = header;
    iov[0].iov_len = ss;
    memcpy(&iov[1], req->iov, req->niov * sizeof(struct iovec));
    return (int)req->niov + 1;
}

/* Serve `req` here if it is plain; its used length, or 0 to leave it to Python. */
static uint32_t lw_serve_one(LwFast *f, LwReq *req)
{
    uint64_t offset = req->sector * 512, nbytes = req->len, ss = f->sectorsize;
    if (!lw_in_range(f, req)) {
        return 0;
    }
    if (req->type == VIRTIO_BLK_T_IN) {
        if (nbytes && preadv(f->image_fd, req->iov, req->niov, offset) != (ssize_t)nbytes) {
            return 0;
        }
        f->reads++;
        f->bytes_read += nbytes;
        return (uint32_t)nbytes + 1;
    }
    if (req->type != VIRTIO_BLK_T_OUT || !f->writes || !nbytes || nbytes >= f->write_max
            || f->staged == LW_FAST_STAGED_MAX) {
        return 0;
    }
    uint64_t entry = ss + nbytes, at = f->next_block * ss;
    if (f->log_fd >= 0 && (entry >= f->entry_max || at + entry > f->room_end
                           || req->niov >= VIRTQUEUE_MAX_SIZE)) {
        return 0;
    }
    if (pwritev(f->image_fd, req->iov, req->niov, offset) != (ssize_t)nbytes) {
        return 0;
    }
    if (f->log_fd >= 0) {
        /* The record, staged (counted by the FLUSH that carries it). */
        struct iovec iov[VIRTQUEUE_MAX_SIZE + 1];
        if (pwritev(f->log_fd, iov, lw_record_iov(f, req, f->header, iov), at)
                != (ssize_t)entry) {
            return 0;
        }
        f->blocks[f->staged++] = (uint32_t)(entry / ss);
        f->next_block += entry / ss;
        f->next_index++;
    }
    f->writes_done++;
    f->bytes_written += nbytes;
    return 1;
}

/* A FLUSH, as vhost/blk.py's _flush and LogWritesSink.flush_durable serve it when it carries
 * every staged record (it always does when requests are served in pop order): start the
 * image's writeback, append the FLUSH entry, sync the log, sync the image, then count the
 * entries (the count's own sync rides on the next commit, as LogWriter.commit defers it). */
static int lw_flush(LwFast *f)
{
    if (f->log_fd < 0) {
        if (fdatasync(f->image_fd)) {
            f->error = errno;
            return LW_SERVE_IMAGE_NOT_DURABLE;
        }
        f->blocks[f->staged++] = 0;
        return LW_SERVE_FLUSHED;
    }
    uint64_t ss = f->sectorsize, at = f->next_block * ss, count = f->next_index + 1;
    if (at + ss > f->room_end) {
        return LW_SERVE_POPPED;
    }
    if (f->start_writeback && lw_start_writeback(f->image_fd) < 0) {
        f->start_writeback = false;     /* best effort: fdatasync does all the work then */
    }
    if (pwrite(f->log_fd, f->flush_header, ss, at) != (ssize_t)ss) {
        return LW_SERVE_POPPED;         /* nothing synced yet: Python appends it again */
    }
    if (fdatasync(f->log_fd)) {
        f->error = errno;
        return LW_SERVE_LOG_NOT_DURABLE;
    }
    if (fdatasync(f->image_fd)) {
        f->error = errno;
        return LW_SERVE_IMAGE_NOT_DURABLE;
    }
    lw_put_le64(f->super_block + 16, count);
    errno = 0;                          /* a short write sets none */
    if (pwrite(f->log_fd, f->super_block, ss, 0) != (ssize_t)ss) {
        f->error = errno ? errno : EIO;
        return LW_SERVE_LOG_NOT_DURABLE;
    }
    f->next_block++;
    f->next_index++;
    f->blocks[f->staged++] = 0;
    return LW_SERVE_FLUSHED;
}

/* Big writes in flight (vhost/pipeline.py's pipeline, in C, for the same reasons: a logged MiB
 * is a copy into the image's page cache and an O_DIRECT write of about a millisecond to the
 * log's disk, and the disks should never wait for the guest). The device's thread pops a big
 * write, writes it to the image and hands it to the log thread, which appends its record
 * (header block and payload, straight from the guest's buffers) in pop order; the device's
 * thread pops on meanwhile and completes each in pop order once its record is in the log, one
 * used entry published at a time. So the log's records are in completion order, a record is
 * logged only after its image write succeeded (none is ever taken back), and the guest's
 * buffers stay the device's until the request completes. Anything else popped meanwhile waits
 * until every big write in flight completed (it is served alone, in pop order), and lw_serve
 * never returns with one in flight: the log's end (next_block) has one writer at a time.
 *
 * A write whose image write failed is handed to Python from the start, as for plain writes
 * (it fails there again and is reported). When the log cannot take a record (its size limit,
 * or an error writing it), that request and every one behind it complete IOERR unlogged (they
 * are on the image: none may be logged after a hole in completion order), writes stop being
 * served here, and `big_failed` tells Python why; Python decides what the error means (a full
 * log, or one not to trust: LogWriter.write_failed) before it serves anything else. */
#define LW_BIG_DEPTH 8          /* = vhost/pipeline.py DEPTH */
#define LW_BIG_LOGGED 0
#define LW_BIG_SIZE_LIMIT (-1)  /* the record would grow the log past `log_limit` */
#define LW_IOV_MAX 1024         /* Linux UIO_MAXIOV */
#define LW_ALIGN 4096

struct LwBigSlot {
    LwReq req;                  /* the popped request; its element is freed when completed */
    uint32_t blocks;            /* the record's log blocks: header and payload */
    int result;                 /* set by the log thread: LW_BIG_LOGGED, an errno or
                                   LW_BIG_SIZE_LIMIT */
};

struct LwBig {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t work;        /* the log thread waits for a slot */
    pthread_cond_t done;        /* the device's thread waits for the oldest record */
    bool quit;
    bool log_waits, device_waits;    /* a signal is sent only to a thread that waits */
    /* Sequence numbers: written to the image (and queued), logged, completed. */
    unsigned int queued, logged, completed;
    uint64_t at;                /* where the log thread appends next (bytes) */
    int broken;                 /* why a record failed: every later one fails the same way */
    uint8_t *headers;           /* a header block per slot, aligned for O_DIRECT */
    struct LwBigSlot slot[LW_BIG_DEPTH];
};

/* The record of slot `s` at `at`: LW_BIG_LOGGED, or why not (an errno, LW_BIG_SIZE_LIMIT). */
static int lw_big_append(LwFast *f, struct LwBigSlot *s, uint8_t *header, uint64_t at)
{
    uint64_t ss = f->sectorsize, entry = (uint64_t)s->blocks * ss;
    if (at > f->log_limit || entry > f->log_limit - at) {
        return LW_BIG_SIZE_LIMIT;
    }
    struct iovec iov[LW_IOV_MAX];
    int niov = lw_record_iov(f, &s->req, header, iov);
    ssize_t n = -1;
    errno = EINVAL;
    if (f->log_direct_fd >= 0) {
        n = pwritev(f->log_direct_fd, iov, niov, at);
    }
    if (n < 0 && errno == EINVAL) {
        /* No O_DIRECT here, or buffers it cannot take as they are: through the page cache. */
        n = pwritev(f->log_fd, iov, niov, at);
    }
    if (n == (ssize_t)entry) {
        return LW_BIG_LOGGED;
    }
    return n >= 0 ? ENOSPC : errno;     /* short: the filesystem ran out of room part-way */
}

static void *lw_big_log_thread(void *arg)
{
    LwFast *f = arg;
    struct LwBig *b = f->big;
    pthread_mutex_lock(&b->lock);
    for (;;) {
        while (b->logged == b->queued && !b->quit) {
            b->log_waits = true;
            pthread_cond_wait(&b->work, &b->lock);
            b->log_waits = false;
        }
        if (b->logged == b->queued) {
            break;
        }
        unsigned int i = b->logged % LW_BIG_DEPTH;
        struct LwBigSlot *s = &b->slot[i];
        uint64_t at = b->at;
        int result = b->broken;
        pthread_mutex_unlock(&b->lock);
        if (!result) {
            result = lw_big_append(f, s, b->headers + i * LW_ALIGN, at);
        }
        pthread_mutex_lock(&b->lock);
        s->result = result;
        if (result == LW_BIG_LOGGED) {
            b->at += (uint64_t)s->blocks * f->sectorsize;
        } else {
            b->broken = result;
        }
        b->logged++;
        if (b->device_waits) {
            pthread_cond_signal(&b->done);
        }
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* The log thread, started on the first big write; false if it cannot be (Python serves). */
static bool lw_big_ready(LwFast *f)
{
    if (f->big) {
        return true;
    }
    struct LwBig *b = calloc(1, sizeof(*b));
    if (!b) {
        return false;
    }
    if (posix_memalign((void **)&b->headers, LW_ALIGN, LW_BIG_DEPTH * LW_ALIGN)) {
        free(b);
        return false;
    }
    memset(b->headers, 0, LW_BIG_DEPTH * LW_ALIGN);
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->work, NULL);
    pthread_cond_init(&b->done, NULL);
    f->big = b;
    /* Signals are Python's, on its main thread: the log thread takes none. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int failed = pthread_create(&b->thread, NULL, lw_big_log_thread, f);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (failed) {
        f->big = NULL;
        free(b->headers);
        free(b);
        return false;
    }
    return true;
}

static void lw_big_stop(LwFast *f)
{
    struct LwBig *b = f->big;
    if (!b) {
        return;
    }
    pthread_mutex_lock(&b->lock);
    b->quit = true;
    pthread_cond_signal(&b->work);
    pthread_mutex_unlock(&b->lock);
    pthread_join(b->thread, NULL);
    pthread_mutex_destroy(&b->lock);
    pthread_cond_destroy(&b->work);
    pthread_cond_destroy(&b->done);
    free(b->headers);
    free(b);
    f->big = NULL;
}

static unsigned int lw_big_inflight(LwFast *f)
{
    return f->big ? f->big->queued - f->big->completed : 0;
}

/* Whether `req` is a big write for the pipeline: a logged write whose entry goes direct (or
 * that is served in Python otherwise), with room in C's table for its record. */
static bool lw_big_takes(LwFast *f, LwReq *req)
{
    uint64_t nbytes = req->len;
    return req->type == VIRTIO_BLK_T_OUT && f->big_writes && f->writes && f->log_fd >= 0
        && (nbytes >= f->write_max || f->sectorsize + nbytes >= f->entry_max)
        && req->niov < LW_IOV_MAX && lw_in_range(f, req)
        && f->staged + lw_big_inflight(f) < LW_FAST_STAGED_MAX;
}

/* Complete the oldest big write in flight and publish it at once. */
static void lw_big_complete_oldest(LwDev *d, int qidx, LwFast *f)
{
    struct LwBig *b = f->big;
    pthread_mutex_lock(&b->lock);
    while (b->logged == b->completed) {
        b->device_waits = true;
        pthread_cond_wait(&b->done, &b->lock);
        b->device_waits = false;
    }
    pthread_mutex_unlock(&b->lock);
    /* The slot is the device thread's again: the log thread is done with it. */
    struct LwBigSlot *s = &b->slot[b->completed % LW_BIG_DEPTH];
    uint8_t status = VIRTIO_BLK_S_OK;
    if (s->result == LW_BIG_LOGGED) {
        f->blocks[f->staged++] = s->blocks;
        f->next_block += s->blocks;
        f->next_index++;
        f->bytes_written += s->req.len;
        f->big_done++;
    } else {
        status = VIRTIO_BLK_S_IOERR;
        f->errors++;
        f->big_unlogged++;
        if (!f->big_failed) {
            f->big_failed = s->result;
        }
        f->writes = false;      /* nothing more until Python made the device log-full */
        f->flushes = false;
    }
    lw_fill(d, qidx, &s->req, status, 1, 0);
    lw_publish(d, qidx, 1);
    b->completed++;
}

static void lw_big_drain(LwDev *d, int qidx, LwFast *f)
{
    while (lw_big_inflight(f)) {
        lw_big_complete_oldest(d, qidx, f);
    }
}

/* Write `req` to the image and put it in flight; false (nothing in flight added, `req` still
 * the caller's) if the image write failed or the log thread cannot start. */
static bool lw_big_start(LwDev *d, int qidx, LwFast *f, LwReq *req)
{
    if (!lw_big_ready(f)) {
        return false;
    }
    struct LwBig *b = f->big;
    if (b->queued - b->completed == LW_BIG_DEPTH) {
        lw_big_complete_oldest(d, qidx, f);
        if (!f->writes) {
            return false;       /* that one was not logged: this one must not touch the image */
        }
    }
    uint64_t nbytes = req->len;
    if (pwritev(f->image_fd, req->iov, req->niov, req->sector * 512) != (ssize_t)nbytes) {
        return false;
    }
    struct LwBigSlot *s = &b->slot[b->queued % LW_BIG_DEPTH];
    s->req = *req;
    s->blocks = (uint32_t)(1 + nbytes / f->sectorsize);
    req->elem = NULL;
    f->writes_done++;
    pthread_mutex_lock(&b->lock);
    if (b->queued == b->completed) {
        /* A new run: the log's end is where the device's thread left it, and a failure of an
         * earlier run was reported (big_failed). */
        b->at = f->next_block * f->sectorsize;
        b->broken = 0;
    }
    b->queued++;
    if (b->log_waits) {
        pthread_cond_signal(&b->work);
    }
    pthread_mutex_unlock(&b->lock);
    return true;
}

int lw_serve(LwDev *d, int qidx, LwReq *req, LwFast *f, unsigned int *filled)
{
    for (;;) {
        if (!lw_pop(d, qidx, req)) {
            if (lw_big_inflight(f)) {
                /* The guest refills while the others are still in flight. */
                lw_big_complete_oldest(d, qidx, f);
                continue;
            }
            return LW_SERVE_EMPTY;
        }
        if (lw_big_takes(f, req)) {
            if (*filled) {
                lw_publish(d, qidx, *filled);
                *filled = 0;
            }
            if (lw_big_start(d, qidx, f, req)) {
                continue;
            }
            lw_big_drain(d, qidx, f);
            return LW_SERVE_POPPED;
        }
        lw_big_drain(d, qidx, f);       /* anything else is served alone, in pop order */
        if (req->type == VIRTIO_BLK_T_FLUSH && req->problem == LW_REQ_OK && f->flushes
                && f->staged < LW_FAST_STAGED_MAX) {
            int got = lw_flush(f);
            if (got == LW_SERVE_FLUSHED) {
                f->flushes_done++;
                lw_fill(d, qidx, req, VIRTIO_BLK_S_OK, 1, (*filled)++);
            }
            return got;
        }
        uint64_t nbytes = req->len;
        uint32_t used_len = lw_serve_one(f, req);
        if (!used_len) {
            return LW_SERVE_POPPED;
        }
        lw_fill(d, qidx, req, VIRTIO_BLK_S_OK, used_len, (*filled)++);
        if (*filled >= LW_FAST_BATCH || nbytes >= LW_FAST_PUBLISH_AFTER) {
            return LW_SERVE_PUBLISH;
        }
    }
}

/* A kick while lw_wait has the plain path (see there): served like Python's kick serves it
 * with lw_serve, published here, until the ring is empty. Anything else lw_serve returns (a
 * request it popped for Python, a failed sync, a big write the log could not take) goes to
 * Python's kick with the batch as it stands; so does the kick when the entries C appended near
 * what the table holds. */
static void lw_kick_in_c(LwDev *d, int qidx)
{
    LwFast *f = d->kick_fast;
    unsigned int filled = 0;
    while (f->staged + LW_FAST_BATCH <= LW_FAST_STAGED_MAX) {
        int got = lw_serve(d, qidx, d->kick_req, f, &filled);
        /* A big write the log could not take: Python makes the device log-full first. */
        bool on = !f->big_failed;
        if (on && (got == LW_SERVE_PUBLISH || got == LW_SERVE_FLUSHED)) {
            lw_publish(d, qidx, filled);
            filled = 0;
            continue;
        }
        if (on && got == LW_SERVE_EMPTY) {
            lw_publish(d, qidx, filled);
            f->kicks++;
            return;
        }
        LW_UPCALL(d, lw_py_kick_from, qidx, got, filled);
        return;
    }
    lw_publish(d, qidx, filled);
    LW_UPCALL(d, lw_py_kick, qidx);
}

#define LW_WAIT_EVENTS 16

/* The serve loop's wait (vhost/server.py): block on its epoll set `epfd` and serve
 * libvhost-user's watches (kicks) here as they fire; return when another fd is readable,
 * with those fds in `fds` (at most `max`), for Python's callbacks. With `f` and `req` lent
 * (the device's plain path, in sync with Python's state), a kick's plain requests are served
 * wholly in C: at queue depth 1 a request then costs no Python at all. What C staged meanwhile
 * Python takes when this returns, before anything else of its own runs; so the wait also
 * returns (0, or the fds found so far) as soon as Python ran inside it (a kick left to it, a
 * panic): its state may have moved, and the next wait lends the path in sync again. The
 * epoll set is level-triggered, so events left unread come back at the next wait. -errno on
 * failure; 0 when a signal interrupted (Python runs its handlers). */
int lw_wait(LwDev *d, int epfd, int *fds, int max, LwFast *f, LwReq *req)
{
    struct epoll_event ev[LW_WAIT_EVENTS];
    int want = max < LW_WAIT_EVENTS ? max : LW_WAIT_EVENTS, out = 0;
    bool python_ran = false;
    d->kick_fast = f;
    d->kick_req = req;
    d->upcalled = false;
    while (!out && !python_ran) {
        int n = epoll_wait(epfd, ev, want, -1);
        if (n < 0) {
            out = errno == EINTR ? 0 : -errno;
            break;
        }
        for (int i = 0; i < n && !python_ran; i++) {
            struct LwWatch *w = lw_watch_find(d, ev[i].data.fd);
            if (!w) {
                fds[out++] = ev[i].data.fd;
                continue;
            }
            w->cb(&d->dev, VU_WATCH_IN, w->data);
            python_ran = d->upcalled;   /* a panic too: vu_panic calls lw_panic */
        }
    }
    d->kick_fast = NULL;
    d->kick_req = NULL;
    return out;
}

bool lw_queue_started(LwDev *d, int qidx)
{
    return d->dev.vq && vu_queue_started(&d->dev, &d->dev.vq[qidx]);
}

/* fallocate(2) with modes Python's os module does not offer (punch hole, zero range). */
#include <linux/falloc.h>
int lw_fallocate(int fd, int mode, uint64_t offset, uint64_t len)
{
    return fallocate(fd, mode, (off_t)offset, (off_t)len) == 0 ? 0 : -errno;
}

/* Start writing a file's dirty pages back without waiting (sync_file_range(2), which Python's
 * os module does not offer): a FLUSH starts the image's writeback, syncs the log, then waits
 * for the image with fdatasync, so the two files' I/O overlaps without a second thread. */
int lw_start_writeback(int fd)
{
    return sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : -errno;
}
