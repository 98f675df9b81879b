/* The persistent dirty bitmap file (format: bitmap-format.md).
 *
 * A cbt_bmfile is an open bitmap file: its metadata decoded in memory and
 * every named bitmap loaded into a struct cbt_bitmap.  The daemon marks
 * guest writes straight into those bitmaps (cbt_bitmap_set_range, from any
 * thread) and calls cbt_bmfile_sync() now and then to write the changed
 * pages out; cbt_bmfile_close_clean() at shutdown makes the file CLEAN.
 *
 * Errors: every function that can fail returns -errno and, when @why is
 * not NULL, stores in *@why a g_strdup'd sentence naming the reason
 * (caller frees; *@why must be NULL on entry and is left alone on success).
 * Open and validation failures use:
 *   -EINVAL     not a cbt bitmap file (bad magic) / bad argument
 *   -ENOTSUP    unsupported version or unknown incompatible feature
 *   -EBADMSG    corrupt: checksum mismatch, truncated, reserved bits set,
 *               invalid field, overlapping areas, duplicate names, ...
 *   -ESTALE     cbt_bmfile_check_image: the image is not the one recorded
 *   -EROFS      a modifying call on a file opened read-only
 * and I/O errors as they come from the kernel.
 *
 * Threads: the cbt_bmfile_* calls that change or write the file serialise
 * on a mutex inside the handle, so e.g. a sync thread and a control thread
 * may share one handle.  Marking bits in the entry bitmaps needs no lock
 * and may run concurrently with anything except removing that entry or
 * freeing the handle.  The accessors take no lock; entry indices and
 * bitmap pointers stay valid until the next cbt_bmfile_add/remove.  An
 * entry's struct cbt_bitmap itself never moves while the entry exists (the
 * daemon marks the active bitmap without a lock while a checkpoint entry
 * is added or removed); only the indices of later entries shift.
 */
#ifndef CBT_BITMAP_FILE_H
#define CBT_BITMAP_FILE_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#include "cbt/bitmap.h"

/* Directory entry flags (bitmap-format.md, "Directory"). */
#define CBT_BMF_ACTIVE        (1u << 0)
#define CBT_BMF_FROZEN        (1u << 1)
#define CBT_BMF_INCONSISTENT  (1u << 2)

/* Longest bitmap name, in bytes (printable ASCII). */
#define CBT_BMF_NAME_MAX      63
/* Directory entries in a newly created file. */
#define CBT_BMF_DIR_CAPACITY  64

typedef struct cbt_bmfile cbt_bmfile;

/* Create @path (O_EXCL: fails with -EEXIST if it exists) for an image of
 * @image_size bytes whose file has inode @image_inode, with one ACTIVE
 * bitmap @first_name at @granularity (0 = CBT_BITMAP_DEFAULT_GRANULARITY),
 * all clean.  The file, both metadata copies and its directory entry are
 * durable and the file is CLEAN on return.  On success *@out is a writable
 * handle (free or close it); on failure nothing is left at @path. */
int cbt_bmfile_create(const char *path, uint64_t image_size,
                      uint64_t image_inode, uint32_t granularity,
                      const char *first_name, cbt_bmfile **out, char **why);

/* Open and fully validate @path; load every bitmap.  @writable opens it
 * read-write for the daemon or the CLI's maintenance commands.  A writable
 * handle on a file that is not CLEAN marks every entry INCONSISTENT in
 * memory at once; that reaches the disk with the first metadata write
 * (cbt_bmfile_mark_dirty does one).
 *
 * What a file claims is bounded before anything is allocated: the data
 * areas lie within the file (-EBADMSG), and together they fit in the
 * machine's physical memory (-ENOMEM).  Holes in the file (a sparse copy,
 * a file system that stores zero blocks as holes) are not read: they cost
 * address space but neither memory nor time. */
int cbt_bmfile_open(const char *path, bool writable, cbt_bmfile **out,
                    char **why);

/* cbt_bmfile_open for the image the file must belong to: its recorded
 * size and inode are compared with @image_size and @image_inode as soon
 * as the metadata is read, before any bitmap is allocated or loaded, so
 * a file made for another image (or claiming a huge one) is refused at
 * once: -ESTALE, with the differing values in *@why, as
 * cbt_bmfile_check_image. */
int cbt_bmfile_open_image(const char *path, bool writable, uint64_t image_size,
                          uint64_t image_inode, cbt_bmfile **out, char **why);

/* Release the handle without touching the file: whatever the last
 * metadata write left stays (after mark_dirty that is "not clean", just as
 * after a crash).  NULL is fine. */
void cbt_bmfile_free(cbt_bmfile *f);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(cbt_bmfile, cbt_bmfile_free)

/* Write out everything, then set CLEAN durably, then free @f (always, even
 * on error; the file is then left not clean).  No thread may be marking
 * bits any more.  -EROFS on a read-only handle. */
int cbt_bmfile_close_clean(cbt_bmfile *f, char **why);

/* Compare the recorded image identity with the image now at hand.
 * 0 if both match, -ESTALE (with the differing values in *@why) if not. */
int cbt_bmfile_check_image(const cbt_bmfile *f, uint64_t image_size,
                           uint64_t image_inode, char **why);

/* Crash-safe tracking (bitmap-format.md, write rules 6-8): the caller
 * promises to make every bit durable (cbt_bmfile_sync_data) before the
 * write it covers is submitted, and to order checkpoint changes as the
 * rules say; the file then carries crash_safe_tracking from the next
 * metadata update on (call before cbt_bmfile_mark_dirty), and a reader
 * trusts it even when it is found not clean.  Off by default. */
void cbt_bmfile_set_crash_safe(cbt_bmfile *f, bool on);
/* The file was found not clean but written in crash-safe mode. */
bool cbt_bmfile_found_crash_safe(const cbt_bmfile *f);
/* May entry @idx's bits be used for an incremental backup?  *@why (may be
 * NULL) gets a static sentence saying why or why not. */
bool cbt_bmfile_entry_trusted(const cbt_bmfile *f, unsigned idx, const char **why);

/* Write every changed data page and fdatasync, without a metadata update
 * (the data checksums in the metadata go stale until the next
 * cbt_bmfile_sync; a crash-safe reader expects that).  The cheap commit of
 * crash-safe tracking.  A no-op if nothing changed. */
int cbt_bmfile_sync_data(cbt_bmfile *f, char **why);

/* Called by the daemon after open, before it accepts the first write:
 * make "not clean" durable (clearing crash_safe_tracking and unknown
 * autoclear bits), and if the file was found not clean, make INCONSISTENT
 * durable on every entry.  A no-op when this handle already made the file
 * not clean. */
int cbt_bmfile_mark_dirty(cbt_bmfile *f, char **why);

/* Write every changed page of every bitmap and the metadata with fresh
 * checksums, then fdatasync.  Safe while other threads keep marking bits:
 * each changed page is claimed (its pages_dirty bit cleared) before it is
 * copied with atomic loads, so a racing change is written next time.  If
 * the file is CLEAN on disk and an existing bitmap changed, a not-clean
 * generation is made durable first.  Data checksums are kept up to date
 * page by page (a per-page CRC32C array), so each sync costs in proportion
 * to what changed.  A no-op if nothing changed. */
int cbt_bmfile_sync(cbt_bmfile *f, char **why);

/* Index of the entry called @name, or -ENOENT. */
int cbt_bmfile_find(const cbt_bmfile *f, const char *name);

/* Add an empty bitmap @name with @flags (ACTIVE, FROZEN, INCONSISTENT;
 * not ACTIVE and FROZEN together) and @granularity (0 = default) and make
 * it durable.  Returns its index, or -EINVAL (bad name, flags or
 * granularity), -EEXIST (name taken), -ENOSPC (directory full), ... */
int cbt_bmfile_add(cbt_bmfile *f, const char *name, uint32_t flags,
                   uint32_t granularity, char **why);

/* Remove the entry @name durably; its area becomes free for reuse.  No
 * thread may still be marking its bitmap.  0, -ENOENT or -errno. */
int cbt_bmfile_remove(cbt_bmfile *f, const char *name, char **why);

/* Replace the flags of entry @idx and make the change durable.  Clearing
 * INCONSISTENT this way is the caller's claim that the bits are right;
 * normally use cbt_bmfile_reset_entry. */
int cbt_bmfile_set_flags(cbt_bmfile *f, unsigned idx, uint32_t flags,
                         char **why);

/* Record, durably, the checkpoint id that started entry @idx's interval
 * (0 = none).  The backup tool compares it with the checkpoint of the last
 * backup to know whether the bits cover every change since then. */
int cbt_bmfile_set_checkpoint(cbt_bmfile *f, unsigned idx, uint64_t checkpoint,
                              char **why);
uint64_t cbt_bmfile_entry_checkpoint(const cbt_bmfile *f, unsigned idx);
/* Checksums as last read from or written to the file (for display). */
uint32_t cbt_bmfile_entry_data_crc(const cbt_bmfile *f, unsigned idx);
uint32_t cbt_bmfile_header_crc(const cbt_bmfile *f);
uint32_t cbt_bmfile_dir_crc(const cbt_bmfile *f);
uint32_t cbt_bmfile_version(const cbt_bmfile *f);

/* Start entry @idx afresh, as at a full backup's checkpoint: clear every
 * bit and the INCONSISTENT flag, durably. */
int cbt_bmfile_reset_entry(cbt_bmfile *f, unsigned idx, char **why);

/* Make the file cover an image now @new_image_size bytes long (the image
 * was resized; the inode is kept), atomically and durably: the file then
 * says image_size = @new_image_size and every entry, FROZEN ones too, has
 * its bits resized.  Growing keeps every bit and marks the added bytes
 * dirty (they were never backed up; this includes the old partial last
 * granule); shrinking drops the bits past the new end.  Flags, checkpoint
 * ids and the CLEAN state on disk are kept.
 *
 * Every entry's data goes to a new area (reusing free space or extending
 * the file) and is durable before the metadata that references it; the
 * old areas are not written.  So a crash at any moment leaves the file as
 * it was before the call or as after it, never corrupt.
 *
 * Offline only: no thread may be marking bits or holding a pointer into
 * an entry's bits (the struct cbt_bitmap stays where it is, its arrays are
 * replaced), i.e. cbt-filterd is not running on the file.  0 (also when
 * the size is unchanged), -EROFS on a read-only handle, -EINVAL for a
 * size of 0 or past CBT_BITMAP_MAX_SIZE, -ENOMEM, -ENOSPC or an I/O
 * error.  On error the handle is back in its state before the call, and
 * the file holds that state (or, if only the last fdatasync failed,
 * perhaps the new one): free the handle rather than write through it. */
int cbt_bmfile_resize(cbt_bmfile *f, uint64_t new_image_size, char **why);

/* Accessors (no lock, no I/O). */
const char *cbt_bmfile_path(const cbt_bmfile *f);
void cbt_bmfile_uuid(const cbt_bmfile *f, uint8_t uuid[16]);
/* The clean flag as found at open (false too if the newest metadata copy
 * was unusable).  If false, no bit in the file may be trusted. */
bool cbt_bmfile_found_clean(const cbt_bmfile *f);
/* The clean flag of the newest metadata this handle knows to be on disk. */
bool cbt_bmfile_clean(const cbt_bmfile *f);
/* NULL, or why the newest metadata copy was unusable and the previous
 * generation was used instead. */
const char *cbt_bmfile_recovery_note(const cbt_bmfile *f);
uint64_t cbt_bmfile_image_size(const cbt_bmfile *f);
uint64_t cbt_bmfile_image_inode(const cbt_bmfile *f);
uint64_t cbt_bmfile_generation(const cbt_bmfile *f);
unsigned cbt_bmfile_entry_count(const cbt_bmfile *f);
const char *cbt_bmfile_entry_name(const cbt_bmfile *f, unsigned idx);
uint32_t cbt_bmfile_entry_flags(const cbt_bmfile *f, unsigned idx);
/* False if the data did not match its checksum at open (only possible in
 * a file that was not clean). */
bool cbt_bmfile_entry_data_ok(const cbt_bmfile *f, unsigned idx);
/* The entry's bits.  Mark and read freely; never resize or destroy it. */
struct cbt_bitmap *cbt_bmfile_entry_bitmap(cbt_bmfile *f, unsigned idx);

#endif
