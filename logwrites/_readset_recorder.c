/* An LD_PRELOAD read recorder: which byte ranges of one file did this process read?
 *
 * logwrites/check.py runs `e2fsck -fn` under it. e2fsck's verdict is a function of the bytes
 * it reads (and of the image's size, its argv, its config and the clock, constant over one
 * loop), so a later crash state whose image holds the same bytes at every range read here gets
 * the same verdict without running e2fsck again.
 *
 * LW_READSET_IMAGE names the file to watch (matched by device and inode after every open, not
 * by name); LW_READSET_OUT names the file the ranges go to at exit. Reads through pread,
 * pread64, preadv(2), preadv64(v2), read, readv and their _chk variants on a descriptor of the
 * image (opened by open/open64/openat/openat64 or their __*_2 variants, and dup/dup2/dup3/
 * fcntl(F_DUPFD*) copies of it) are recorded as (offset, length) of the bytes returned.
 * Anything this file cannot account for marks the record incomplete, which the caller treats
 * as "no read set": the image opened by fopen/fdopen (stdio reads inside libc, unseen), mmap,
 * sendfile, copy_file_range or splice from it, a descriptor past LW_MAX_FD, a failed read or
 * lseek, no memory left. Not seen at all: raw syscall(2) and io_uring reads (e2fsck uses
 * neither); a record that misses the superblock is refused by the caller.
 *
 * Output (little-endian, written by the process that loaded us, in a destructor, so only a
 * normal exit() leaves a file): "LWRSET01", u64 flags (bit 0: incomplete), u64 count, then
 * count pairs of u64 (offset, length), sorted and merged.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <endian.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define LW_MAX_FD 4096
#define LW_INCOMPLETE 1u

struct lw_range {
	uint64_t offset, length;
};

static int active;              /* LW_READSET_IMAGE was given and could be stat'ed */
static dev_t image_dev, image_rdev;
static ino_t image_ino;
static int image_is_blk;
static pid_t owner;             /* only this process writes the output */
static unsigned char tracked[LW_MAX_FD];
static struct lw_range *ranges;
static size_t nr_ranges, cap_ranges;
static unsigned flags;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; /* libext2fs reads bitmaps in threads */

#define REAL(ret, name, args) \
	static ret (*real_##name) args; \
	if (!real_##name) \
		real_##name = (ret (*) args)dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void lw_init(void)
{
	const char *path = getenv("LW_READSET_IMAGE");
	struct stat st;

	active = 0;
	if (!path || !getenv("LW_READSET_OUT") || stat(path, &st) != 0)
		return;
	image_dev = st.st_dev;
	image_ino = st.st_ino;
	image_rdev = st.st_rdev;
	image_is_blk = S_ISBLK(st.st_mode);
	owner = getpid();
	active = 1;
}

/* Called by the fork server (logwrites/_forkserver.c) in each copy it forks before main():
 * that copy is the run to record, from a clean slate, for the image as it is now. */
__attribute__((visibility("default"))) void lw_readset_restart(void)
{
	memset(tracked, 0, sizeof(tracked));
	nr_ranges = 0;
	flags = 0;
	lw_init();
}

static void mark_incomplete(void)
{
	pthread_mutex_lock(&lock);
	flags |= LW_INCOMPLETE;
	pthread_mutex_unlock(&lock);
}

static int is_image_fd(int fd)
{
	struct stat st;

	if (fd < 0 || fstat(fd, &st) != 0)
		return 0;
	if (image_is_blk)
		return S_ISBLK(st.st_mode) && st.st_rdev == image_rdev;
	return st.st_dev == image_dev && st.st_ino == image_ino;
}

static int opened(int fd)
{
	if (!active || fd < 0)
		return fd;
	if (fd >= LW_MAX_FD) {
		if (is_image_fd(fd))
			mark_incomplete();
		return fd;
	}
	tracked[fd] = (unsigned char)is_image_fd(fd);
	return fd;
}

static int copied(int old, int fd)
{
	if (!active || fd < 0)
		return fd;
	if (fd >= LW_MAX_FD) {
		if (old >= 0 && old < LW_MAX_FD && tracked[old])
			mark_incomplete();
		return fd;
	}
	tracked[fd] = old >= 0 && old < LW_MAX_FD && tracked[old];
	return fd;
}

static int is_tracked(int fd)
{
	return active && fd >= 0 && fd < LW_MAX_FD && tracked[fd];
}

static void record(int64_t offset, ssize_t got)
{
	if (got <= 0)
		return;
	pthread_mutex_lock(&lock);
	if (nr_ranges == cap_ranges) {
		size_t cap = cap_ranges ? cap_ranges * 2 : 1024;
		struct lw_range *grown = realloc(ranges, cap * sizeof(*ranges));

		if (!grown) {
			flags |= LW_INCOMPLETE;
			pthread_mutex_unlock(&lock);
			return;
		}
		ranges = grown;
		cap_ranges = cap;
	}
	ranges[nr_ranges].offset = (uint64_t)offset;
	ranges[nr_ranges].length = (uint64_t)got;
	nr_ranges++;
	pthread_mutex_unlock(&lock);
}

/* A positional read: (offset, bytes returned); a failed one leaves the record incomplete. */
static ssize_t at(int fd, int64_t offset, ssize_t got)
{
	if (is_tracked(fd)) {
		if (got < 0)
			mark_incomplete();
		else
			record(offset, got);
	}
	return got;
}

/* Where a read(2) on a tracked fd starts, or -1 (then the record is incomplete). */
static int64_t position(int fd)
{
	int64_t pos;

	if (!is_tracked(fd))
		return 0;
	pos = lseek(fd, 0, SEEK_CUR);
	if (pos < 0)
		mark_incomplete();
	return pos;
}

static mode_t mode_arg(int oflags, va_list ap)
{
	return (oflags & O_CREAT) || (oflags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int oflags, ...)
{
	va_list ap;
	mode_t mode;
	REAL(int, open, (const char *, int, ...));

	va_start(ap, oflags);
	mode = mode_arg(oflags, ap);
	va_end(ap);
	return opened(real_open(path, oflags, mode));
}

int open64(const char *path, int oflags, ...)
{
	va_list ap;
	mode_t mode;
	REAL(int, open64, (const char *, int, ...));

	va_start(ap, oflags);
	mode = mode_arg(oflags, ap);
	va_end(ap);
	return opened(real_open64(path, oflags, mode));
}

int openat(int dirfd, const char *path, int oflags, ...)
{
	va_list ap;
	mode_t mode;
	REAL(int, openat, (int, const char *, int, ...));

	va_start(ap, oflags);
	mode = mode_arg(oflags, ap);
	va_end(ap);
	return opened(real_openat(dirfd, path, oflags, mode));
}

int openat64(int dirfd, const char *path, int oflags, ...)
{
	va_list ap;
	mode_t mode;
	REAL(int, openat64, (int, const char *, int, ...));

	va_start(ap, oflags);
	mode = mode_arg(oflags, ap);
	va_end(ap);
	return opened(real_openat64(dirfd, path, oflags, mode));
}

/* _FORTIFY_SOURCE turns open() with flags unknown at compile time into these. */
int __open_2(const char *path, int oflags)
{
	REAL(int, __open_2, (const char *, int));
	return opened(real___open_2(path, oflags));
}

int __open64_2(const char *path, int oflags)
{
	REAL(int, __open64_2, (const char *, int));
	return opened(real___open64_2(path, oflags));
}

int __openat_2(int dirfd, const char *path, int oflags)
{
	REAL(int, __openat_2, (int, const char *, int));
	return opened(real___openat_2(dirfd, path, oflags));
}

int __openat64_2(int dirfd, const char *path, int oflags)
{
	REAL(int, __openat64_2, (int, const char *, int));
	return opened(real___openat64_2(dirfd, path, oflags));
}

/* stdio reads inside libc, where we cannot see them: opening the image so is "incomplete". */
static FILE *stdio_opened(FILE *f)
{
	if (active && f && is_image_fd(fileno(f)))
		mark_incomplete();
	return f;
}

FILE *fopen(const char *path, const char *mode)
{
	REAL(FILE *, fopen, (const char *, const char *));
	return stdio_opened(real_fopen(path, mode));
}

FILE *fopen64(const char *path, const char *mode)
{
	REAL(FILE *, fopen64, (const char *, const char *));
	return stdio_opened(real_fopen64(path, mode));
}

FILE *fdopen(int fd, const char *mode)
{
	REAL(FILE *, fdopen, (int, const char *));
	if (is_tracked(fd))
		mark_incomplete();
	return real_fdopen(fd, mode);
}

int close(int fd)
{
	REAL(int, close, (int));
	if (active && fd >= 0 && fd < LW_MAX_FD)
		tracked[fd] = 0;
	return real_close(fd);
}

int dup(int old)
{
	REAL(int, dup, (int));
	return copied(old, real_dup(old));
}

int dup2(int old, int fd)
{
	REAL(int, dup2, (int, int));
	return copied(old, real_dup2(old, fd));
}

int dup3(int old, int fd, int oflags)
{
	REAL(int, dup3, (int, int, int));
	return copied(old, real_dup3(old, fd, oflags));
}

/* Every fcntl command takes at most one argument, an int or a pointer: passed on as a long. */
static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, long arg)
{
	int ret = real(fd, cmd, arg);

	if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
		return copied(fd, ret);
	return ret;
}

int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	long arg;
	REAL(int, fcntl, (int, int, ...));

	va_start(ap, cmd);
	arg = va_arg(ap, long);
	va_end(ap);
	return fcntl_common(real_fcntl, fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	long arg;
	REAL(int, fcntl64, (int, int, ...));

	va_start(ap, cmd);
	arg = va_arg(ap, long);
	va_end(ap);
	return fcntl_common(real_fcntl64, fd, cmd, arg);
}

void *mmap(void *addr, size_t len, int prot, int mflags, int fd, off_t offset)
{
	REAL(void *, mmap, (void *, size_t, int, int, int, off_t));
	if (is_tracked(fd))
		mark_incomplete();
	return real_mmap(addr, len, prot, mflags, fd, offset);
}

void *mmap64(void *addr, size_t len, int prot, int mflags, int fd, off64_t offset)
{
	REAL(void *, mmap64, (void *, size_t, int, int, int, off64_t));
	if (is_tracked(fd))
		mark_incomplete();
	return real_mmap64(addr, len, prot, mflags, fd, offset);
}

/* Copies made in the kernel leave no bytes in this process to record: incomplete. */
ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
	REAL(ssize_t, sendfile, (int, int, off_t *, size_t));
	if (is_tracked(in_fd))
		mark_incomplete();
	return real_sendfile(out_fd, in_fd, offset, count);
}

ssize_t copy_file_range(int fd_in, off64_t *off_in, int fd_out, off64_t *off_out, size_t len,
			unsigned int cflags)
{
	REAL(ssize_t, copy_file_range, (int, off64_t *, int, off64_t *, size_t, unsigned int));
	if (is_tracked(fd_in))
		mark_incomplete();
	return real_copy_file_range(fd_in, off_in, fd_out, off_out, len, cflags);
}

ssize_t splice(int fd_in, off64_t *off_in, int fd_out, off64_t *off_out, size_t len,
	       unsigned int sflags)
{
	REAL(ssize_t, splice, (int, off64_t *, int, off64_t *, size_t, unsigned int));
	if (is_tracked(fd_in))
		mark_incomplete();
	return real_splice(fd_in, off_in, fd_out, off_out, len, sflags);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset)
{
	REAL(ssize_t, pread, (int, void *, size_t, off_t));
	return at(fd, offset, real_pread(fd, buf, count, offset));
}

ssize_t pread64(int fd, void *buf, size_t count, off64_t offset)
{
	REAL(ssize_t, pread64, (int, void *, size_t, off64_t));
	return at(fd, offset, real_pread64(fd, buf, count, offset));
}

ssize_t __pread_chk(int fd, void *buf, size_t count, off_t offset, size_t buflen)
{
	REAL(ssize_t, __pread_chk, (int, void *, size_t, off_t, size_t));
	return at(fd, offset, real___pread_chk(fd, buf, count, offset, buflen));
}

ssize_t __pread64_chk(int fd, void *buf, size_t count, off64_t offset, size_t buflen)
{
	REAL(ssize_t, __pread64_chk, (int, void *, size_t, off64_t, size_t));
	return at(fd, offset, real___pread64_chk(fd, buf, count, offset, buflen));
}

ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t offset)
{
	REAL(ssize_t, preadv, (int, const struct iovec *, int, off_t));
	return at(fd, offset, real_preadv(fd, iov, iovcnt, offset));
}

ssize_t preadv64(int fd, const struct iovec *iov, int iovcnt, off64_t offset)
{
	REAL(ssize_t, preadv64, (int, const struct iovec *, int, off64_t));
	return at(fd, offset, real_preadv64(fd, iov, iovcnt, offset));
}

ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int rwf)
{
	int64_t pos = offset == -1 ? position(fd) : offset;
	REAL(ssize_t, preadv2, (int, const struct iovec *, int, off_t, int));
	return at(fd, pos, real_preadv2(fd, iov, iovcnt, offset, rwf));
}

ssize_t preadv64v2(int fd, const struct iovec *iov, int iovcnt, off64_t offset, int rwf)
{
	int64_t pos = offset == -1 ? position(fd) : offset;
	REAL(ssize_t, preadv64v2, (int, const struct iovec *, int, off64_t, int));
	return at(fd, pos, real_preadv64v2(fd, iov, iovcnt, offset, rwf));
}

ssize_t read(int fd, void *buf, size_t count)
{
	int64_t pos = position(fd);
	REAL(ssize_t, read, (int, void *, size_t));
	return at(fd, pos, real_read(fd, buf, count));
}

ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
	int64_t pos = position(fd);
	REAL(ssize_t, __read_chk, (int, void *, size_t, size_t));
	return at(fd, pos, real___read_chk(fd, buf, count, buflen));
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt)
{
	int64_t pos = position(fd);
	REAL(ssize_t, readv, (int, const struct iovec *, int));
	return at(fd, pos, real_readv(fd, iov, iovcnt));
}

static int by_offset(const void *a, const void *b)
{
	const struct lw_range *x = a, *y = b;

	return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

__attribute__((destructor)) static void lw_fini(void)
{
	const char *out = getenv("LW_READSET_OUT");
	uint64_t head[3];
	size_t n = 0, k;
	int fd, ok;

	if (!active || !out || getpid() != owner)
		return;
	pthread_mutex_lock(&lock);
	if (nr_ranges) {
		qsort(ranges, nr_ranges, sizeof(*ranges), by_offset);
		for (k = 1; k < nr_ranges; k++) {
			uint64_t end = ranges[n].offset + ranges[n].length;

			if (ranges[k].offset <= end) {
				uint64_t kend = ranges[k].offset + ranges[k].length;

				if (kend > end)
					ranges[n].length = kend - ranges[n].offset;
			} else {
				ranges[++n] = ranges[k];
			}
		}
		n++;
	}
	memcpy(head, "LWRSET01", 8);
	head[1] = htole64(flags);
	head[2] = htole64(n);
	for (k = 0; k < n; k++) {
		ranges[k].offset = htole64(ranges[k].offset);
		ranges[k].length = htole64(ranges[k].length);
	}
	fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd >= 0) {
		ok = write_all(fd, head, sizeof(head)) == 0
			&& write_all(fd, ranges, n * sizeof(*ranges)) == 0;
		close(fd);
		if (!ok)
			unlink(out); /* a torn file must not look like a read set */
	}
	pthread_mutex_unlock(&lock);
}
