/* Opening a bitmap file: both metadata copies are read, the newest intact
 * one is validated in full (bitmap-format.md, "What a reader must reject")
 * and the bits of every entry are loaded.  Nothing is allocated for the
 * bits before the directory has proved their areas sane and the machine
 * able to hold them.  What a writer makes of a file found not clean
 * (write rule 1) is decided here, once the copy is chosen.
 *
 * No locking: the handle is the caller's alone until open returns it.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/crc32c.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "bmfile-internal.h"

/* Outcome of reading one metadata copy. */
enum copy_state {
  COPY_OK,        /* intact and valid */
  COPY_TORN,      /* not intact: may be a torn write; *reason says why */
};

/* Read header copy @slot into @page and check that it is intact (format
 * "What a reader must reject", first paragraph).  Returns COPY_OK or
 * COPY_TORN (with *@reason, and *@bad_magic if that was the cause), or
 * -errno on an I/O error. */
static int
read_header_copy(int fd, unsigned slot, uint8_t *page, struct bmf_header *h,
                 char **reason, bool *bad_magic)
{
  uint32_t crc;
  int r;

  *bad_magic = false;
  r = cbt_io_pread(fd, page, BMF_PAGE, (uint64_t)slot * BMF_PAGE);
  if (r == -ENODATA)
    return cbt_fail(reason, COPY_TORN, "header copy %u truncated", slot);
  if (r < 0)
    return cbt_fail(reason, r, "reading header copy %u: %s", slot, g_strerror(-r));
  if (memcmp(page, BMF_MAGIC, 8) != 0) {
    *bad_magic = true;
    return cbt_fail(reason, COPY_TORN, "header copy %u: bad magic", slot);
  }
  bmf_header_decode(page, h);
  if (h->header_size < BMF_HEADER_SIZE || h->header_size > BMF_PAGE ||
      h->header_size % 8)
    return cbt_fail(reason, COPY_TORN, "header copy %u: bad header_size %" PRIu32,
                slot, h->header_size);
  crc = bmf_header_crc(page, h->header_size);
  if (crc != h->header_crc)
    return cbt_fail(reason, COPY_TORN,
                "header copy %u: header checksum mismatch "
                "(stored 0x%08" PRIx32 ", computed 0x%08" PRIx32 ")",
                slot, h->header_crc, crc);
  if (h->slot != slot || h->generation % 2 != slot)
    return cbt_fail(reason, COPY_TORN,
                "header copy %u: slot %" PRIu32 " / generation %" PRIu64
                " do not match its position", slot, h->slot, h->generation);
  return COPY_OK;
}

/* Validate the rest of an intact header.  0, -ENOTSUP or -EBADMSG. */
static int
validate_header(const struct bmf_header *h, const uint8_t *page, char **why)
{
  unsigned s = h->slot;

  if (h->version != BMF_VERSION)
    return cbt_fail(why, -ENOTSUP, "unsupported format version %" PRIu32
                " (this build reads version %u)", h->version, BMF_VERSION);
  if (h->incompat & ~BMF_INCOMPAT_KNOWN)
    return cbt_fail(why, -ENOTSUP, "unknown incompatible feature bits 0x%" PRIx64,
                h->incompat & ~BMF_INCOMPAT_KNOWN);
  if (h->state_flags & ~BMF_STATE_CLEAN)
    return cbt_fail(why, -EBADMSG, "header copy %u: reserved state flag bits "
                "0x%" PRIx32 " set", s, h->state_flags & ~BMF_STATE_CLEAN);
  if (h->reserved0 || h->reserved1)
    return cbt_fail(why, -EBADMSG, "header copy %u: reserved field not zero", s);
  if (!cbt_is_zero(page + h->header_size, BMF_PAGE - h->header_size))
    return cbt_fail(why, -EBADMSG, "header copy %u: padding after header not zero", s);
  if (h->image_size == 0 || h->image_size > CBT_BITMAP_MAX_SIZE)
    return cbt_fail(why, -EBADMSG, "header copy %u: bad image_size %" PRIu64, s,
                h->image_size);
  if (cbt_is_zero(h->uuid, sizeof h->uuid))
    return cbt_fail(why, -EBADMSG, "header copy %u: file_uuid is all zeros", s);
  if (h->dir_entry_size != BMF_ENTRY_SIZE)
    return cbt_fail(why, -EBADMSG, "header copy %u: bad dir_entry_size %" PRIu32
                " (must be %u)", s, h->dir_entry_size, BMF_ENTRY_SIZE);
  if (h->dir_capacity == 0 || h->dir_capacity > BMF_MAX_CAPACITY)
    return cbt_fail(why, -EBADMSG, "header copy %u: bad dir_capacity %" PRIu32, s,
                h->dir_capacity);
  if (h->dir_offset != dir_offset_for(h->dir_capacity, s))
    return cbt_fail(why, -EBADMSG, "header copy %u: bad dir_offset %" PRIu64
                " (must be %" PRIu64 ")", s, h->dir_offset,
                dir_offset_for(h->dir_capacity, s));
  if (h->nb_entries > h->dir_capacity)
    return cbt_fail(why, -EBADMSG, "header copy %u: nb_entries %" PRIu32
                " exceeds dir_capacity %" PRIu32, s, h->nb_entries,
                h->dir_capacity);
  return 0;
}

static int
cmp_disk_by_offset(const void *a, const void *b)
{
  const struct bmf_entry_disk *x = *(struct bmf_entry_disk *const *)a;
  const struct bmf_entry_disk *y = *(struct bmf_entry_disk *const *)b;

  return x->data_offset < y->data_offset ? -1 : x->data_offset > y->data_offset;
}

/* The most memory the bits of one file may take: what the machine has.
 * The areas are already bounded by the file's size, but a sparse file can
 * claim as much as its file system allows; past physical memory the bits
 * could never be held (and with overcommit on, scanning them would take
 * hours), so such a file is refused before anything is allocated. */
static uint64_t
bits_budget(void)
{
  long pages = sysconf(_SC_PHYS_PAGES);
  long psz = sysconf(_SC_PAGESIZE);

  if (pages <= 0 || psz <= 0)
    return UINT64_MAX;
  return (uint64_t)pages * (uint64_t)psz;
}

/* Decode and validate the directory @dir of header @h against a file of
 * @file_size bytes; on success fill f->entries (bitmaps not loaded yet). */
static int
load_directory(struct cbt_bmfile *f, const struct bmf_header *h,
               const uint8_t *dir, uint64_t file_size, char **why)
{
  g_autoptr(GHashTable) names = g_hash_table_new(g_str_hash, g_str_equal);
  g_autofree struct bmf_entry_disk *ds = g_new0(struct bmf_entry_disk,
                                                h->nb_entries + 1);
  g_autofree struct bmf_entry_disk **sorted = g_new0(struct bmf_entry_disk *,
                                                     h->nb_entries + 1);
  uint64_t mend = meta_end(h->dir_capacity);
  uint64_t need = 0, budget;
  int r;

  /* Validate everything before allocating any bitmap: the areas, checked
   * against the file size and each other, cap what the bitmaps cost. */
  for (uint32_t i = 0; i < h->dir_capacity; i++) {
    const uint8_t *raw = dir + (size_t)i * BMF_ENTRY_SIZE;
    struct bmf_entry_disk d;
    size_t len;
    uint64_t expect;

    if (i >= h->nb_entries) {
      if (!cbt_is_zero(raw, BMF_ENTRY_SIZE))
        return cbt_fail(why, -EBADMSG, "directory entry %" PRIu32
                    " is past nb_entries but not zero", i);
      continue;
    }
    bmf_entry_decode(raw, &d);
    len = strnlen(d.name, sizeof d.name);
    if (len == 0)
      return cbt_fail(why, -EBADMSG, "directory entry %" PRIu32 ": empty name", i);
    if (len == sizeof d.name)
      return cbt_fail(why, -EBADMSG, "directory entry %" PRIu32
                  ": name not terminated", i);
    if (!cbt_is_zero(d.name + len, sizeof d.name - len))
      return cbt_fail(why, -EBADMSG, "directory entry %" PRIu32
                  ": bytes after the name not zero", i);
    if (!bmf_name_ok(d.name))
      return cbt_fail(why, -EBADMSG, "directory entry %" PRIu32
                  ": name has non-printable bytes", i);
    if (!bmf_flags_ok(d.flags))
      return cbt_fail(why, -EBADMSG, "bitmap '%s': bad flags 0x%" PRIx32,
                  d.name, d.flags);
    if (!gran_ok(d.granularity))
      return cbt_fail(why, -EBADMSG, "bitmap '%s': bad granularity %" PRIu32
                  " (must be a power of two >= 512)", d.name, d.granularity);
    if (d.reserved0 || !cbt_is_zero(d.reserved1, sizeof d.reserved1))
      return cbt_fail(why, -EBADMSG, "bitmap '%s': reserved field not zero", d.name);
    if (d.data_offset % BMF_PAGE || d.data_offset < mend)
      return cbt_fail(why, -EBADMSG, "bitmap '%s': bad data_offset %" PRIu64
                  " (must be a multiple of 4096 and >= %" PRIu64 ")",
                  d.name, d.data_offset, mend);
    expect = data_length_for(h->image_size, d.granularity);
    if (d.data_length != expect)
      return cbt_fail(why, -EBADMSG, "bitmap '%s': data_length %" PRIu64
                  " does not match image size and granularity (%" PRIu64 ")",
                  d.name, d.data_length, expect);
    if (d.data_offset > file_size || d.data_length > file_size - d.data_offset)
      return cbt_fail(why, -EBADMSG, "bitmap '%s': data area [%" PRIu64 ", +%" PRIu64
                  ") extends past the end of the file (%" PRIu64
                  " bytes): truncated", d.name, d.data_offset, d.data_length,
                  file_size);
    if (g_hash_table_contains(names, d.name))
      return cbt_fail(why, -EBADMSG, "duplicate bitmap name '%s'", d.name);
    ds[i] = d;
    sorted[i] = &ds[i];
    g_hash_table_add(names, ds[i].name);
  }

  qsort(sorted, h->nb_entries, sizeof *sorted, cmp_disk_by_offset);
  for (uint32_t i = 1; i < h->nb_entries; i++) {
    const struct bmf_entry_disk *a = sorted[i - 1], *b = sorted[i];

    if (a->data_offset + round_up_page(a->data_length) > b->data_offset)
      return cbt_fail(why, -EBADMSG, "data areas of bitmaps '%s' and '%s' overlap",
                  a->name, b->name);
  }
  /* No overflow: at most 4096 entries of at most 2^48 bytes each. */
  for (uint32_t i = 0; i < h->nb_entries; i++)
    need += round_up_page(ds[i].data_length);
  budget = bits_budget();
  if (need > budget)
    return cbt_fail(why, -ENOMEM, "the bitmaps claim %" PRIu64 " bytes of data "
                "(image_size %" PRIu64 "), more than this machine's memory (%"
                PRIu64 " bytes)", need, h->image_size, budget);

  f->entries = g_new0(struct bmf_entry *, h->dir_capacity);
  for (uint32_t i = 0; i < h->nb_entries; i++) {
    struct bmf_entry *e;

    r = bmf_entry_new(ds[i].name, ds[i].flags, ds[i].granularity, h->image_size,
                      &e);
    if (r < 0)
      return cbt_fail(why, r, "bitmap '%s': %s", ds[i].name, g_strerror(-r));
    e->data_offset = ds[i].data_offset;
    e->data_crc = ds[i].data_crc;
    e->create_time = ds[i].create_time;
    e->checkpoint = ds[i].checkpoint;
    e->on_disk = true;
    f->entries[f->nentries++] = e;
  }
  return 0;
}

/* Read directory copy of @h.  COPY_OK with *@dir allocated, COPY_TORN
 * with *@reason, or -errno. */
static int
read_directory(int fd, const struct bmf_header *h, uint8_t **dir,
               char **reason)
{
  size_t len = (size_t)h->dir_capacity * BMF_ENTRY_SIZE;
  g_autofree uint8_t *buf = g_malloc(len);
  uint32_t crc;
  int r;

  r = cbt_io_pread(fd, buf, len, h->dir_offset);
  if (r == -ENODATA)
    return cbt_fail(reason, COPY_TORN, "directory copy %" PRIu32 " truncated",
                h->slot);
  if (r < 0)
    return cbt_fail(reason, r, "reading directory copy %" PRIu32 ": %s", h->slot,
                g_strerror(-r));
  crc = cbt_crc32c(0, buf, len);
  if (crc != h->dir_crc)
    return cbt_fail(reason, COPY_TORN, "directory copy %" PRIu32 ": checksum "
                "mismatch (stored 0x%08" PRIx32 ", computed 0x%08" PRIx32 ")",
                h->slot, h->dir_crc, crc);
  *dir = g_steal_pointer(&buf);
  return COPY_OK;
}

/* The next stretch of [@pos, @end) of the file that may hold data, as
 * SEEK_DATA/SEEK_HOLE tell: [*@dstart, *@dend).  False when the rest is a
 * hole.  Where the file system cannot tell, everything is data. */
static bool
next_data(int fd, uint64_t pos, uint64_t end, uint64_t *dstart, uint64_t *dend)
{
  off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
  off_t h;

  if (d < 0 && errno == ENXIO)
    return false;
  if (d < 0 || (uint64_t)d < pos) {
    *dstart = pos;
    *dend = end;
    return true;
  }
  if ((uint64_t)d >= end)
    return false;
  h = lseek(fd, d, SEEK_HOLE);
  *dstart = (uint64_t)d;
  *dend = h < 0 || (uint64_t)h > end || h <= d ? end : (uint64_t)h;
  return true;
}

static void
words_from_le(uint64_t *w, uint64_t n)
{
#if __BYTE_ORDER != __LITTLE_ENDIAN
  for (uint64_t i = 0; i < n; i++)
    w[i] = le64toh(w[i]);
#else
  (void)w;
  (void)n;
#endif
}

/* Read entry @e's bits and fill its page_crc.
 *
 * Only what the file stores is read: holes (a sparse file, or a file
 * system that keeps zero blocks as holes) read as zeros, which is what
 * the freshly allocated bits already are, and a page in a hole gets the
 * CRC of a zero page without being touched.  So memory and time follow
 * the data the file really holds, not the length its directory claims
 * (a header claiming a huge image costs address space, not RAM). */
static int
load_entry_bits(struct cbt_bmfile *f, struct bmf_entry *e, char **why)
{
  static const uint8_t zero_page[BMF_PAGE];
  uint8_t *bytes = (uint8_t *)e->bm.words;
  uint32_t zero_crc = cbt_crc32c(0, zero_page, BMF_PAGE);
  uint64_t pos = 0;

  for (uint64_t p = 0; p < e->data_pages; p++)
    e->page_crc[p] = bmf_page_bytes(e, p) == BMF_PAGE ? zero_crc
                     : cbt_crc32c(0, zero_page, bmf_page_bytes(e, p));

  while (pos < e->data_length) {
    uint64_t ds, de, first, stop;
    int r;

    if (!next_data(f->fd, e->data_offset + pos, e->data_offset + e->data_length,
                   &ds, &de))
      break;
    /* Whole pages, so the CRCs and the word conversion see whole pages. */
    first = (ds - e->data_offset) / BMF_PAGE;
    stop = MIN(e->data_length, round_up_page(de - e->data_offset));
    stop = MAX(stop, MIN(e->data_length, (first + 1) * BMF_PAGE));
    r = cbt_io_pread(f->fd, bytes + first * BMF_PAGE, stop - first * BMF_PAGE,
                     e->data_offset + first * BMF_PAGE);
    if (r == -ENODATA)
      return cbt_fail(why, -EBADMSG, "bitmap '%s': data truncated", e->name);
    if (r < 0)
      return cbt_fail(why, r, "bitmap '%s': reading data: %s", e->name,
                  g_strerror(-r));
    for (uint64_t p = first; p * BMF_PAGE < stop; p++)
      e->page_crc[p] = cbt_crc32c(0, bytes + p * BMF_PAGE,
                                  bmf_page_bytes(e, p));
    words_from_le(e->bm.words + first * CBT_BITMAP_WORDS_PER_PAGE,
                  (stop - first * BMF_PAGE) / 8);
    for (uint64_t p = first; p * BMF_PAGE < stop; p++)
      cbt_bitmap_page_loaded(&e->bm, p);
    pos = stop;
  }
  return 0;
}

/* Read every entry's bits, fill page_crc and check the data checksum.
 * A mismatch is fatal only when the file is clean (after a crash the data
 * is expected to lag its checksum; it is untrusted then anyway). */
static int
load_data(struct cbt_bmfile *f, char **why)
{
  for (unsigned i = 0; i < f->nentries; i++) {
    struct bmf_entry *e = f->entries[i];
    uint64_t nwords = cbt_bitmap_nwords(&e->bm);
    uint64_t last_mask;
    uint32_t crc;
    int r;

    r = load_entry_bits(f, e, why);
    if (r < 0)
      return r;
    crc = bmf_data_crc(e->page_crc, e->data_pages);
    if (crc != e->data_crc) {
      if (f->found_clean)
        return cbt_fail(why, -EBADMSG, "bitmap '%s': data checksum mismatch "
                    "(stored 0x%08" PRIx32 ", computed 0x%08" PRIx32 ")",
                    e->name, e->data_crc, crc);
      e->data_ok = false;
    }
    if (e->bm.nbits % 64) {
      last_mask = ~UINT64_C(0) >> (64 - e->bm.nbits % 64);
      if (cbt_bitmap_word(&e->bm, nwords - 1) & ~last_mask) {
        if (f->found_clean)
          return cbt_fail(why, -EBADMSG, "bitmap '%s': bits past the end of the "
                      "image are set", e->name);
        /* Drop them, and have a writer rewrite the page without them. */
        e->bm.words[nwords - 1] &= last_mask;
        cbt_bitmap_mark_page(&e->bm, e->data_pages - 1);
      }
    }
  }
  return 0;
}

/* The image a caller opens the file for (cbt_bmfile_open_image). */
struct bmf_expect {
  uint64_t image_size;
  uint64_t image_inode;
};

static int
identity_check(const struct bmf_header *h, uint64_t image_size,
               uint64_t image_inode, char **why)
{
  if (image_size != h->image_size)
    return cbt_fail(why, -ESTALE, "image size changed: bitmap covers %" PRIu64
                " bytes, image is %" PRIu64 " bytes", h->image_size,
                image_size);
  if (image_inode != h->image_inode)
    return cbt_fail(why, -ESTALE, "image file replaced: bitmap was made for inode "
                "%" PRIu64 ", image is inode %" PRIu64, h->image_inode,
                image_inode);
  return 0;
}

int
cbt_bmfile_check_image(const cbt_bmfile *f, uint64_t image_size,
                       uint64_t image_inode, char **why)
{
  return identity_check(&f->hdr, image_size, image_inode, why);
}

/* Validate copy @h (intact) fully and load its directory into @f.
 * COPY_OK, COPY_TORN (directory torn, *@reason) or -errno (*@why).
 * With @expect, a copy made for another image is refused (-ESTALE) once
 * its directory proved it usable and before any bitmap is allocated. */
static int
try_copy(struct cbt_bmfile *f, const struct bmf_header *h, const uint8_t *page,
         uint64_t file_size, const struct bmf_expect *expect, char **reason,
         char **why)
{
  g_autofree uint8_t *dir = NULL;
  int r;

  r = validate_header(h, page, why);
  if (r < 0)
    return r;
  r = read_directory(f->fd, h, &dir, reason);
  if (r != COPY_OK)
    return r;
  if (expect) {
    r = identity_check(h, expect->image_size, expect->image_inode, why);
    if (r < 0)
      return r;
  }
  return load_directory(f, h, dir, file_size, why);
}

static int
open_file(const char *path, bool writable, const struct bmf_expect *expect,
          cbt_bmfile **out, char **why)
{
  g_autoptr(cbt_bmfile) f = NULL;
  g_autofree uint8_t *pages = g_malloc(2 * BMF_PAGE);
  g_autofree char *reason0 = NULL;
  g_autofree char *reason1 = NULL;
  g_autofree char *dir_reason = NULL;
  uint8_t *page[2] = { pages, pages + BMF_PAGE };
  char **reasonp[2] = { &reason0, &reason1 };
  const char *reason[2];
  struct bmf_header h[2];
  bool intact[2], bad_magic[2];
  unsigned order[2], ncand = 0;
  struct stat st;
  int fd, r;

  *out = NULL;
  fd = cbt_open_regular(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, &st, NULL);
  if (fd == -EINVAL)
    return cbt_fail(why, -EINVAL, "not a regular file");
  if (fd < 0)
    return cbt_fail(why, fd, "cannot open: %s", g_strerror(-fd));
  f = bmf_handle_new(path, fd, writable);

  for (unsigned s = 0; s < 2; s++) {
    r = read_header_copy(fd, s, page[s], &h[s], reasonp[s], &bad_magic[s]);
    if (r < 0)
      return cbt_fail(why, r, "%s", *reasonp[s]);
    intact[s] = r == COPY_OK;
  }
  if (!intact[0] && !intact[1]) {
    bool not_ours = bad_magic[0] && bad_magic[1];

    reason[0] = reason0;
    reason[1] = reason1;

    return cbt_fail(why, not_ours ? -EINVAL : -EBADMSG, "%s%s; %s",
                not_ours ? "not a cbt bitmap file: " : "no intact header: ",
                reason[0], reason[1]);
  }

  /* Newest intact copy first. */
  if (intact[0] && intact[1]) {
    unsigned newer = h[1].generation > h[0].generation;

    order[ncand++] = newer;
    order[ncand++] = !newer;
  } else {
    order[ncand++] = intact[1];
  }

  for (unsigned c = 0; c < ncand; c++) {
    unsigned s = order[c];

    bmf_entries_free(f);
    r = try_copy(f, &h[s], page[s], (uint64_t)st.st_size, expect,
                 c == 0 ? &dir_reason : reasonp[s], why);
    if (r < 0)
      return r;
    if (r == COPY_TORN)
      continue;

    f->hdr = h[s];
    if (h[s].header_size > BMF_HEADER_SIZE) {
      f->hdr_ext = g_malloc(h[s].header_size - BMF_HEADER_SIZE);
      memcpy(f->hdr_ext, page[s] + BMF_HEADER_SIZE,
             h[s].header_size - BMF_HEADER_SIZE);
    }
    f->found_clean = h[s].state_flags & BMF_STATE_CLEAN;
    /* A copy that is not intact may have been the newest generation, torn
     * by a crash: then whatever the older copy says, the file cannot be
     * trusted. */
    if (c > 0 || ncand == 1) {
      f->recovery = g_strdup(c > 0 ? dir_reason : *reasonp[!s]);
      f->found_clean = false;
    }
    /* Crash-safe tracking (write rules 6-8): a file left not clean by a
     * writer in that mode has every bit it needs on disk -- also when the
     * newest metadata copy was torn, since the generation before it was
     * durable and references the same data areas (rule 8). */
    f->found_crash_safe = !f->found_clean && (h[s].compat & BMF_COMPAT_CRASH_SAFE);
    f->disk_clean = f->found_clean;
    r = load_data(f, why);
    if (r < 0)
      return r;
    if (writable && !f->found_clean && !f->found_crash_safe) {
      /* Write rule 1: a crashed bitmap stays untrusted until reset. */
      for (unsigned i = 0; i < f->nentries; i++)
        f->entries[i]->flags |= CBT_BMF_INCONSISTENT;
      f->meta_dirty = true;
    }
    *out = g_steal_pointer(&f);
    return 0;
  }
  return cbt_fail(why, -EBADMSG, "no usable metadata copy: %s; %s", dir_reason,
              ncand > 1 ? *reasonp[order[1]] : *reasonp[!order[0]]);
}

int
cbt_bmfile_open(const char *path, bool writable, cbt_bmfile **out, char **why)
{
  return open_file(path, writable, NULL, out, why);
}

int
cbt_bmfile_open_image(const char *path, bool writable, uint64_t image_size,
                      uint64_t image_inode, cbt_bmfile **out, char **why)
{
  const struct bmf_expect expect = { image_size, image_inode };

  return open_file(path, writable, &expect, out, why);
}
