/* fuzz-qcow2: the qcow2 reader and writer (lib/qcow2/qcow2.c,
 * lib/image/image-qcow2*.c) on arbitrary images and backing chains.
 *
 * Input: up to three files separated by the 8 bytes "CBTFUZZ|" (in
 * fuzz/dict/qcow2.dict): 0.qcow2, the image, and 1.qcow2 and 2.qcow2, which
 * its header (and theirs) may name as backing files.  They are written to
 * the process's private directory (fuzz-util.h).  Backing names are
 * resolved against that directory; an input in which any file's header
 * names a backing file with a '/' is skipped, so nothing outside the
 * directory is ever opened (and a name without one cannot leave it).
 *
 * Each input goes through:
 *   1. the pure decoders: the header (with and without the corrupt bit
 *      allowed), and every 8-byte word of the image as an L1, L2 and
 *      refcount table entry with the header's cluster size;
 *   2. a read-only open through cbt_image_open (L1 and refcount tables,
 *      the backing chain): block status over the disk, and reads that
 *      walk L2 tables, compressed and zero clusters and the backing file;
 *      the same through cbt_image_open_qcow2_link, as cbt restore opens
 *      a chain (1.qcow2, if given, opened by the caller);
 *   3. a read-write open of the same file (metadata overlap checks):
 *      a write, read back at once (the bytes must match unless the image
 *      found itself corrupt), a flush, a write-zeroes and a trim
 *      elsewhere, and close (write-back of L2 tables and refcounts);
 *   4. the image as that session left it must open read-only again: our
 *      writer must never leave a file our reader refuses.
 * Besides sanitizer findings, broken contracts abort: block_status
 * returning no extent or more than asked for, the read-back mismatch, the
 * unopenable result of step 4.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/image.h"
#include "cbt/qcow2.h"
#include "cbt/util.h"
#include "fuzz-util.h"

#define SEP       "CBTFUZZ|"
#define SEP_LEN   8
#define MAX_FILES 3
#define HDR_MAX   ((size_t)1 << CBT_QCOW2_MAX_CLUSTER_BITS)
#define READ_MAX  (256u * 1024)

struct part {
  const uint8_t *p;
  size_t len;
};

static uint8_t *buf, *pattern;

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  (void)argc;
  (void)argv;
  fuzz_dir("qcow2");
  buf = g_malloc(READ_MAX);
  pattern = g_malloc(4096);
  for (unsigned i = 0; i < 4096; i++)
    pattern[i] = (uint8_t)(i * 7 + 1);
  return 0;
}

static size_t
split(const uint8_t *data, size_t size, struct part *parts)
{
  size_t n = 0, pos = 0;

  while (n < MAX_FILES) {
    const uint8_t *sep = n + 1 < MAX_FILES
                             ? memmem(data + pos, size - pos, SEP, SEP_LEN) : NULL;
    size_t end = sep ? (size_t)(sep - data) : size;

    parts[n].p = data + pos;
    parts[n].len = end - pos;
    n++;
    if (!sep)
      break;
    pos = end + SEP_LEN;
  }
  return n;
}

/* 1. The pure decoders.  Returns the header's cluster bits, or 16. */
static unsigned
decode_only(const struct part *img)
{
  struct cbt_qcow2_info h;
  g_autofree char *why = NULL, *why2 = NULL;
  unsigned cbits = 16, version = 3;
  size_t hlen = img->len < HDR_MAX ? img->len : HDR_MAX;

  if (cbt_qcow2_header_decode(img->p, hlen, img->len, &h, &why) == 0) {
    cbits = h.cluster_bits;
    version = h.version;
    if (h.cluster_size != (UINT64_C(1) << cbits) ||
        h.l1_size < cbt_qcow2_l1_entries_needed(h.size, cbits)) {
      fprintf(stderr, "fuzz-qcow2: header accepted with inconsistent geometry\n");
      abort();
    }
  }
  cbt_qcow2_header_decode_flags(img->p, hlen, img->len, CBT_QCOW2_DECODE_ALLOW_CORRUPT,
                                &h, &why2);
  for (size_t i = 0; i + 8 <= img->len && i < 64 * 1024; i += 8) {
    uint64_t e = cbt_get_be64(img->p + i), off;
    struct cbt_qcow2_map m;
    bool copied;

    if (cbt_qcow2_l2_decode(e, cbits, version, &m) == 0 &&
        (m.type == CBT_QCOW2_NORMAL || m.type == CBT_QCOW2_ZERO_ALLOC) &&
        (m.host_offset == 0 || m.host_offset % (UINT64_C(1) << cbits))) {
      fprintf(stderr, "fuzz-qcow2: L2 entry %016llx decoded to a bad offset\n",
              (unsigned long long)e);
      abort();
    }
    if (cbt_qcow2_l1_decode(e, cbits, &off, &copied) == 0 &&
        off % (UINT64_C(1) << cbits)) {
      fprintf(stderr, "fuzz-qcow2: misaligned L1 entry accepted\n");
      abort();
    }
    cbt_qcow2_reftable_decode(e, cbits, &off);
  }
  return cbits;
}

/* Does every file that parses name its backing file inside our directory? */
static bool
confined(const struct part *parts, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    struct cbt_qcow2_info h;
    g_autofree char *why = NULL;
    size_t hlen = parts[i].len < HDR_MAX ? parts[i].len : HDR_MAX;

    if (cbt_qcow2_header_decode_flags(parts[i].p, hlen, parts[i].len,
                                      CBT_QCOW2_DECODE_ALLOW_CORRUPT, &h, &why) == 0 &&
        strchr(h.backing_file, '/'))
      return false;
  }
  return true;
}

static void
check_status(struct cbt_image *img)
{
  uint64_t off = 0;

  for (int calls = 0; calls < 8 && off < img->size; calls++) {
    struct cbt_extent ext[16];
    uint64_t len = img->size - off, sum = 0;
    int n = img->ops->block_status(img, off, len, ext, G_N_ELEMENTS(ext));

    if (n < 0)
      return;
    if (n == 0 || (size_t)n > G_N_ELEMENTS(ext)) {
      fprintf(stderr, "fuzz-qcow2: block_status returned %d extents\n", n);
      abort();
    }
    for (int i = 0; i < n; i++) {
      if (ext[i].length == 0 || ext[i].length > len - sum) {
        fprintf(stderr, "fuzz-qcow2: block_status extent %d of %llu bytes "
                "(asked for %llu, %llu before it)\n", i,
                (unsigned long long)ext[i].length, (unsigned long long)len,
                (unsigned long long)sum);
        abort();
      }
      sum += ext[i].length;
    }
    off += sum;
  }
}

static void
read_at(struct cbt_image *img, uint64_t off, uint64_t len)
{
  if (off >= img->size)
    return;
  len = MIN(len, img->size - off);
  len = MIN(len, (uint64_t)READ_MAX);
  cbt_image_run_sync(img, CBT_IO_READ, 0, off, len, buf);
}

static void
exercise_reads(struct cbt_image *img)
{
  uint64_t size = img->size;

  check_status(img);
  if (size <= READ_MAX) {
    read_at(img, 0, size);
  } else {
    read_at(img, 0, 64 * 1024);
    for (unsigned i = 1; i < 8; i++)
      read_at(img, size / 8 * i + 777, 4096);
    read_at(img, size - 64 * 1024, 64 * 1024);
  }
}

/* 2. */
static void
read_session(const char *path)
{
  struct cbt_image *img = NULL;
  g_autofree char *why = NULL;

  if (cbt_image_open(path, "qcow2", true, false, &img, &why) < 0)
    return;
  exercise_reads(img);
  cbt_image_close(img);
}

/* 2b. As cbt restore opens a chain: the image from a descriptor, its
 * header required to name 1.qcow2 (or nothing, for a single file), whose
 * image the caller opened itself. */
static void
link_session(const char *path, bool with_backing)
{
  g_autofree char *bpath = fuzz_path("1.qcow2");
  g_autofree char *why = NULL, *bwhy = NULL;
  struct cbt_qcow2_link link = { .fd = -1 };
  struct cbt_image *img = NULL;

  if (with_backing) {
    if (cbt_image_open(bpath, "auto", true, false, &link.backing, &bwhy) < 0)
      return;
    link.backing_name = "1.qcow2";
  }
  link.fd = open(path, O_RDONLY | O_CLOEXEC);
  if (link.fd < 0) {
    cbt_image_close(link.backing);
    return;
  }
  /* The descriptor and the backing image are the callee's now. */
  if (cbt_image_open_qcow2_link(path, &link, &img, &why) < 0)
    return;
  exercise_reads(img);
  cbt_image_close(img);
}

/* 3. and 4. */
static void
write_session(const char *path)
{
  struct cbt_image *img = NULL;
  g_autofree char *why = NULL, *why2 = NULL;
  uint64_t size, woff;
  bool wrote;

  if (cbt_image_open(path, "qcow2", false, false, &img, &why) < 0)
    return;
  size = img->size;
  if (size < 4096) {
    cbt_image_close(img);
    return;
  }
  /* 512 bytes inside one cluster (at least 512 bytes long), so no other
   * guest cluster can share the host cluster it lands in. */
  woff = (size / 3) & ~(uint64_t)511;
  wrote = cbt_image_run_sync(img, CBT_IO_WRITE, 0, woff, 512, pattern) == 0;
  if (wrote && cbt_image_run_sync(img, CBT_IO_READ, 0, woff, 512, buf) == 0 &&
      !cbt_image_qcow2_corrupt(img) && memcmp(buf, pattern, 512) != 0) {
    fprintf(stderr, "fuzz-qcow2: a write at %llu did not read back\n",
            (unsigned long long)woff);
    abort();
  }
  cbt_image_run_sync(img, CBT_IO_FLUSH, 0, 0, 0, NULL);
  cbt_image_run_sync(img, CBT_IO_ZERO, 0, 0, MIN(size / 4, UINT64_C(1) << 20), NULL);
  cbt_image_run_sync(img, CBT_IO_TRIM, 0, size - MIN(size / 4, UINT64_C(1) << 20),
                     MIN(size / 4, UINT64_C(1) << 20), NULL);
  cbt_image_run_sync(img, CBT_IO_WRITE, CBT_IO_FUA, size / 2 & ~(uint64_t)511, 512,
                     pattern + 512);
  wrote = !cbt_image_qcow2_corrupt(img);
  cbt_image_close(img);
  img = NULL;
  if (!wrote)
    return;
  if (cbt_image_open(path, "qcow2", true, false, &img, &why2) < 0) {
    fprintf(stderr, "fuzz-qcow2: the image opened read-write but not after the "
            "session: %s\n", why2);
    abort();
  }
  cbt_image_close(img);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct part parts[MAX_FILES];
  g_autofree char *top = fuzz_path("0.qcow2");
  size_t n = split(data, size, parts);

  decode_only(&parts[0]);
  if (!confined(parts, n))
    return 0;
  fuzz_clear_dir();
  for (size_t i = 0; i < n; i++) {
    g_autofree char *name = g_strdup_printf("%zu.qcow2", i);
    g_autofree char *path = fuzz_path(name);

    fuzz_write_file(path, parts[i].p, parts[i].len);
  }
  read_session(top);
  link_session(top, n > 1);
  write_session(top);
  return 0;
}
