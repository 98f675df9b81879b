/* The qcow2 on-disk format (QEMU docs/interop/qcow2.txt), as far as the
 * image backend reads and writes it: the header and its extensions, L1 and
 * L2 table entries and refcount table entries.
 *
 * Everything here is pure: functions decode or encode bytes handed to
 * them and never do I/O, so the whole format layer is unit-tested
 * (tests/test-qcow2-format.c).  All qcow2 numbers are big-endian on disk;
 * the decoded structs hold host-order values.
 *
 * What a reader must reject (cbt_qcow2_header_decode returns an error and a
 * sentence naming the field or feature):
 *   -EINVAL   not qcow2 (bad magic)
 *   -ENOTSUP  a valid image using a feature we do not implement: version
 *             other than 2 or 3, encryption, external data file, extended
 *             L2 entries, non-zlib compression, refcount width other than
 *             16 bits, the dirty bit (lazy refcounts needing repair), the
 *             corrupt bit (unless the caller allows it, for reading),
 *             any unknown incompatible feature bit
 *   -EBADMSG  corrupt: a field out of range, misaligned offsets, tables
 *             outside the file, an L1 table too small for the disk size,
 *             header extensions running past the first cluster
 */
#ifndef CBT_QCOW2_H
#define CBT_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CBT_QCOW2_MAGIC 0x514649fbu           /* "QFI\xfb" */

/* Header, bytes 0..103 (a version 2 header ends at byte 72). */
struct cbt_qcow2_header_disk {
  uint32_t magic;
  uint32_t version;
  uint64_t backing_file_offset;
  uint32_t backing_file_size;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  /* version 3 */
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
} __attribute__((packed));
_Static_assert(sizeof(struct cbt_qcow2_header_disk) == 104, "qcow2 header size");

#define CBT_QCOW2_V2_HEADER_LEN 72u
#define CBT_QCOW2_V3_HEADER_LEN 104u
/* Byte offsets of fields the backend rewrites in place. */
#define CBT_QCOW2_OFF_L1_SIZE        36u   /* l1_size (4) + l1_table_offset (8) */
#define CBT_QCOW2_OFF_REFTABLE       48u   /* offset (8) + clusters (4) */
#define CBT_QCOW2_OFF_INCOMPAT       72u   /* v3: incompatible_features (8) */
#define CBT_QCOW2_OFF_AUTOCLEAR      88u
#define CBT_QCOW2_OFF_COMPRESSION   104u   /* v3, if header_length > 104 */

/* Incompatible feature bits. */
#define CBT_QCOW2_INCOMPAT_DIRTY        (UINT64_C(1) << 0)
#define CBT_QCOW2_INCOMPAT_CORRUPT      (UINT64_C(1) << 1)
#define CBT_QCOW2_INCOMPAT_DATA_FILE    (UINT64_C(1) << 2)
#define CBT_QCOW2_INCOMPAT_COMPRESSION  (UINT64_C(1) << 3)
#define CBT_QCOW2_INCOMPAT_EXTL2        (UINT64_C(1) << 4)

/* Header extension types. */
#define CBT_QCOW2_EXT_END           0x00000000u
#define CBT_QCOW2_EXT_BACKING_FMT   0xe2792acau
#define CBT_QCOW2_EXT_FEATURE_NAMES 0x6803f857u
#define CBT_QCOW2_EXT_BITMAPS       0x23852875u
#define CBT_QCOW2_EXT_CRYPTO        0x0537be77u
#define CBT_QCOW2_EXT_DATA_FILE     0x44415441u

/* Limits: the cluster sizes QEMU supports, and caps on table sizes so a
 * corrupt header cannot make us allocate without bound. */
#define CBT_QCOW2_MIN_CLUSTER_BITS  9u
#define CBT_QCOW2_MAX_CLUSTER_BITS  21u
#define CBT_QCOW2_MAX_L1_ENTRIES    (32u * 1024 * 1024 / 8)
#define CBT_QCOW2_MAX_REFTABLE_BYTES (64u * 1024 * 1024)
#define CBT_QCOW2_MAX_BACKING_NAME  1023u

/* Table entries. */
#define CBT_QCOW2_COPIED       (UINT64_C(1) << 63)
#define CBT_QCOW2_COMPRESSED_BIT   (UINT64_C(1) << 62)
#define CBT_QCOW2_ZERO_BIT         (UINT64_C(1) << 0)
#define CBT_QCOW2_OFFSET_MASK  UINT64_C(0x00fffffffffffe00)   /* bits 9..55 */

/* The decoded header.  Strings are NUL-terminated copies. */
struct cbt_qcow2_info {
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint64_t size;                  /* virtual disk size */
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  char backing_file[CBT_QCOW2_MAX_BACKING_NAME + 1];  /* "" if none */
  char backing_format[64];                            /* "" if not given */
  bool has_bitmaps;               /* bitmaps extension present */
};

/* Decode and validate the header in @buf, the first @len bytes of a file
 * of @file_size bytes.  @len must cover the header and its extensions and
 * the backing file name; passing the whole first cluster (or the whole
 * file when shorter) always suffices.  Returns 0 with *@out filled, or
 * -errno (see the top of this file) with *@why set to a g_strdup'd
 * sentence (caller frees). */
int cbt_qcow2_header_decode(const void *buf, size_t len, uint64_t file_size,
                            struct cbt_qcow2_info *out, char **why);

/* The same with @flags: CBT_QCOW2_DECODE_ALLOW_CORRUPT accepts an image
 * whose corrupt bit is set (it stays set in incompatible_features), for a
 * caller that only reads it, as QEMU allows. */
#define CBT_QCOW2_DECODE_ALLOW_CORRUPT (1u << 0)
int cbt_qcow2_header_decode_flags(const void *buf, size_t len, uint64_t file_size,
                                  unsigned flags, struct cbt_qcow2_info *out,
                                  char **why);

/* The number of L1 entries needed for a disk of @size bytes with
 * @cluster_bits (0 if the arithmetic would overflow). */
uint64_t cbt_qcow2_l1_entries_needed(uint64_t size, unsigned cluster_bits);

/* What an L2 entry says about one guest cluster. */
enum cbt_qcow2_ctype {
  CBT_QCOW2_UNALLOCATED,   /* backing file data, or zeros without one */
  CBT_QCOW2_ZERO_PLAIN,    /* reads as zeros, no host cluster */
  CBT_QCOW2_ZERO_ALLOC,    /* reads as zeros, host cluster preallocated */
  CBT_QCOW2_NORMAL,        /* data at host_offset */
  CBT_QCOW2_COMPRESSED,    /* deflate data at host_offset, comp_len bytes */
};

struct cbt_qcow2_map {
  enum cbt_qcow2_ctype type;
  uint64_t host_offset;    /* NORMAL, ZERO_ALLOC: cluster aligned */
  uint64_t comp_len;       /* COMPRESSED: bytes to read from host_offset */
  bool copied;             /* refcount is exactly one (may write in place) */
};

/* Decode the host-order L2 entry @e of an image with @cluster_bits and
 * @version.  Returns 0, or -EBADMSG if reserved bits are set or an offset
 * is misaligned (the entry is corrupt; never use it). */
int cbt_qcow2_l2_decode(uint64_t e, unsigned cluster_bits, unsigned version,
                        struct cbt_qcow2_map *out);

/* The host-order L2 entry for a standard cluster at @host (0 with @zero
 * for a plain zero cluster, 0 without for unallocated). */
uint64_t cbt_qcow2_l2_encode(uint64_t host, bool zero);

/* Decode a host-order L1 entry: *@l2_offset is 0 for no L2 table.
 * Returns 0 or -EBADMSG (reserved bits, misaligned offset). */
int cbt_qcow2_l1_decode(uint64_t e, unsigned cluster_bits, uint64_t *l2_offset,
                        bool *copied);

/* Decode a host-order refcount table entry: *@block is 0 for no block.
 * Returns 0 or -EBADMSG (reserved bits, misaligned offset). */
int cbt_qcow2_reftable_decode(uint64_t e, unsigned cluster_bits,
                              uint64_t *block);

/* The qcow2 image backend (lib/image/image-qcow2.c), normally reached
 * through cbt_image_open().  Opens @path, refusing unsupported features with a
 * reason in *@why (g_free); a backing file is opened read-only, relative
 * names resolved against @path's directory.  --cache=none (@direct) is not
 * supported.  An image marked corrupt, or whose metadata structures
 * overlap each other, opens only read-only (-ENOTSUP resp. -EBADMSG
 * otherwise).  Returns 0 or -errno. */
struct cbt_image;
int cbt_image_open_qcow2(const char *path, bool read_only, bool direct,
                         struct cbt_image **out, char **why);

/* One link of a backing chain the caller opened itself (cbt restore opens
 * exactly the files its manifest lists, never a name a header gives). */
struct cbt_qcow2_link {
  int fd;                        /* open descriptor of the image file */
  const char *backing_name;      /* what its header must name; NULL: none */
  struct cbt_image *backing;     /* the image to use for it, or NULL */
};

/* Open @path read-only from @link->fd as a qcow2 image whose header must
 * name exactly @link->backing_name as its backing file (format qcow2 or
 * not given), or none if that is NULL; reads past its clusters go to
 * @link->backing, and the name in the header is never opened.  -EBADMSG
 * with the two names in *@why if they disagree.  @link->fd and
 * @link->backing belong to the image from the call on, also on failure. */
int cbt_image_open_qcow2_link(const char *path, const struct cbt_qcow2_link *link,
                              struct cbt_image **out, char **why);

/* Why @img refuses writes since it found itself corrupt (a guest write
 * that would have landed on its metadata), or NULL while it is healthy or
 * not a qcow2 image.  The sentence is owned by the image, valid until it
 * is closed. */
const char *cbt_image_qcow2_corrupt(struct cbt_image *img);

#endif
