/* Fault injection for tests (meson -Dfault_injection=true).
 *
 * Built without the option, every hook is an empty inline function and
 * nothing of this reaches a release binary.  Built with it, the hooks act
 * only when the environment asks for it: CBT_FI_FAIL makes chosen I/O on
 * the image, the bitmap file, the scratch file or the backup repository
 * fail (EIO, ENOSPC, ...) or transfer short; CBT_FI_POWERCUT_* simulates a
 * power cut of one file.  lib/fault-inject.c describes both.
 *
 * The I/O a rule can hit is recognised two ways:
 *   - asynchronous I/O on a caller's ring: the code that prepares the sqe
 *     names its target (cbt_fi_sqe);
 *   - synchronous I/O through cbt/uring-io.h: the file was tagged with its
 *     target when it was opened (cbt_fi_tag_fd, cbt_fi_tag_path).
 */
#ifndef CBT_FAULT_INJECT_H
#define CBT_FAULT_INJECT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum cbt_fi_target {
  CBT_FI_IMAGE,                  /* the disk image (raw and qcow2 backends) */
  CBT_FI_BITMAP,                 /* the daemon's bitmap file */
  CBT_FI_SCRATCH,                /* the point-in-time view's scratch file */
  CBT_FI_REPO,                   /* a backup file cbt backup writes */
  CBT_FI_MANIFEST,               /* the repository's manifest */
};

enum cbt_fi_op {
  CBT_FI_READ,
  CBT_FI_WRITE,                  /* writes, fallocate */
  CBT_FI_SYNC,                   /* fsync, fdatasync */
};

struct io_uring_sqe;

#ifdef CBT_FAULT_INJECTION
/* An sqe for @target is fully prepared (user_data set, not submitted):
 * a matching rule turns it into a NOP whose completion hands the injected
 * error to the op's done(), or shortens its transfer. */
void cbt_fi_sqe(enum cbt_fi_target target, struct io_uring_sqe *sqe);
/* Synchronous I/O on the file open on @fd is I/O on @target from now on
 * (the file is known by device and inode, so other descriptors of it and
 * a later rename keep the tag); untag forgets it. */
void cbt_fi_tag_fd(int fd, enum cbt_fi_target target);
void cbt_fi_tag_path(const char *path, enum cbt_fi_target target);
void cbt_fi_untag_fd(int fd);
/* uring-io.c, before one synchronous @op of *@len bytes at @offset on
 * @fd: 0 to do it (*@len may have been shortened), or the injected -errno
 * to return without doing it.  @len is NULL for a sync or fallocate. */
int cbt_fi_io(int fd, enum cbt_fi_op op, uint64_t offset, size_t *len);

/* Power cut.  Before a write of [offset, offset+len) to @fd: may simulate
 * a power cut (never returns then).  Returns whether the write must be
 * followed by cbt_fi_write_end (the target file's writes are serialised). */
bool cbt_fi_write_begin(int fd, uint64_t offset, size_t len);
void cbt_fi_write_end(void);
/* After an fdatasync/fsync of @fd returned @r. */
void cbt_fi_synced(int fd, int r);

/* lib/bitmap/bitmap.c, after a set changed bits of image bytes [start, end) and
 * before it marks their page: may sleep (CBT_FI_MARK_STALL). */
void cbt_fi_mark_stall(uint64_t start, uint64_t end);
#else
static inline void cbt_fi_sqe(enum cbt_fi_target target, struct io_uring_sqe *sqe)
{ (void)target; (void)sqe; }
static inline void cbt_fi_tag_fd(int fd, enum cbt_fi_target target)
{ (void)fd; (void)target; }
static inline void cbt_fi_tag_path(const char *path, enum cbt_fi_target target)
{ (void)path; (void)target; }
static inline void cbt_fi_untag_fd(int fd) { (void)fd; }
static inline int cbt_fi_io(int fd, enum cbt_fi_op op, uint64_t offset, size_t *len)
{ (void)fd; (void)op; (void)offset; (void)len; return 0; }
static inline bool cbt_fi_write_begin(int fd, uint64_t offset, size_t len)
{ (void)fd; (void)offset; (void)len; return false; }
static inline void cbt_fi_write_end(void) { }
static inline void cbt_fi_synced(int fd, int r) { (void)fd; (void)r; }
static inline void cbt_fi_mark_stall(uint64_t start, uint64_t end)
{ (void)start; (void)end; }
#endif

#endif
