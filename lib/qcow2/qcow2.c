/* qcow2 format layer: decode and validate the header, its extensions and
 * table entries (spec: QEMU docs/interop/qcow2.txt; API: cbt/qcow2.h).
 *
 * Pure functions over byte buffers, no I/O.  The header is decoded field
 * by field from big-endian bytes (never by casting the buffer), then
 * checked in this order: magic, version, header length, cluster size,
 * extensions (so that unknown incompatible bits can be named from the
 * image's feature name table), feature bits and the refcount width, and
 * finally the table offsets and sizes against each other and the file.
 * Unsupported-but-valid images get -ENOTSUP, broken ones -EBADMSG.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <string.h>

#include <glib.h>

#include "cbt/qcow2.h"
#include "cbt/util.h"

uint64_t
cbt_qcow2_l1_entries_needed(uint64_t size, unsigned cluster_bits)
{
  /* One L1 entry maps cluster_size / 8 clusters. */
  unsigned shift = cluster_bits + (cluster_bits - 3);
  uint64_t span;

  if (shift >= 64)
    return 1;
  span = UINT64_C(1) << shift;
  return size / span + (size % span != 0);
}

/* Name of incompatible bit @bit from the feature name table in
 * [@tab, @tab + @len), or NULL. */
static char *
feature_name(const uint8_t *tab, size_t len, unsigned bit)
{
  for (size_t i = 0; tab && i + 48 <= len; i += 48) {
    if (tab[i] == 0 && tab[i + 1] == bit)
      return g_strndup((const char *)tab + i + 2, 46);
  }
  return NULL;
}

static int
check_features(const struct cbt_qcow2_info *h, const uint8_t *names,
               size_t names_len, unsigned flags, char **why)
{
  uint64_t in = h->incompatible_features;
  const uint64_t known = CBT_QCOW2_INCOMPAT_DIRTY | CBT_QCOW2_INCOMPAT_CORRUPT |
                         CBT_QCOW2_INCOMPAT_DATA_FILE |
                         CBT_QCOW2_INCOMPAT_COMPRESSION | CBT_QCOW2_INCOMPAT_EXTL2;

  if (in & ~known) {
    unsigned bit = (unsigned)__builtin_ctzll(in & ~known);
    g_autofree char *name = feature_name(names, names_len, bit);

    return cbt_fail(why, -ENOTSUP, "unknown incompatible feature bit %u%s%s%s "
                "is not supported", bit, name ? " (" : "", name ? name : "",
                name ? ")" : "");
  }
  if ((in & CBT_QCOW2_INCOMPAT_CORRUPT) && !(flags & CBT_QCOW2_DECODE_ALLOW_CORRUPT))
    return cbt_fail(why, -ENOTSUP, "image is marked corrupt (incompatible "
                "feature 'corrupt' bit set): repair it with qemu-img check -r all");
  if (in & CBT_QCOW2_INCOMPAT_DIRTY)
    return cbt_fail(why, -ENOTSUP, "image is dirty (incompatible feature 'dirty' "
                "bit set: lazy refcounts need repair): run qemu-img check -r all");
  if (in & CBT_QCOW2_INCOMPAT_DATA_FILE)
    return cbt_fail(why, -ENOTSUP, "external data file (incompatible feature "
                "'external data file') is not supported");
  if (in & CBT_QCOW2_INCOMPAT_EXTL2)
    return cbt_fail(why, -ENOTSUP, "extended L2 entries (incompatible feature "
                "'extended L2 entries') are not supported");
  if (in & CBT_QCOW2_INCOMPAT_COMPRESSION)
    return cbt_fail(why, -ENOTSUP, "compression type other than zlib "
                "(incompatible feature 'compression type') is not supported");
  return 0;
}

/* Walk the header extensions in [@pos, @end): record what we use, check
 * every length.  *@names/@names_len point into @p at the feature name
 * table, if any. */
static int
parse_extensions(const uint8_t *p, size_t pos, size_t end,
                 struct cbt_qcow2_info *h, const uint8_t **names,
                 size_t *names_len, char **why)
{
  while (pos + 8 <= end) {
    uint32_t type = cbt_get_be32(p + pos);
    uint32_t len = cbt_get_be32(p + pos + 4);
    size_t data = pos + 8;

    if (type == CBT_QCOW2_EXT_END)
      return 0;
    if (len > end - data)
      return cbt_fail(why, -EBADMSG, "header extension 0x%08" PRIx32 " at byte %zu: "
                  "length %" PRIu32 " runs past the first cluster", type, pos, len);
    switch (type) {
    case CBT_QCOW2_EXT_BACKING_FMT:
      if (len >= sizeof h->backing_format || memchr(p + data, 0, len))
        return cbt_fail(why, -EBADMSG, "backing file format extension: bad length "
                    "%" PRIu32 " or embedded NUL", len);
      memcpy(h->backing_format, p + data, len);
      h->backing_format[len] = 0;
      break;
    case CBT_QCOW2_EXT_FEATURE_NAMES:
      *names = p + data;
      *names_len = len;
      break;
    case CBT_QCOW2_EXT_BITMAPS:
      h->has_bitmaps = true;
      break;
    default:
      break;                       /* unknown or unused: ignore */
    }
    /* Padding to the next multiple of 8 (len <= end - data, no overflow). */
    pos = data + len;
    pos += (8 - pos % 8) % 8;
  }
  return 0;
}

int
cbt_qcow2_header_decode(const void *buf, size_t len, uint64_t file_size,
                        struct cbt_qcow2_info *out, char **why)
{
  return cbt_qcow2_header_decode_flags(buf, len, file_size, 0, out, why);
}

int
cbt_qcow2_header_decode_flags(const void *buf, size_t len, uint64_t file_size,
                              unsigned flags, struct cbt_qcow2_info *out,
                              char **why)
{
  const uint8_t *p = buf;
  struct cbt_qcow2_info h;
  uint32_t crypt;
  uint64_t csize, need, end, bf_off;
  uint32_t bf_size;
  const uint8_t *names = NULL;
  size_t names_len = 0;
  int r;

  memset(&h, 0, sizeof h);
  if (len < 4 || cbt_get_be32(p) != CBT_QCOW2_MAGIC)
    return cbt_fail(why, -EINVAL, "not a qcow2 image (bad magic)");
  if (len < CBT_QCOW2_V2_HEADER_LEN)
    return cbt_fail(why, -EBADMSG, "truncated qcow2 header (%zu bytes)", len);
  h.version = cbt_get_be32(p + 4);
  if (h.version != 2 && h.version != 3)
    return cbt_fail(why, -ENOTSUP, "qcow2 version %" PRIu32 " is not supported "
                "(only 2 and 3)", h.version);
  bf_off = cbt_get_be64(p + 8);
  bf_size = cbt_get_be32(p + 16);
  h.cluster_bits = cbt_get_be32(p + 20);
  h.size = cbt_get_be64(p + 24);
  crypt = cbt_get_be32(p + 32);
  h.l1_size = cbt_get_be32(p + 36);
  h.l1_table_offset = cbt_get_be64(p + 40);
  h.refcount_table_offset = cbt_get_be64(p + 48);
  h.refcount_table_clusters = cbt_get_be32(p + 56);
  h.nb_snapshots = cbt_get_be32(p + 60);
  h.snapshots_offset = cbt_get_be64(p + 64);

  if (h.cluster_bits < CBT_QCOW2_MIN_CLUSTER_BITS)
    return cbt_fail(why, -EBADMSG, "cluster_bits %" PRIu32 " is below 9", h.cluster_bits);
  if (h.cluster_bits > CBT_QCOW2_MAX_CLUSTER_BITS)
    return cbt_fail(why, -ENOTSUP, "cluster size 2^%" PRIu32 " is not supported "
                "(512 bytes to 2 MiB)", h.cluster_bits);
  csize = h.cluster_size = UINT64_C(1) << h.cluster_bits;

  if (h.version == 2) {
    h.refcount_order = 4;
    h.header_length = CBT_QCOW2_V2_HEADER_LEN;
  } else {
    if (len < CBT_QCOW2_V3_HEADER_LEN)
      return cbt_fail(why, -EBADMSG, "truncated qcow2 version 3 header (%zu bytes)", len);
    h.incompatible_features = cbt_get_be64(p + 72);
    h.compatible_features = cbt_get_be64(p + 80);
    h.autoclear_features = cbt_get_be64(p + 88);
    h.refcount_order = cbt_get_be32(p + 96);
    h.header_length = cbt_get_be32(p + 100);
    if (h.header_length < CBT_QCOW2_V3_HEADER_LEN || h.header_length % 8 != 0 ||
        h.header_length > csize)
      return cbt_fail(why, -EBADMSG, "bad header_length %" PRIu32, h.header_length);
    if (h.header_length > len)
      return cbt_fail(why, -EBADMSG, "truncated qcow2 header (header_length %" PRIu32
                  ", %zu bytes present)", h.header_length, len);
  }

  /* Extensions live in the rest of the first cluster. */
  end = len < csize ? len : csize;
  r = parse_extensions(p, h.header_length, (size_t)end, &h, &names, &names_len, why);
  if (r < 0)
    return r;

  if (crypt != 0)
    return cbt_fail(why, -ENOTSUP, "encryption (crypt_method %" PRIu32 ", %s) is "
                "not supported", crypt, crypt == 1 ? "AES" : crypt == 2 ? "LUKS" :
                "unknown");
  r = check_features(&h, names, names_len, flags, why);
  if (r < 0)
    return r;
  if ((h.incompatible_features & CBT_QCOW2_INCOMPAT_COMPRESSION) == 0 &&
      h.header_length > CBT_QCOW2_OFF_COMPRESSION && p[CBT_QCOW2_OFF_COMPRESSION] != 0)
    return cbt_fail(why, -EBADMSG, "compression_type %u without the compression "
                "type feature bit", p[CBT_QCOW2_OFF_COMPRESSION]);
  if (h.refcount_order > 6)
    return cbt_fail(why, -EBADMSG, "bad refcount_order %" PRIu32, h.refcount_order);
  if (h.refcount_order != 4)
    return cbt_fail(why, -ENOTSUP, "refcount width %u bits is not supported "
                "(only refcount_bits=16)", 1u << h.refcount_order);

  /* Sizes and offsets: everything cluster aligned and inside the file. */
  need = cbt_qcow2_l1_entries_needed(h.size, h.cluster_bits);
  if (h.size > (UINT64_C(1) << 62) || need > CBT_QCOW2_MAX_L1_ENTRIES)
    return cbt_fail(why, -ENOTSUP, "virtual size %" PRIu64 " is too large", h.size);
  if (h.l1_size > CBT_QCOW2_MAX_L1_ENTRIES)
    return cbt_fail(why, -EBADMSG, "L1 table of %" PRIu32 " entries is too large",
                h.l1_size);
  if (h.l1_size < need)
    return cbt_fail(why, -EBADMSG, "L1 table of %" PRIu32 " entries is too small "
                "for a virtual size of %" PRIu64 " (needs %" PRIu64 ")",
                h.l1_size, h.size, need);
  if (h.l1_size > 0 &&
      (h.l1_table_offset == 0 || h.l1_table_offset % csize != 0 ||
       h.l1_table_offset > file_size ||
       file_size - h.l1_table_offset < (uint64_t)h.l1_size * 8))
    return cbt_fail(why, -EBADMSG, "bad l1_table_offset 0x%" PRIx64 " (misaligned "
                "or outside the file)", h.l1_table_offset);
  if (h.refcount_table_clusters == 0 ||
      (uint64_t)h.refcount_table_clusters * csize > CBT_QCOW2_MAX_REFTABLE_BYTES)
    return cbt_fail(why, -EBADMSG, "bad refcount_table_clusters %" PRIu32,
                h.refcount_table_clusters);
  if (h.refcount_table_offset == 0 || h.refcount_table_offset % csize != 0 ||
      h.refcount_table_offset > file_size ||
      file_size - h.refcount_table_offset < (uint64_t)h.refcount_table_clusters * csize)
    return cbt_fail(why, -EBADMSG, "bad refcount_table_offset 0x%" PRIx64
                " (misaligned or outside the file)", h.refcount_table_offset);
  if (h.nb_snapshots > 0 &&
      (h.snapshots_offset == 0 || h.snapshots_offset % csize != 0 ||
       h.snapshots_offset >= file_size))
    return cbt_fail(why, -EBADMSG, "bad snapshots_offset 0x%" PRIx64, h.snapshots_offset);

  if (bf_off != 0) {
    if (bf_size == 0 || bf_size > CBT_QCOW2_MAX_BACKING_NAME)
      return cbt_fail(why, -EBADMSG, "bad backing_file_size %" PRIu32, bf_size);
    if (bf_off > end || end - bf_off < bf_size)
      return cbt_fail(why, -EBADMSG, "backing file name at byte %" PRIu64 " runs past "
                  "the first cluster", bf_off);
    if (bf_off < h.header_length)
      return cbt_fail(why, -EBADMSG, "backing file name overlaps the header");
    if (memchr(p + bf_off, 0, bf_size))
      return cbt_fail(why, -EBADMSG, "backing file name contains a NUL byte");
    memcpy(h.backing_file, p + bf_off, bf_size);
    h.backing_file[bf_size] = 0;
  }
  *out = h;
  return 0;
}

int
cbt_qcow2_l2_decode(uint64_t e, unsigned cluster_bits, unsigned version,
                    struct cbt_qcow2_map *out)
{
  const uint64_t reserved = UINT64_C(0x3f000000000001fe);   /* 1..8, 56..61 */
  uint64_t csize = UINT64_C(1) << cluster_bits;

  memset(out, 0, sizeof *out);
  if (e & CBT_QCOW2_COMPRESSED_BIT) {
    unsigned x = 62 - (cluster_bits - 8);
    uint64_t host = e & ((UINT64_C(1) << x) - 1);
    uint64_t sectors = (e & ~(CBT_QCOW2_COPIED | CBT_QCOW2_COMPRESSED_BIT)) >> x;

    if ((e & CBT_QCOW2_COPIED) || (host >> 56) != 0 || host == 0)
      return -EBADMSG;
    out->type = CBT_QCOW2_COMPRESSED;
    out->host_offset = host;
    out->comp_len = (sectors + 1) * 512 - (host & 511);
    return 0;
  }
  if ((e & reserved) || (version < 3 && (e & CBT_QCOW2_ZERO_BIT)))
    return -EBADMSG;
  out->host_offset = e & CBT_QCOW2_OFFSET_MASK;
  out->copied = (e & CBT_QCOW2_COPIED) != 0;
  if (out->host_offset % csize != 0)
    return -EBADMSG;
  if (out->host_offset == 0) {
    if (out->copied)
      return -EBADMSG;            /* offset 0 is only valid with a data file */
    out->type = (e & CBT_QCOW2_ZERO_BIT) ? CBT_QCOW2_ZERO_PLAIN : CBT_QCOW2_UNALLOCATED;
    return 0;
  }
  out->type = (e & CBT_QCOW2_ZERO_BIT) ? CBT_QCOW2_ZERO_ALLOC : CBT_QCOW2_NORMAL;
  return 0;
}

uint64_t
cbt_qcow2_l2_encode(uint64_t host, bool zero)
{
  return (host & CBT_QCOW2_OFFSET_MASK) | (host ? CBT_QCOW2_COPIED : 0) |
         (zero ? CBT_QCOW2_ZERO_BIT : 0);
}

int
cbt_qcow2_l1_decode(uint64_t e, unsigned cluster_bits, uint64_t *l2_offset,
                    bool *copied)
{
  const uint64_t reserved = UINT64_C(0x7f000000000001ff);   /* 0..8, 56..62 */
  uint64_t off = e & CBT_QCOW2_OFFSET_MASK;

  if ((e & reserved) || off % (UINT64_C(1) << cluster_bits) != 0)
    return -EBADMSG;
  *l2_offset = off;
  *copied = (e & CBT_QCOW2_COPIED) != 0;
  return 0;
}

int
cbt_qcow2_reftable_decode(uint64_t e, unsigned cluster_bits, uint64_t *block)
{
  if ((e & 0x1ff) || e % (UINT64_C(1) << cluster_bits) != 0)
    return -EBADMSG;
  *block = e;
  return 0;
}
