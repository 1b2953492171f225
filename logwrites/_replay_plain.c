/* The common case of the replay hot loop (logwrites/replay.py, `_replay_fast`) in C.
 *
 * lw_replay_plain() walks a dm-log-writes log from `walk->index` (header at byte `walk->at`)
 * and applies plain writes (flags within FUA|METADATA, data_len 0, zero padding after the
 * 32-byte header, payload inside the log) and entries without payload (flags within
 * FLUSH|FUA|METADATA: nothing to do on the target). It returns 0 when it reaches entry `stop`
 * or the first entry it does not handle (a discard, a mark, a write flagged FLUSH, any entry the
 * Python validator would have to look at, a header or payload past the end of the log): Python
 * handles that one entry with its own code, so every error message stays in one place, and
 * calls again. It returns -1 when a system call fails (`walk->err`, `walk->failed`).
 *
 * The read buffer belongs to the caller and is shared with it: `buf_start`/`buf_end` say which
 * log bytes it holds, so the entry handed back is usually already in it.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define LW_FLUSH 1u
#define LW_FUA 2u
#define LW_METADATA 16u
#define LW_INLINE_OFFSET 32u
/* logwrites/logfile.py: BUFFERED_PAYLOAD; bigger payloads are copied in the kernel. */
#define LW_BUFFERED_PAYLOAD (64u << 10)

/* cdef begin: logwrites/_replay_build.py hands this part to cffi as what Python may touch. */
#define LW_FAILED_SYSCALL 1     /* a system call failed: errno in `err` */
#define LW_FAILED_SHORT_WRITE 2 /* the target took no more bytes at `fail_at` */
#define LW_FAILED_LOG_ENDED 3   /* the log ended inside a payload, at `fail_at` */

struct lw_replay {
    uint64_t index;     /* in/out: the next entry to apply */
    uint64_t at;        /* in/out: the byte offset of its header in the log */
    uint64_t buf_start; /* in/out: the log bytes [buf_start, buf_end) are in the buffer */
    uint64_t buf_end;
    int big_step;       /* in/out: the last entry's payload was not buffered */
    uint64_t c_entries; /* out, added to: entries applied here (proof the C path ran) */
    uint64_t writes;
    uint64_t flushes;
    uint64_t fuas;
    uint64_t bytes_written;
    uint64_t bytes_read;
    int err;            /* out, on failure */
    int failed;
    uint64_t fail_at;
};

int lw_replay_plain(int log_fd, int target_fd, uint64_t stop, uint32_t sectorsize,
                    uint64_t log_size, unsigned char *buf, size_t buf_size,
                    struct lw_replay *walk);
/* cdef end */

static int lw_fail(struct lw_replay *walk, int failed, int err, uint64_t at)
{
    walk->failed = failed;
    walk->err = err;
    walk->fail_at = at;
    return -1;
}

static ssize_t lw_pread(int fd, void *buf, size_t length, uint64_t at)
{
    ssize_t got;
    do {
        got = pread(fd, buf, length, (off_t)at);
    } while (got < 0 && errno == EINTR);
    return got;
}

/* All of `length` bytes, or -1 (errno set, or 0 for a write that made no progress). */
static int lw_pwrite_all(int fd, const unsigned char *data, uint64_t length, uint64_t at,
                         struct lw_replay *walk)
{
    while (length) {
        ssize_t written = pwrite(fd, data, length, (off_t)at);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return lw_fail(walk, LW_FAILED_SYSCALL, errno, at);
        }
        if (written == 0)
            return lw_fail(walk, LW_FAILED_SHORT_WRITE, EIO, at);
        data += written;
        length -= (uint64_t)written;
        at += (uint64_t)written;
    }
    return 0;
}

/* A large payload, log -> target: in the kernel if it can, else through the buffer (which
 * then holds none of the log's headers). Same fallbacks as replay.py's `_copy_payload`. */
static int lw_copy_big(int log_fd, int target_fd, uint64_t length, uint64_t src_at,
                       uint64_t dst_at, unsigned char *buf, size_t buf_size,
                       struct lw_replay *walk)
{
    while (length) {
        loff_t src = (loff_t)src_at, dst = (loff_t)dst_at;
        ssize_t copied = copy_file_range(log_fd, &src, target_fd, &dst, length, 0);
        if (copied < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP
                || errno == EBADF)
                break;
            return lw_fail(walk, LW_FAILED_SYSCALL, errno, dst_at);
        }
        if (copied == 0)
            break; /* not expected for a regular log; finish through the buffer */
        length -= (uint64_t)copied;
        src_at += (uint64_t)copied;
        dst_at += (uint64_t)copied;
    }
    if (length) {
        walk->buf_start = walk->buf_end = 0;
    }
    while (length) {
        size_t want = length < buf_size ? (size_t)length : buf_size;
        ssize_t got = lw_pread(log_fd, buf, want, src_at);
        if (got < 0)
            return lw_fail(walk, LW_FAILED_SYSCALL, errno, src_at);
        if (got == 0)
            return lw_fail(walk, LW_FAILED_LOG_ENDED, EIO, src_at);
        if (lw_pwrite_all(target_fd, buf, (uint64_t)got, dst_at, walk) < 0)
            return -1;
        length -= (uint64_t)got;
        src_at += (uint64_t)got;
        dst_at += (uint64_t)got;
    }
    return 0;
}

static int lw_zero_padding(const unsigned char *header, uint32_t sectorsize)
{
    const unsigned char *padding = header + LW_INLINE_OFFSET;
    size_t length = sectorsize - LW_INLINE_OFFSET;
    /* Every byte equals its successor and the first is zero: a memcmp, no zero block. */
    return padding[0] == 0 && memcmp(padding, padding + 1, length - 1) == 0;
}

int lw_replay_plain(int log_fd, int target_fd, uint64_t stop, uint32_t sectorsize,
                    uint64_t log_size, unsigned char *buf, size_t buf_size,
                    struct lw_replay *walk)
{
    const uint64_t ss = sectorsize;
    /* Offsets stay below 2^62, so no sum or product below overflows (Python raises its own
     * errors for anything bigger, with its own integers). */
    const uint64_t limit = (uint64_t)1 << 62;

    if (ss <= LW_INLINE_OFFSET || buf_size < 2 * ss || log_size >= limit)
        return 0;
    while (walk->index < stop) {
        uint64_t at = walk->at;
        if (at + ss > walk->buf_end || at < walk->buf_start) {
            if (at + ss > log_size)
                return 0; /* Python names the entry whose header is missing */
            /* After a large payload the next entry is likely large too: read its header
             * alone rather than a chunk of payload only to step over it. */
            ssize_t got = lw_pread(log_fd, buf, walk->big_step ? ss : buf_size, at);
            if (got < 0)
                return lw_fail(walk, LW_FAILED_SYSCALL, errno, at);
            walk->bytes_read += (uint64_t)got;
            walk->buf_start = at;
            walk->buf_end = at + (uint64_t)got;
            if ((uint64_t)got < ss)
                return 0;
        }
        uint64_t pos = at - walk->buf_start;
        const unsigned char *header = buf + pos;
        uint64_t fields[4];
        memcpy(fields, header, sizeof(fields));
        uint64_t sector = le64toh(fields[0]), nr_sectors = le64toh(fields[1]);
        uint64_t flags = le64toh(fields[2]), data_len = le64toh(fields[3]);
        uint64_t next_at;
        int big = 0;

        if (data_len || !lw_zero_padding(header, sectorsize))
            return 0;
        if (nr_sectors == 0) {
            if (flags == 0 || (flags & ~(uint64_t)(LW_FLUSH | LW_FUA | LW_METADATA)))
                return 0;
            next_at = at + ss;
            if (flags & LW_FLUSH)
                walk->flushes++;
        } else {
            if (flags & ~(uint64_t)(LW_FUA | LW_METADATA))
                return 0;
            if (nr_sectors > log_size / ss || sector >= limit / ss)
                return 0;
            uint64_t length = nr_sectors * ss;
            uint64_t dst = sector * ss;
            next_at = at + ss + length;
            if (next_at > log_size)
                return 0;
            big = length > LW_BUFFERED_PAYLOAD;
            if (big) {
                if (lw_copy_big(log_fd, target_fd, length, at + ss, dst, buf, buf_size, walk) < 0)
                    return -1;
            } else {
                if (next_at > walk->buf_end) {
                    ssize_t got = lw_pread(log_fd, buf, buf_size, at);
                    if (got < 0)
                        return lw_fail(walk, LW_FAILED_SYSCALL, errno, at);
                    walk->bytes_read += (uint64_t)got;
                    walk->buf_start = at;
                    walk->buf_end = at + (uint64_t)got;
                    pos = 0;
                    if (next_at > walk->buf_end)
                        return 0;
                }
                if (lw_pwrite_all(target_fd, buf + pos + ss, length, dst, walk) < 0)
                    return -1;
            }
            walk->writes++;
            walk->bytes_written += length;
        }
        if (flags & LW_FUA)
            walk->fuas++;
        walk->big_step = big;
        walk->at = next_at;
        walk->index++;
        walk->c_entries++;
    }
    return 0;
}
