/* Internals of the bitmap file (format: bitmap-format.md), shared by its
 * files:
 *
 *   bitmap-file.c      the handle, its in-memory entries, the queries
 *   bmfile-format.c    encode/decode, checksums, name and flag rules
 *   bmfile-load.c      open: pick a metadata copy, validate it, load
 *                      the bits
 *   bmfile-write.c     the write engine and its crash-safe ordering
 *   bmfile-edit.c      create, add/remove/update/reset entries, resize
 *
 * Nothing here is part of the library's interface (that is
 * cbt/bitmap-file.h).  Here are the format's constants, the on-disk
 * structs and their decoded forms, the handle and the geometry of the
 * metadata area; then the functions one file calls in another,
 * in sections named after the file that defines them.
 *
 * In memory a cbt_bmfile holds the decoded header of the newest metadata
 * generation and one bmf_entry per bitmap, each with its bits in a struct
 * cbt_bitmap and the CRC32C of every data page as last written (page_crc),
 * from which the two-level data checksum is computed at each metadata
 * write without rereading the bits.
 *
 * Locking: f->lock serialises every call that writes the file or changes
 * the entry list.  Bits change concurrently without it (see bitmap.c for
 * how a page is claimed before it is copied).
 */
#ifndef CBT_BMFILE_INTERNAL_H
#define CBT_BMFILE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <glib.h>

#include "cbt/bitmap-file.h"

#define BMF_MAGIC             "CBT-BMAP"
#define BMF_VERSION           1u
#define BMF_HEADER_SIZE       128u
#define BMF_PAGE              4096u
#define BMF_ENTRY_SIZE        128u
#define BMF_DIR_START         (2 * BMF_PAGE)
#define BMF_MAX_CAPACITY      4096u
#define BMF_STATE_CLEAN       (1u << 0)
#define BMF_COMPAT_CRASH_SAFE (UINT64_C(1) << 0)
#define BMF_INCOMPAT_KNOWN    UINT64_C(0)
#define BMF_FLAGS_KNOWN       (CBT_BMF_ACTIVE | CBT_BMF_FROZEN | CBT_BMF_INCONSISTENT)
#define BMF_CRC_OFFSET        16u

/* On-disk structs: little-endian, packed, never accessed in place (they
 * are memcpy'd from/to byte buffers and converted by the encode/decode
 * helpers). */
struct bmf_header_disk {
  uint8_t  magic[8];
  uint32_t version;
  uint32_t header_size;
  uint32_t header_crc;
  uint32_t slot;
  uint64_t generation;
  uint64_t incompat;
  uint64_t compat;
  uint64_t autoclear;
  uint32_t state_flags;
  uint32_t nb_entries;
  uint64_t image_size;
  uint64_t image_inode;
  uint8_t  uuid[16];
  uint64_t dir_offset;
  uint32_t dir_capacity;
  uint32_t dir_entry_size;
  uint32_t dir_crc;
  uint32_t reserved0;
  uint64_t reserved1;
} __attribute__((packed));
_Static_assert(sizeof(struct bmf_header_disk) == BMF_HEADER_SIZE, "header size");
_Static_assert(offsetof(struct bmf_header_disk, header_crc) == BMF_CRC_OFFSET,
               "header_crc offset is fixed by the format");
_Static_assert(offsetof(struct bmf_header_disk, generation) == 24,
               "generation offset is fixed by the format");

struct bmf_entry_disk {
  char     name[64];
  uint32_t flags;
  uint32_t granularity;
  uint64_t data_offset;
  uint64_t data_length;
  uint32_t data_crc;
  uint32_t reserved0;
  uint64_t create_time;
  uint64_t checkpoint;
  uint8_t  reserved1[16];
} __attribute__((packed));
_Static_assert(sizeof(struct bmf_entry_disk) == BMF_ENTRY_SIZE, "entry size");

/* Decoded, host-order header. */
struct bmf_header {
  uint32_t version, header_size, header_crc, slot;
  uint64_t generation, incompat, compat, autoclear;
  uint32_t state_flags, nb_entries;
  uint64_t image_size, image_inode;
  uint8_t  uuid[16];
  uint64_t dir_offset;
  uint32_t dir_capacity, dir_entry_size, dir_crc, reserved0;
  uint64_t reserved1;
};

struct bmf_entry {
  char name[CBT_BMF_NAME_MAX + 1];
  uint32_t flags;
  uint32_t granularity;
  uint64_t data_offset;
  uint64_t data_length;
  uint32_t data_crc;           /* as stored (open) or last written */
  uint64_t create_time;
  uint64_t checkpoint;         /* checkpoint that started this interval */
  struct cbt_bitmap bm;
  uint64_t data_pages;         /* == bm.npages */
  uint32_t *page_crc;          /* CRC32C of each data page as on disk */
  bool data_ok;                /* data matched data_crc at open */
  bool on_disk;                /* referenced by the durable metadata */
};

struct cbt_bmfile {
  GMutex lock;
  char *path;
  int fd;
  bool writable;
  struct bmf_header hdr;       /* newest generation, durable or read */
  uint8_t *hdr_ext;            /* header bytes 128 .. header_size, kept */
  struct bmf_entry **entries;  /* dir_capacity slots, first nentries used */
  unsigned nentries;
  bool found_clean;            /* CLEAN at open */
  bool found_crash_safe;       /* not CLEAN at open, but crash_safe_tracking */
  bool crash_safe;             /* this writer keeps the crash-safe rules */
  bool disk_clean;             /* CLEAN in the durable metadata */
  bool owned_dirty;            /* this handle wrote the "not clean" state */
  bool meta_dirty;             /* metadata changed since last write */
  char *recovery;
};

static inline uint64_t
round_up_page(uint64_t x)
{
  return (x + BMF_PAGE - 1) & ~(uint64_t)(BMF_PAGE - 1);
}

static inline uint64_t
dir_area(uint32_t capacity)
{
  return round_up_page((uint64_t)capacity * BMF_ENTRY_SIZE);
}

static inline uint64_t
dir_offset_for(uint32_t capacity, unsigned slot)
{
  return BMF_DIR_START + slot * dir_area(capacity);
}

static inline uint64_t
meta_end(uint32_t capacity)
{
  return BMF_DIR_START + 2 * dir_area(capacity);
}

static inline bool
gran_ok(uint32_t g)
{
  return g >= CBT_BITMAP_MIN_GRANULARITY && (g & (g - 1)) == 0;
}

/* Data length for an image of @size bytes at @gran (gran_ok, size capped). */
static inline uint64_t
data_length_for(uint64_t size, uint32_t gran)
{
  uint64_t bits = (size + gran - 1) / gran;

  return (bits + 63) / 64 * 8;
}

/* bitmap-file.c */
uint32_t bmf_page_bytes(const struct bmf_entry *e, uint64_t page);
void bmf_entry_free(struct bmf_entry *e);
int bmf_entry_new(const char *name, uint32_t flags, uint32_t gran,
                  uint64_t image_size, struct bmf_entry **out);
void bmf_mark_all_pages(struct bmf_entry *e);
void bmf_entries_free(struct cbt_bmfile *f);
cbt_bmfile *bmf_handle_new(const char *path, int fd, bool writable);

/* bmfile-format.c */
void bmf_header_decode(const uint8_t *buf, struct bmf_header *h);
void bmf_header_encode(const struct bmf_header *h, uint8_t *buf);
uint32_t bmf_header_crc(const uint8_t *buf, uint32_t header_size);
void bmf_entry_decode(const uint8_t *buf, struct bmf_entry_disk *d);
uint32_t bmf_data_crc(const uint32_t *page_crc, uint64_t npages);
void bmf_entry_encode(const struct bmf_entry *e, uint8_t *buf);
bool bmf_name_ok(const char *name);
bool bmf_flags_ok(uint32_t flags);

/* bmfile-write.c */
int bmf_write_meta(struct cbt_bmfile *f, bool clean, char **why);
int bmf_sync_locked(struct cbt_bmfile *f, bool make_clean, char **why);

#endif /* CBT_BMFILE_INTERNAL_H */
