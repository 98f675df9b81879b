/* The persistent dirty bitmap file (API: cbt/bitmap-file.h; format:
 * bitmap-format.md, read that first): the handle, its in-memory
 * entries, and the queries.  The other files, and the in-memory
 * layout and locking, are described in bmfile-internal.h.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>

#include "bmfile-internal.h"

/* --- entries ----------------------------------------------------------- */

uint32_t
bmf_page_bytes(const struct bmf_entry *e, uint64_t page)
{
  uint64_t left = e->data_length - page * BMF_PAGE;

  return left < BMF_PAGE ? (uint32_t)left : BMF_PAGE;
}

void
bmf_entry_free(struct bmf_entry *e)
{
  if (!e)
    return;
  cbt_bitmap_destroy(&e->bm);
  g_free(e->page_crc);
  g_free(e);
}

/* A new in-memory entry with all bits clear and its bitmap set up for
 * @image_size; its page_crc array is allocated but not filled. */
int
bmf_entry_new(const char *name, uint32_t flags, uint32_t gran,
              uint64_t image_size, struct bmf_entry **out)
{
  struct bmf_entry *e = g_new0(struct bmf_entry, 1);
  int r;

  g_strlcpy(e->name, name, sizeof e->name);
  e->flags = flags;
  e->granularity = gran;
  e->data_length = data_length_for(image_size, gran);
  r = cbt_bitmap_init(&e->bm, image_size, gran);
  if (r < 0) {
    bmf_entry_free(e);
    return r;
  }
  e->data_pages = e->bm.npages;
  e->page_crc = g_try_new0(uint32_t, e->data_pages);
  if (!e->page_crc) {
    bmf_entry_free(e);
    return -ENOMEM;
  }
  e->data_ok = true;
  *out = e;
  return 0;
}

void
bmf_mark_all_pages(struct bmf_entry *e)
{
  for (uint64_t p = 0; p < e->data_pages; p++)
    cbt_bitmap_mark_page(&e->bm, p);
}

/* --- the handle -------------------------------------------------------- */

void
bmf_entries_free(struct cbt_bmfile *f)
{
  for (unsigned i = 0; i < f->nentries; i++)
    bmf_entry_free(f->entries[i]);
  g_clear_pointer(&f->entries, g_free);
  f->nentries = 0;
}

void
cbt_bmfile_free(cbt_bmfile *f)
{
  if (!f)
    return;
  bmf_entries_free(f);
  if (f->fd >= 0)
    close(f->fd);
  g_free(f->path);
  g_free(f->hdr_ext);
  g_free(f->recovery);
  g_mutex_clear(&f->lock);
  g_free(f);
}

cbt_bmfile *
bmf_handle_new(const char *path, int fd, bool writable)
{
  cbt_bmfile *f = g_new0(cbt_bmfile, 1);

  g_mutex_init(&f->lock);
  f->path = g_strdup(path);
  f->fd = fd;
  f->writable = writable;
  return f;
}

/* --- queries ----------------------------------------------------------- */

bool
cbt_bmfile_found_crash_safe(const cbt_bmfile *f)
{
  return f->found_crash_safe;
}

bool
cbt_bmfile_entry_trusted(const cbt_bmfile *f, unsigned idx, const char **why)
{
  const char *dummy;

  if (!why)
    why = &dummy;
  if (idx >= f->nentries) {
    *why = "no such bitmap";
    return false;
  }
  if (f->entries[idx]->flags & CBT_BMF_INCONSISTENT) {
    *why = "INCONSISTENT: an earlier run did not shut down cleanly (not in "
           "crash-safe mode); untrusted until a full backup resets it";
    return false;
  }
  if (f->writable) {
    /* A writer marked every entry INCONSISTENT at open unless the file
     * was clean or crash-safe (rule 1); entries it adds start exact. */
    *why = f->found_clean ? "clean shutdown" : f->found_crash_safe
           ? "not clean, but written in crash-safe mode: every bit was durable "
             "before the write it covers" : "reset since the unclean shutdown";
    return true;
  }
  if (f->found_clean) {
    *why = f->entries[idx]->data_ok ? "clean shutdown"
           : "clean shutdown, but the data does not match its checksum";
    return f->entries[idx]->data_ok;
  }
  if (f->found_crash_safe) {
    *why = "not clean, but written in crash-safe mode: every bit was durable "
           "before the write it covers";
    return true;
  }
  *why = f->recovery ? "not clean, and the newest metadata copy was unusable"
                     : "not clean (in use, or the daemon crashed) and not written "
                       "in crash-safe mode";
  return false;
}

uint32_t
cbt_bmfile_entry_data_crc(const cbt_bmfile *f, unsigned idx)
{
  return idx < f->nentries ? f->entries[idx]->data_crc : 0;
}

uint32_t
cbt_bmfile_header_crc(const cbt_bmfile *f)
{
  return f->hdr.header_crc;
}

uint32_t
cbt_bmfile_dir_crc(const cbt_bmfile *f)
{
  return f->hdr.dir_crc;
}

uint32_t
cbt_bmfile_version(const cbt_bmfile *f)
{
  return f->hdr.version;
}

uint64_t
cbt_bmfile_entry_checkpoint(const cbt_bmfile *f, unsigned idx)
{
  return idx < f->nentries ? f->entries[idx]->checkpoint : 0;
}

int
cbt_bmfile_find(const cbt_bmfile *f, const char *name)
{
  for (unsigned i = 0; i < f->nentries; i++)
    if (strcmp(f->entries[i]->name, name) == 0)
      return (int)i;
  return -ENOENT;
}

const char *
cbt_bmfile_path(const cbt_bmfile *f)
{
  return f->path;
}

void
cbt_bmfile_uuid(const cbt_bmfile *f, uint8_t uuid[16])
{
  memcpy(uuid, f->hdr.uuid, 16);
}

bool
cbt_bmfile_found_clean(const cbt_bmfile *f)
{
  return f->found_clean;
}

bool
cbt_bmfile_clean(const cbt_bmfile *f)
{
  return f->disk_clean;
}

const char *
cbt_bmfile_recovery_note(const cbt_bmfile *f)
{
  return f->recovery;
}

uint64_t
cbt_bmfile_image_size(const cbt_bmfile *f)
{
  return f->hdr.image_size;
}

uint64_t
cbt_bmfile_image_inode(const cbt_bmfile *f)
{
  return f->hdr.image_inode;
}

uint64_t
cbt_bmfile_generation(const cbt_bmfile *f)
{
  return f->hdr.generation;
}

unsigned
cbt_bmfile_entry_count(const cbt_bmfile *f)
{
  return f->nentries;
}

const char *
cbt_bmfile_entry_name(const cbt_bmfile *f, unsigned idx)
{
  return idx < f->nentries ? f->entries[idx]->name : NULL;
}

uint32_t
cbt_bmfile_entry_flags(const cbt_bmfile *f, unsigned idx)
{
  return idx < f->nentries ? f->entries[idx]->flags : 0;
}

bool
cbt_bmfile_entry_data_ok(const cbt_bmfile *f, unsigned idx)
{
  return idx < f->nentries && f->entries[idx]->data_ok;
}

struct cbt_bitmap *
cbt_bmfile_entry_bitmap(cbt_bmfile *f, unsigned idx)
{
  return idx < f->nentries ? &f->entries[idx]->bm : NULL;
}
