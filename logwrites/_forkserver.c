/* A fork server for a checker run again and again with the same argv: loaded with LD_PRELOAD,
 * it holds the process before main() and forks one copy per request, so each run starts with
 * the program and its libraries already loaded and relocated.
 *
 * Why: `e2fsck -fn` on a crash-state image costs ~4.2 ms of CPU here, ~1.6 ms of which is exec,
 * the dynamic linker and library start-up (`e2fsck -V` alone). The crash loop checks thousands
 * of states with one argv per worker (its cursor image is always the same file), so that part
 * is paid once. Each child is what exec would have given: main() has not run yet, argv and the
 * environment are the ones the server was started with; only the pid differs.
 *
 * LW_FORKSERVER_CTL="R,W" (two inherited descriptors) turns it on; without it this file does
 * nothing. Protocol (native-endian int32s): the client writes one byte per run on R; the server
 * forks, answers the child's pid on W, waits for it and answers its wait status on W. EOF on R
 * ends the server (_exit: it never ran main, so nothing of main's may run at exit). The child
 * leads a new session (the client kills its group on a timeout), reads /dev/null and writes
 * stdout and stderr to LW_FORKSERVER_OUT (truncated).
 *
 * Other libraries' constructors may have run in the server already (the order of preloaded
 * libraries' constructors is not ours to choose), so a child asks the read recorder, when it is
 * loaded, to start afresh (lw_readset_restart, logwrites/_readset_recorder.c).
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void become_child(int ctl_in, int ctl_out)
{
	const char *out = getenv("LW_FORKSERVER_OUT");
	void (*restart)(void);
	int fd;

	close(ctl_in);
	close(ctl_out);
	unsetenv("LW_FORKSERVER_CTL");
	setsid();
	signal(SIGPIPE, SIG_DFL);
	fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		dup2(fd, 0);
		close(fd);
	}
	if (out) {
		fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd < 0)
			_exit(127);
		dup2(fd, 1);
		dup2(fd, 2);
		close(fd);
	}
	restart = (void (*)(void))dlsym(RTLD_DEFAULT, "lw_readset_restart");
	if (restart)
		restart();
}

__attribute__((constructor)) static void lw_forkserver(void)
{
	const char *spec = getenv("LW_FORKSERVER_CTL");
	int ctl_in, ctl_out;
	char request;

	if (!spec || sscanf(spec, "%d,%d", &ctl_in, &ctl_out) != 2)
		return;
	signal(SIGPIPE, SIG_IGN);  /* a client gone mid-answer: EOF on the next read ends us */
	for (;;) {
		ssize_t n = read(ctl_in, &request, 1);
		int32_t answer;
		int status;
		pid_t pid;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			_exit(0);
		pid = fork();
		if (pid == 0) {
			become_child(ctl_in, ctl_out);
			return;         /* on to the other constructors and main() */
		}
		answer = pid > 0 ? (int32_t)pid : -1;
		if (write_all(ctl_out, &answer, sizeof(answer)) < 0)
			_exit(0);
		if (pid < 0)
			continue;
		while (waitpid(pid, &status, 0) < 0) {
			if (errno != EINTR) {
				status = -1;
				break;
			}
		}
		answer = (int32_t)status;
		if (write_all(ctl_out, &answer, sizeof(answer)) < 0)
			_exit(0);
	}
}
