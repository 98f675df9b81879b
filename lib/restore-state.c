/* The progress file of an instant restore: encoding, validation on open,
 * and the write-out of new bits.  The byte layout is specified in
 * restore-state-format.md; read that first.
 *
 * Why no checksum over the bits.  The file is updated in place, page by
 * page, and a crash may tear a page write.  Bits only go from 0 to 1 and
 * the daemon writes a bit only once the output data it covers is durable
 * (filterd/restore.c), so every mix of old and new bits a torn write can
 * leave was true when it was written: the reader may trust it.  A checksum
 * would turn exactly that case into "corrupt" and force the restore to
 * start again (throwing away flushed guest writes), so the header, which
 * is written once at creation, carries the only checksum.
 *
 * All file I/O goes through cbt/uring-io.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/crc32c.h"
#include "cbt/restore-state.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"

#define RS_MAGIC        "CBTRSTAT"
#define RS_VERSION      1u
#define RS_PAGE         4096u
#define RS_WORDS_PAGE   (RS_PAGE / 8u)
#define RS_NAME_OFF     64u
#define RS_CRC_OFF      (CBT_RSTATE_HEADER_SIZE - 4u)

/* The fixed fields of the header, all little-endian; the source name
 * follows at RS_NAME_OFF, the CRC32C of everything before it at
 * RS_CRC_OFF. */
struct rs_header {
  char magic[8];
  uint32_t version;
  uint32_t header_size;
  uint64_t image_size;
  uint64_t output_ino;
  uint64_t source_ino;
  uint32_t granularity;
  uint32_t reserved;
  uint64_t nbits;
  uint64_t bitmap_offset;
} __attribute__((packed));
_Static_assert(sizeof(struct rs_header) == RS_NAME_OFF, "restore state header layout");

struct cbt_rstate {
  int fd;
  struct cbt_rstate_info info;
  uint64_t nbits, nwords;
  uint64_t *words;               /* as on disk, host order */
};

uint64_t
cbt_rstate_nbits(uint64_t size, uint32_t granularity)
{
  return size / granularity + (size % granularity != 0);
}

static uint64_t
bitmap_bytes(uint64_t nbits)
{
  uint64_t words = (nbits + 63) / 64;

  return (words * 8 + RS_PAGE - 1) / RS_PAGE * RS_PAGE;
}

static int
check_info(const struct cbt_rstate_info *info, char **why)
{
  size_t nlen = strnlen(info->source_name, sizeof info->source_name);

  if (info->image_size == 0 || info->image_size > CBT_RSTATE_MAX_SIZE)
    return cbt_fail(why, -EBADMSG, "image size %" PRIu64 " out of range", info->image_size);
  if (info->granularity < CBT_RSTATE_MIN_GRANULARITY ||
      info->granularity > CBT_RSTATE_MAX_GRANULARITY ||
      (info->granularity & (info->granularity - 1)) != 0)
    return cbt_fail(why, -EBADMSG, "granularity %" PRIu32 " is not a power of two "
                    "from 4 KiB to 64 MiB", info->granularity);
  if (nlen == 0 || nlen > CBT_RSTATE_NAME_MAX)
    return cbt_fail(why, -EBADMSG, "source name empty or too long");
  for (size_t i = 0; i < nlen; i++)
    if (!g_ascii_isprint(info->source_name[i]))
      return cbt_fail(why, -EBADMSG, "source name has a non-printable byte");
  return 0;
}

int
cbt_rstate_encode_header(const struct cbt_rstate_info *info, uint8_t *buf, char **why)
{
  struct rs_header h;
  int r = check_info(info, why);

  if (r < 0)
    return -EINVAL;
  memset(buf, 0, CBT_RSTATE_HEADER_SIZE);
  memcpy(h.magic, RS_MAGIC, 8);
  h.version = htole32(RS_VERSION);
  h.header_size = htole32(CBT_RSTATE_HEADER_SIZE);
  h.image_size = htole64(info->image_size);
  h.output_ino = htole64(info->output_ino);
  h.source_ino = htole64(info->source_ino);
  h.granularity = htole32(info->granularity);
  h.reserved = 0;
  h.nbits = htole64(cbt_rstate_nbits(info->image_size, info->granularity));
  h.bitmap_offset = htole64(CBT_RSTATE_HEADER_SIZE);
  memcpy(buf, &h, sizeof h);
  memcpy(buf + RS_NAME_OFF, info->source_name, strlen(info->source_name));
  cbt_put_be32(buf + RS_CRC_OFF, cbt_crc32c(0, buf, RS_CRC_OFF));
  return 0;
}

int
cbt_rstate_decode_header(const uint8_t *buf, size_t len, struct cbt_rstate_info *info,
                         char **why)
{
  struct rs_header h;
  int r;

  if (len < CBT_RSTATE_HEADER_SIZE)
    return cbt_fail(why, -EBADMSG, "truncated header (%zu bytes)", len);
  memcpy(&h, buf, sizeof h);
  if (memcmp(h.magic, RS_MAGIC, 8) != 0)
    return cbt_fail(why, -EINVAL, "not a cbt restore state file (bad magic)");
  if (le32toh(h.version) != RS_VERSION)
    return cbt_fail(why, -ENOTSUP, "unsupported version %" PRIu32, le32toh(h.version));
  if (cbt_get_be32(buf + RS_CRC_OFF) != cbt_crc32c(0, buf, RS_CRC_OFF))
    return cbt_fail(why, -EBADMSG, "header checksum mismatch");
  if (le32toh(h.header_size) != CBT_RSTATE_HEADER_SIZE || h.reserved != 0 ||
      le64toh(h.bitmap_offset) != CBT_RSTATE_HEADER_SIZE)
    return cbt_fail(why, -EBADMSG, "bad header size, bitmap offset or reserved field");
  if (buf[RS_NAME_OFF + CBT_RSTATE_NAME_MAX] != 0)
    return cbt_fail(why, -EBADMSG, "source name not terminated");
  for (size_t i = RS_NAME_OFF + strlen((const char *)buf + RS_NAME_OFF); i < RS_CRC_OFF; i++)
    if (buf[i] != 0)
      return cbt_fail(why, -EBADMSG, "reserved header byte %zu is not zero", i);
  memset(info, 0, sizeof *info);
  info->image_size = le64toh(h.image_size);
  info->output_ino = le64toh(h.output_ino);
  info->source_ino = le64toh(h.source_ino);
  info->granularity = le32toh(h.granularity);
  memcpy(info->source_name, buf + RS_NAME_OFF, CBT_RSTATE_NAME_MAX);
  r = check_info(info, why);
  if (r < 0)
    return r;
  if (le64toh(h.nbits) != cbt_rstate_nbits(info->image_size, info->granularity))
    return cbt_fail(why, -EBADMSG, "bit count %" PRIu64 " does not match the size",
                    le64toh(h.nbits));
  return 0;
}

int
cbt_rstate_create(const char *path, const struct cbt_rstate_info *info, char **why)
{
  g_autofree uint8_t *hdr = g_malloc(CBT_RSTATE_HEADER_SIZE);
  uint64_t end;
  int fd, r;

  r = cbt_rstate_encode_header(info, hdr, why);
  if (r < 0)
    return r;
  end = CBT_RSTATE_HEADER_SIZE + bitmap_bytes(cbt_rstate_nbits(info->image_size,
                                                               info->granularity));
  fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return cbt_fail(why, -errno, "%s: %s", path, g_strerror(errno));
  /* The bitmap is a hole: all clear. */
  if (ftruncate(fd, (off_t)end) < 0)
    r = -errno;
  if (r == 0)
    r = cbt_io_pwrite(fd, hdr, CBT_RSTATE_HEADER_SIZE, 0);
  if (r == 0)
    r = cbt_io_fsync(fd);
  close(fd);
  if (r == 0)
    r = cbt_io_sync_parent_dir(path);
  if (r < 0) {
    unlink(path);
    return cbt_fail(why, r, "%s: %s", path, g_strerror(-r));
  }
  return 0;
}

int
cbt_rstate_open(const char *path, bool writable, cbt_rstate **out, char **why)
{
  g_autofree uint8_t *hdr = g_malloc(CBT_RSTATE_HEADER_SIZE);
  g_autofree char *reason = NULL;
  struct stat st;
  cbt_rstate *s;
  uint64_t bytes;
  int fd, r;

  fd = cbt_open_regular(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, &st, why);
  if (fd < 0)
    return fd;
  r = cbt_io_pread(fd, hdr, CBT_RSTATE_HEADER_SIZE, 0);
  if (r == -ENODATA)
    r = cbt_fail(&reason, -EBADMSG, "truncated header");
  s = g_new0(cbt_rstate, 1);
  s->fd = fd;
  if (r == 0)
    r = cbt_rstate_decode_header(hdr, CBT_RSTATE_HEADER_SIZE, &s->info, &reason);
  if (r < 0) {
    cbt_rstate_free(s);
    return cbt_fail(why, r, "%s: %s", path, reason ? reason : g_strerror(-r));
  }
  s->nbits = cbt_rstate_nbits(s->info.image_size, s->info.granularity);
  s->nwords = (s->nbits + 63) / 64;
  bytes = bitmap_bytes(s->nbits);
  if ((uint64_t)st.st_size < CBT_RSTATE_HEADER_SIZE + bytes) {
    cbt_rstate_free(s);
    return cbt_fail(why, -EBADMSG, "%s: truncated bitmap (%jd bytes, need %" PRIu64 ")",
                    path, (intmax_t)st.st_size, CBT_RSTATE_HEADER_SIZE + bytes);
  }
  /* Bounded by the size check against the file: no allocation larger
   * than what is on disk. */
  s->words = g_try_malloc(bytes);
  if (!s->words) {
    cbt_rstate_free(s);
    return cbt_fail(why, -ENOMEM, "%s: no memory for a %" PRIu64 "-byte bitmap", path, bytes);
  }
  r = cbt_io_pread(fd, s->words, bytes, CBT_RSTATE_HEADER_SIZE);
  if (r < 0) {
    cbt_rstate_free(s);
    return cbt_fail(why, r == -ENODATA ? -EBADMSG : r, "%s: reading the bitmap: %s", path,
                    g_strerror(r == -ENODATA ? EBADMSG : -r));
  }
  for (uint64_t i = 0; i < bytes / 8; i++) {
    uint64_t v = le64toh(s->words[i]);
    uint64_t valid = i + 1 < s->nwords ? ~UINT64_C(0)
                     : i >= s->nwords ? 0
                     : s->nbits % 64 ? (UINT64_C(1) << (s->nbits % 64)) - 1
                     : ~UINT64_C(0);

    if (v & ~valid) {
      cbt_rstate_free(s);
      return cbt_fail(why, -EBADMSG, "%s: bits set past the end of the disk", path);
    }
    s->words[i] = v;
  }
  *out = s;
  return 0;
}

void
cbt_rstate_free(cbt_rstate *s)
{
  if (!s)
    return;
  if (s->fd >= 0)
    close(s->fd);
  g_free(s->words);
  g_free(s);
}

const struct cbt_rstate_info *
cbt_rstate_get_info(const cbt_rstate *s)
{
  return &s->info;
}

const uint64_t *
cbt_rstate_words(const cbt_rstate *s)
{
  return s->words;
}

uint64_t
cbt_rstate_count(const cbt_rstate *s)
{
  uint64_t n = 0;

  for (uint64_t i = 0; i < s->nwords; i++)
    n += (uint64_t)__builtin_popcountll(s->words[i]);
  return n;
}

bool
cbt_rstate_complete(const cbt_rstate *s)
{
  return cbt_rstate_count(s) == s->nbits;
}

int
cbt_rstate_store(cbt_rstate *s, const uint64_t *words, char **why)
{
  uint64_t page[RS_WORDS_PAGE];
  bool wrote = false;
  int r;

  for (uint64_t i = 0; i < s->nwords; i++)
    if (s->words[i] & ~words[i])
      return cbt_fail(why, -EINVAL, "a restored bit would be cleared (granule %" PRIu64 ")",
                      i * 64 + (uint64_t)__builtin_ctzll(s->words[i] & ~words[i]));
  for (uint64_t p = 0; p * RS_WORDS_PAGE < s->nwords; p++) {
    uint64_t first = p * RS_WORDS_PAGE;
    uint64_t n = MIN((uint64_t)RS_WORDS_PAGE, s->nwords - first);

    if (memcmp(s->words + first, words + first, n * 8) == 0)
      continue;
    memset(page, 0, sizeof page);
    for (uint64_t i = 0; i < n; i++)
      page[i] = htole64(words[first + i]);
    r = cbt_io_pwrite(s->fd, page, RS_PAGE, CBT_RSTATE_HEADER_SIZE + p * RS_PAGE);
    if (r < 0)
      return cbt_fail(why, r, "writing the restore state: %s", g_strerror(-r));
    wrote = true;
  }
  if (!wrote)
    return 0;
  r = cbt_io_fdatasync(s->fd);
  if (r < 0)
    return cbt_fail(why, r, "fdatasync of the restore state: %s", g_strerror(-r));
  /* Only now: a failed write leaves the old bits, so the next store
   * writes those pages again. */
  memcpy(s->words, words, s->nwords * 8);
  return 0;
}
