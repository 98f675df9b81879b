/* Fault injection for tests (meson -Dfault_injection=true); private to lib/.
 *
 * Built without the option, every hook is an empty inline function and
 * nothing of this reaches a release binary.  Built with it, the hooks
 * wrap the synchronous file I/O of uring-io.c and act only when the
 * environment asks for it (see fault-inject.c).
 */
#ifndef CBT_FAULT_INJECT_H
#define CBT_FAULT_INJECT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef CBT_FAULT_INJECTION
/* Before a write of [offset, offset+len) to @fd: may simulate a power cut
 * (never returns then).  Returns whether the write must be followed by
 * cbt_fi_write_end (the target file's writes are serialised). */
bool cbt_fi_write_begin(int fd, uint64_t offset, size_t len);
void cbt_fi_write_end(void);
/* After an fdatasync/fsync of @fd returned @r. */
void cbt_fi_synced(int fd, int r);
#else
static inline bool cbt_fi_write_begin(int fd, uint64_t offset, size_t len)
{ (void)fd; (void)offset; (void)len; return false; }
static inline void cbt_fi_write_end(void) { }
static inline void cbt_fi_synced(int fd, int r) { (void)fd; (void)r; }
#endif

#endif
