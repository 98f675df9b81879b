/* Synchronous file I/O through io_uring, for code outside the daemon's
 * event loop: opening and syncing bitmap files, writing backup files in the
 * CLI, reading qcow2 headers at start-up.
 *
 * Each thread lazily gets a small private ring, freed when the thread
 * ends, so short-lived threads leave no descriptor behind.  Every call
 * submits its operation(s) and waits for the completions, resubmitting
 * the remainder of short reads and writes, so callers see whole-buffer
 * semantics like pread/pwrite loops but the I/O itself goes through
 * io_uring.
 *
 * All functions return 0 on success or a negative errno.  A read that hits
 * end of file before @len bytes returns -ENODATA (the caller decides whether
 * a short file is corruption).
 */
#ifndef CBT_URING_IO_H
#define CBT_URING_IO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

int cbt_io_pread(int fd, void *buf, size_t len, uint64_t offset);
int cbt_io_pwrite(int fd, const void *buf, size_t len, uint64_t offset);
int cbt_io_fdatasync(int fd);
int cbt_io_fsync(int fd);
/* fallocate(2) through the ring; @mode as for fallocate. */
int cbt_io_fallocate(int fd, int mode, uint64_t offset, uint64_t len);

/* fsync the directory that holds @path, so a file just created or
 * renamed there stays after a crash. */
int cbt_io_sync_parent_dir(const char *path);

/* Release this thread's ring now.  Optional: a thread's ring is freed
 * when the thread ends (a pthread key destructor), and the next call on
 * this thread makes a new one. */
void cbt_io_thread_cleanup(void);

#endif
