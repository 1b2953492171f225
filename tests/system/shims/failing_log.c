/* LD_PRELOAD shim for tests/system/test_log_broken.py: the log's disk fails with EIO on demand.
 *
 * LW_FAIL_PATH names the log; once the file LW_FAIL_TRIGGER exists, LW_FAIL_WHAT=write fails
 * every write of 64 KiB or more to the log (its big records, written by the backend's C log
 * thread or by Python), and LW_FAIL_WHAT=sync every fdatasync of the log, with EIO, as a dying
 * disk would. No device-mapper on the test host, so the failure is injected at the system
 * call. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static int armed(int fd, const char *what)
{
    const char *want = getenv("LW_FAIL_WHAT"), *path = getenv("LW_FAIL_PATH");
    const char *trigger = getenv("LW_FAIL_TRIGGER");
    struct stat st;
    if (!want || !path || !trigger || strcmp(want, what) || stat(trigger, &st)) {
        return 0;
    }
    char link[64], target[4096];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n < 0) {
        return 0;
    }
    target[n] = '\0';
    return strcmp(target, path) == 0;
}

static size_t total(const struct iovec *iov, int cnt)
{
    size_t sum = 0;
    for (int i = 0; i < cnt; i++) {
        sum += iov[i].iov_len;
    }
    return sum;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t at)
{
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real) {
        real = (ssize_t (*)(int, const struct iovec *, int, off_t))dlsym(RTLD_NEXT, "pwritev");
    }
    if (total(iov, cnt) >= (64 << 10) && armed(fd, "write")) {
        errno = EIO;
        return -1;
    }
    return real(fd, iov, cnt, at);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t at)
{
    return pwritev(fd, iov, cnt, at);
}

/* Python's os.pwritev (pwritev64v2 on 64-bit glibc) */
ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t at, int flags)
{
    static ssize_t (*real)(int, const struct iovec *, int, off_t, int);
    if (!real) {
        real = (ssize_t (*)(int, const struct iovec *, int, off_t, int))dlsym(RTLD_NEXT,
                                                                             "pwritev64v2");
    }
    if (total(iov, cnt) >= (64 << 10) && armed(fd, "write")) {
        errno = EIO;
        return -1;
    }
    return real(fd, iov, cnt, at, flags);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t at, int flags)
{
    return pwritev64v2(fd, iov, cnt, at, flags);
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    if (armed(fd, "sync")) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
