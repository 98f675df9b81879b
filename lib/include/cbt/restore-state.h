/* The progress file of an instant restore (format: restore-state-format.md).
 *
 * One bit per granule of the output disk: 1 = the output holds that
 * granule's data (copied from the backup, or written by the guest after
 * the copy).  Bits only ever go from 0 to 1, and the daemon sets a bit on
 * disk only after the output data it covers is durable; that is what
 * makes a torn write of a bitmap page harmless (any mix of old and new
 * bits is a state that was true) and lets a crashed restore resume.
 *
 * The header (identity of the output and of the backup point, geometry)
 * is written once, when the file is created, and never again.
 *
 * Errors: -errno, with a sentence in *@why (g_free) when @why is not NULL:
 *   -EINVAL   not a restore state file (bad magic) or a bad argument
 *   -ENOTSUP  unsupported version
 *   -EBADMSG  corrupt: checksum, reserved bytes, field out of range,
 *             truncated, bits past the end
 * and I/O errors as the kernel returns them.
 */
#ifndef CBT_RESTORE_STATE_H
#define CBT_RESTORE_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CBT_RSTATE_HEADER_SIZE      4096u
#define CBT_RSTATE_NAME_MAX         255u   /* source name bytes, without NUL */
#define CBT_RSTATE_MIN_GRANULARITY  4096u
#define CBT_RSTATE_MAX_GRANULARITY  (64u << 20)
#define CBT_RSTATE_MAX_SIZE         (UINT64_C(1) << 60)

struct cbt_rstate_info {
  uint64_t image_size;          /* bytes of the output disk */
  uint64_t output_ino;          /* inode of the output file */
  uint64_t source_ino;          /* inode of the backup point's file */
  uint32_t granularity;         /* bytes per bit, power of two */
  char source_name[CBT_RSTATE_NAME_MAX + 1];   /* the backup point's file name */
};

typedef struct cbt_rstate cbt_rstate;

/* Bits for an image of @size bytes in granules of @granularity. */
uint64_t cbt_rstate_nbits(uint64_t size, uint32_t granularity);

/* Encode @info into the CBT_RSTATE_HEADER_SIZE bytes at @buf.  -EINVAL
 * if a field is out of range. */
int cbt_rstate_encode_header(const struct cbt_rstate_info *info, uint8_t *buf,
                             char **why);
/* Validate and decode a header of @len bytes (at least the header size). */
int cbt_rstate_decode_header(const uint8_t *buf, size_t len,
                             struct cbt_rstate_info *info, char **why);

/* Create @path (O_EXCL) with @info and no bit set, durable (file and
 * directory) on return. */
int cbt_rstate_create(const char *path, const struct cbt_rstate_info *info,
                      char **why);

/* Open and validate @path, loading its bits; @writable for cbt_rstate_store. */
int cbt_rstate_open(const char *path, bool writable, cbt_rstate **out, char **why);
void cbt_rstate_free(cbt_rstate *s);

const struct cbt_rstate_info *cbt_rstate_get_info(const cbt_rstate *s);
/* The bits as last loaded or stored: cbt_rstate_nbits() bits in 64-bit
 * host-order words, bit i in word i / 64 at i % 64. */
const uint64_t *cbt_rstate_words(const cbt_rstate *s);
uint64_t cbt_rstate_count(const cbt_rstate *s);
/* Every bit set? */
bool cbt_rstate_complete(const cbt_rstate *s);

/* Make @words (same geometry) the file's bits: the changed pages are
 * written, then fdatasync.  A bit set in the file but clear in @words is
 * -EINVAL (bits never go back) and nothing is written.  Not thread-safe:
 * one caller at a time. */
int cbt_rstate_store(cbt_rstate *s, const uint64_t *words, char **why);

#endif
