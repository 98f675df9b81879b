/* The bitmap file's encoding (bitmap-format.md): header and directory
 * entries between their little-endian on-disk form and the host-order
 * structs of bmfile-internal.h, the CRC32C checksums of a header and of a
 * bitmap's data, and the rules a bitmap's name and flags must follow.
 * Pure functions over byte buffers: no I/O, no locking.
 */
#include <endian.h>
#include <string.h>

#include "cbt/crc32c.h"
#include "bmfile-internal.h"

/* --- encode / decode --------------------------------------------------- */

void
bmf_header_decode(const uint8_t *buf, struct bmf_header *h)
{
  struct bmf_header_disk d;

  memcpy(&d, buf, sizeof d);
  h->version = le32toh(d.version);
  h->header_size = le32toh(d.header_size);
  h->header_crc = le32toh(d.header_crc);
  h->slot = le32toh(d.slot);
  h->generation = le64toh(d.generation);
  h->incompat = le64toh(d.incompat);
  h->compat = le64toh(d.compat);
  h->autoclear = le64toh(d.autoclear);
  h->state_flags = le32toh(d.state_flags);
  h->nb_entries = le32toh(d.nb_entries);
  h->image_size = le64toh(d.image_size);
  h->image_inode = le64toh(d.image_inode);
  memcpy(h->uuid, d.uuid, 16);
  h->dir_offset = le64toh(d.dir_offset);
  h->dir_capacity = le32toh(d.dir_capacity);
  h->dir_entry_size = le32toh(d.dir_entry_size);
  h->dir_crc = le32toh(d.dir_crc);
  h->reserved0 = le32toh(d.reserved0);
  h->reserved1 = le64toh(d.reserved1);
}

void
bmf_header_encode(const struct bmf_header *h, uint8_t *buf)
{
  struct bmf_header_disk d;

  memcpy(d.magic, BMF_MAGIC, 8);
  d.version = htole32(h->version);
  d.header_size = htole32(h->header_size);
  d.header_crc = htole32(h->header_crc);
  d.slot = htole32(h->slot);
  d.generation = htole64(h->generation);
  d.incompat = htole64(h->incompat);
  d.compat = htole64(h->compat);
  d.autoclear = htole64(h->autoclear);
  d.state_flags = htole32(h->state_flags);
  d.nb_entries = htole32(h->nb_entries);
  d.image_size = htole64(h->image_size);
  d.image_inode = htole64(h->image_inode);
  memcpy(d.uuid, h->uuid, 16);
  d.dir_offset = htole64(h->dir_offset);
  d.dir_capacity = htole32(h->dir_capacity);
  d.dir_entry_size = htole32(h->dir_entry_size);
  d.dir_crc = htole32(h->dir_crc);
  d.reserved0 = htole32(h->reserved0);
  d.reserved1 = htole64(h->reserved1);
  memcpy(buf, &d, sizeof d);
}

/* CRC32C of header bytes [0, header_size) with the CRC field as zero. */
uint32_t
bmf_header_crc(const uint8_t *buf, uint32_t header_size)
{
  static const uint8_t zero[4];
  uint32_t crc = cbt_crc32c(0, buf, BMF_CRC_OFFSET);

  crc = cbt_crc32c(crc, zero, 4);
  return cbt_crc32c(crc, buf + BMF_CRC_OFFSET + 4,
                    header_size - BMF_CRC_OFFSET - 4);
}

void
bmf_entry_decode(const uint8_t *buf, struct bmf_entry_disk *d)
{
  memcpy(d, buf, sizeof *d);
  d->flags = le32toh(d->flags);
  d->granularity = le32toh(d->granularity);
  d->data_offset = le64toh(d->data_offset);
  d->data_length = le64toh(d->data_length);
  d->data_crc = le32toh(d->data_crc);
  d->reserved0 = le32toh(d->reserved0);
  d->create_time = le64toh(d->create_time);
  d->checkpoint = le64toh(d->checkpoint);
}

/* The two-level data checksum (bitmap-format.md, data_crc32c). */
uint32_t
bmf_data_crc(const uint32_t *page_crc, uint64_t npages)
{
  uint8_t buf[256 * 4];
  uint32_t crc = 0;

  for (uint64_t i = 0; i < npages; ) {
    size_t n = 0;

    for (; n < 256 && i < npages; n++, i++) {
      uint32_t le = htole32(page_crc[i]);

      memcpy(buf + n * 4, &le, 4);
    }
    crc = cbt_crc32c(crc, buf, n * 4);
  }
  return crc;
}

void
bmf_entry_encode(const struct bmf_entry *e, uint8_t *buf)
{
  struct bmf_entry_disk d;

  memset(&d, 0, sizeof d);
  memcpy(d.name, e->name, sizeof e->name);
  d.flags = htole32(e->flags);
  d.granularity = htole32(e->granularity);
  d.data_offset = htole64(e->data_offset);
  d.data_length = htole64(e->data_length);
  d.data_crc = htole32(bmf_data_crc(e->page_crc, e->data_pages));
  d.create_time = htole64(e->create_time);
  d.checkpoint = htole64(e->checkpoint);
  memcpy(buf, &d, sizeof d);
}

/* --- names and flags --------------------------------------------------- */

/* Name rules of bitmap-format.md: 1..63 printable ASCII bytes. */
bool
bmf_name_ok(const char *name)
{
  size_t len = strlen(name);

  if (len == 0 || len > CBT_BMF_NAME_MAX)
    return false;
  for (size_t i = 0; i < len; i++)
    if (name[i] < 0x20 || name[i] > 0x7e)
      return false;
  return true;
}

bool
bmf_flags_ok(uint32_t flags)
{
  return !(flags & ~BMF_FLAGS_KNOWN) &&
         (flags & (CBT_BMF_ACTIVE | CBT_BMF_FROZEN)) !=
           (CBT_BMF_ACTIVE | CBT_BMF_FROZEN);
}
