/* The map of a backup chain: for every guest cluster of a backup, which
 * file of its chain holds the data, and where, or that it reads as zeros.
 *
 * cbt restore streams each file of the chain front to back (so the
 * manifest's checksums can be checked as the bytes pass) and writes each
 * data cluster to its guest offset; for that it needs the inverse of the
 * qcow2 mapping: per file, the runs of host clusters that are visible in
 * the backup (not hidden by a newer file of the chain), sorted by host
 * offset.
 *
 * The chain is the manifest's (as in lib/image/image-qcow2.c's link mode): each
 * file is opened as the manifest lists it (repo_open_file), must have the
 * manifest's size, and its header must name the manifest's backing file
 * (format qcow2 or none) or none for the full backup; the backing names in
 * headers are never followed.  The files must have the manifest's cluster
 * size, all the same, and the virtual size (rounded to 512 as qemu does).
 * Everything read from a file is validated before use: the header by
 * lib/qcow2/qcow2.c, every L1 and L2 entry by its decoder, and every table and
 * data cluster must lie inside the file.  A file that breaks any of it is
 * CLI_EXIT_DAMAGED.  Compressed clusters are refused the same way: cbt
 * backup never writes them.
 *
 * Building the map reads each file's L1 and L2 tables once, newest file
 * first: the newest entry that is not "unallocated" decides a cluster.
 * The files are read through repo-read.c, from a directory or from S3.
 * A file's L2 tables are read in a few large reads, not one per table:
 * their offsets (from the L1 table) are sorted and gathered into ranges
 * that bridge gaps of up to TABLE_GAP bytes and hold at most TABLE_BATCH
 * bytes of tables at a time; cbt backup writes the tables together at the
 * end of the file, so a file's tables are usually one or two ranges, and
 * on S3 those ranges are fetched in parallel (pieces of TABLE_GET).  The
 * header is one read of its first cluster.
 * Memory: one byte per guest cluster while building, plus 24 bytes per
 * run of visible clusters (a full backup is mostly one run per table).
 *
 * The map trusts what it read only as far as the checks above go: a
 * table entry changed into another valid one (a flipped bit in an L2
 * entry) still maps.  So each file records the byte ranges the map was
 * built from (its first cluster, the L1 table, each L2 table), for a
 * reader that checks them against the manifest's checksums (chain-read.c
 * does, before it serves anything; cbt restore checks every byte anyway).
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/qcow2.h"
#include "cbt/qcow2-writer.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "repo.h"

enum { UNDECIDED = 0, DECIDED = 1 };

#define TABLE_GAP   (UINT64_C(1) << 20)    /* bytes read over between tables */
#define TABLE_BATCH (UINT64_C(64) << 20)   /* bytes of tables read at once */
#define TABLE_GET   (UINT64_C(8) << 20)    /* bytes per GET of tables on S3 */

void
chain_map_free(chain_map *m)
{
  if (!m)
    return;
  for (unsigned i = 0; i < m->nfiles; i++) {
    struct chain_file *f = &m->files[i];

    rfile_close(f->rf);
    if (f->runs)
      g_array_unref(f->runs);
    if (f->meta)
      g_array_unref(f->meta);
  }
  g_free(m->files);
  if (m->zeros)
    g_array_unref(m->zeros);
  g_free(m);
}

/* Record that the map read [@off, @off + @len) of @f; a range that
 * continues the last one extends it. */
static void
add_meta(struct chain_file *f, uint64_t off, uint64_t len)
{
  struct stream_range *last = f->meta->len ?
    &g_array_index(f->meta, struct stream_range, f->meta->len - 1) : NULL;

  if (last && last->off + last->len == off) {
    last->len += len;
  } else {
    struct stream_range r = { off, len };

    g_array_append_val(f->meta, r);
  }
}

static int
cmp_run(const void *a, const void *b)
{
  const struct chain_run *x = a, *y = b;

  return x->host < y->host ? -1 : x->host > y->host;
}

/* Open @f (the manifest's @e) and check its header against the chain. */
static bool
open_file(repo *r, const repo_backup *e, const repo_backup *target, uint64_t cs,
          struct chain_file *f, struct cbt_qcow2_info *info, GError **error)
{
  g_autofree uint8_t *buf = NULL;
  g_autofree char *why = NULL;
  uint64_t fsize;
  size_t n;
  int rc = 0;

  f->size = e->file_size;
  f->backup = e;
  f->meta = g_array_new(FALSE, FALSE, sizeof(struct stream_range));
  f->rf = rfile_open(r, e, error);
  if (!f->rf) {
    g_prefix_error(error, "reading %s: ", target->file);
    return false;
  }
  f->path = f->rf->name;
  fsize = f->rf->size;
  /* The header, its extensions and the backing name are in the first
   * cluster (the manifest's size; a file with another is refused below). */
  n = (size_t)MIN(fsize, cs);
  buf = g_malloc(MAX(n, 1));
  if (!rfile_pread(f->rf, buf, n, 0, error))
    return false;
  add_meta(f, 0, n);
  rc = cbt_qcow2_header_decode(buf, n, fsize, info, &why);
  if (rc == 0 && !e->backing && info->backing_file[0])
    rc = cbt_fail(&why, -EBADMSG, "names backing file '%s', but its chain has none",
                  info->backing_file);
  if (rc == 0 && e->backing && strcmp(info->backing_file, e->backing) != 0)
    rc = cbt_fail(&why, -EBADMSG, "names backing file '%s', but its chain has '%s'",
                  info->backing_file[0] ? info->backing_file
                  : "(none)", e->backing);
  if (rc == 0 && info->backing_format[0] && strcmp(info->backing_format, "qcow2") != 0)
    rc = cbt_fail(&why, -EBADMSG, "names backing format '%s' for '%s', but its "
                  "chain is qcow2", info->backing_format,
                  info->backing_file);
  if (rc == 0 && fsize != e->file_size)
    rc = cbt_fail(&why, -EBADMSG, "%" PRIu64 " bytes, the manifest says %" PRIu64,
                  fsize, e->file_size);
  if (rc == 0 && info->cluster_size != cs)
    rc = cbt_fail(&why, -EBADMSG, "cluster size %" PRIu64 ", the manifest says %"
                  PRIu64, info->cluster_size, cs);
  if (rc == 0 && info->size != (target->image_size + 511) / 512 * 512)
    rc = cbt_fail(&why, -EBADMSG, "virtual size %" PRIu64 ", the manifest says %"
                  PRIu64, info->size, target->image_size);
  if (rc < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: %s (in the manifest's chain of "
                "%s; not restoring)", f->path, why ? why : g_strerror(-rc), target->file);
    return false;
  }
  return true;
}

/* One L2 table to read: its L1 index and file offset. */
struct table {
  uint64_t l1i, off;
};

static int
cmp_table(const void *a, const void *b)
{
  const struct table *x = a, *y = b;

  return x->off < y->off ? -1 : x->off > y->off;
}

/* Decide the clusters of L2 table @l1i (at @l2, big-endian) that no newer
 * file decided. */
static bool
map_table(chain_map *m, struct chain_file *f, const struct cbt_qcow2_info *info,
          uint64_t l1i, const uint64_t *l2, uint8_t *state, GError **error)
{
  const uint64_t cs = m->cluster_size;
  const uint64_t per_l2 = cs / 8;

  for (uint64_t k = 0; k < per_l2; k++) {
    uint64_t vcl = l1i * per_l2 + k;
    struct cbt_qcow2_map mp;

    if (vcl >= m->nclusters)
      break;
    if (state[vcl] != UNDECIDED)
      continue;
    if (cbt_qcow2_l2_decode(be64toh(l2[k]), info->cluster_bits, info->version, &mp) < 0 ||
        mp.type == CBT_QCOW2_COMPRESSED ||
        (mp.type == CBT_QCOW2_NORMAL && (mp.host_offset > f->size ||
                                         f->size - mp.host_offset < cs))) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: the L2 entry of guest offset %"
                  PRIu64 " is %s (not restoring)", f->path, vcl * cs,
                  mp.type == CBT_QCOW2_COMPRESSED ? "compressed, which cbt backup "
                  "never writes" : "corrupt");
      return false;
    }
    if (mp.type == CBT_QCOW2_UNALLOCATED)
      continue;
    state[vcl] = DECIDED;
    if (mp.type == CBT_QCOW2_NORMAL) {
      struct chain_run *last = f->runs->len ?
        &g_array_index(f->runs, struct chain_run, f->runs->len - 1) : NULL;

      if (last && last->guest + last->clusters == vcl &&
          last->host + last->clusters * cs == mp.host_offset) {
        last->clusters++;
      } else {
        struct chain_run run = { mp.host_offset, vcl, 1 };

        g_array_append_val(f->runs, run);
      }
    }
  }
  return true;
}

/* Read tables [@t0, @t1) of @tabs (sorted by offset, all inside the file)
 * as one span of the file, in pieces of TABLE_GET read in parallel on S3,
 * and map each. */
static bool
map_span(chain_map *m, struct chain_file *f, const struct cbt_qcow2_info *info,
         const struct table *tabs, guint t0, guint t1, uint8_t *state, GError **error)
{
  const uint64_t cs = m->cluster_size;
  const uint64_t start = tabs[t0].off, len = tabs[t1 - 1].off + cs - start;
  const uint64_t piece = rfile_is_s3(f->rf) ? TABLE_GET : len;
  const unsigned n = (unsigned)((len + piece - 1) / piece);
  g_autofree uint8_t *buf = g_malloc(len);
  g_autofree struct rfile_range *rr = g_new(struct rfile_range, n);

  for (unsigned i = 0; i < n; i++) {
    rr[i].off = start + i * piece;
    rr[i].len = (size_t)MIN(piece, len - i * piece);
    rr[i].buf = buf + i * piece;
  }
  if (!rfile_read_ranges(f->rf, rr, n, error))
    return false;
  for (guint t = t0; t < t1; t++)
    /* Tables are cluster aligned in the file, so in @buf (g_malloc'd). */
    if (!map_table(m, f, info, tabs[t].l1i,
                   (const uint64_t *)(const void *)(buf + (tabs[t].off - start)), state,
                   error))
      return false;
  return true;
}

/* Read file @fi's tables and decide the clusters no newer file decided. */
static bool
map_file(chain_map *m, unsigned fi, const struct cbt_qcow2_info *info, uint8_t *state,
         GError **error)
{
  struct chain_file *f = &m->files[fi];
  const uint64_t cs = m->cluster_size;
  const uint64_t per_l2 = cs / 8;
  const uint64_t nl1 = MIN((uint64_t)info->l1_size, (m->nclusters + per_l2 - 1) / per_l2);
  g_autofree uint64_t *l1 = g_new(uint64_t, MAX(nl1, 1));
  g_autoptr(GArray) tabs = g_array_new(FALSE, FALSE, sizeof(struct table));
  const struct table *t;
  guint t0 = 0;

  f->runs = g_array_new(FALSE, FALSE, sizeof(struct chain_run));
  if (nl1 > 0 && !rfile_pread(f->rf, l1, nl1 * 8, info->l1_table_offset, error))
    return false;
  for (uint64_t i = 0; i < nl1; i++) {
    struct table tb = { i, 0 };
    bool copied;

    if (cbt_qcow2_l1_decode(be64toh(l1[i]), info->cluster_bits, &tb.off, &copied) < 0 ||
        (tb.off && (tb.off > f->size || f->size - tb.off < cs))) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: L1 entry %" PRIu64 " is "
                  "corrupt (not restoring)", f->path, i);
      return false;
    }
    if (tb.off)
      g_array_append_val(tabs, tb);
  }
  g_array_sort(tabs, cmp_table);
  t = (const struct table *)(void *)tabs->data;
  /* In file order: the L1 table among the L2 tables where it lies. */
  {
    bool l1_done = nl1 == 0;

    for (guint i = 0; i < tabs->len; i++) {
      if (!l1_done && info->l1_table_offset <= t[i].off) {
        add_meta(f, info->l1_table_offset, nl1 * 8);
        l1_done = true;
      }
      add_meta(f, t[i].off, cs);
    }
    if (!l1_done)
      add_meta(f, info->l1_table_offset, nl1 * 8);
  }
  /* Spans of tables no further apart than TABLE_GAP, at most TABLE_BATCH. */
  for (guint i = 1; i <= tabs->len; i++)
    if (i == tabs->len || t[i].off - t[i - 1].off > cs + TABLE_GAP ||
        t[i].off + cs - t[t0].off > TABLE_BATCH) {
      if (!map_span(m, f, info, t, t0, i, state, error))
        return false;
      t0 = i;
    }
  g_array_sort(f->runs, cmp_run);
  for (guint i = 0; i < f->runs->len; i++)
    f->data_bytes += g_array_index(f->runs, struct chain_run, i).clusters * cs;
  return true;
}

bool
chain_map_build(repo *r, const repo_backup *b, chain_map **out, GError **error)
{
  g_autoptr(chain_map) m = g_new0(chain_map, 1);
  g_autofree uint8_t *state = NULL;
  guint first = repo_chain_start(r, b);
  guint last = first;
  struct cbt_qcow2_info *infos;

  while (g_ptr_array_index(r->backups, last) != b)
    last++;
  m->nfiles = last - first + 1;
  m->files = g_new0(struct chain_file, m->nfiles);
  m->cluster_size = b->cluster_size;
  m->image_size = b->image_size;
  if (m->cluster_size < 512 || m->cluster_size > CBT_QCOW2_WRITER_MAX_CLUSTER_SIZE ||
      (m->cluster_size & (m->cluster_size - 1))) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: the manifest's cluster size %"
                PRIu64 " is not a qcow2 cluster size", b->file, m->cluster_size);
    return false;
  }
  m->nclusters = (m->image_size + m->cluster_size - 1) / m->cluster_size;
  infos = g_new0(struct cbt_qcow2_info, m->nfiles);
  for (unsigned i = 0; i < m->nfiles; i++) {
    const repo_backup *e = g_ptr_array_index(r->backups, first + i);

    if (e->cluster_size != m->cluster_size || e->image_size != m->image_size) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: cluster or image size differs "
                  "from the rest of the chain of %s", e->file, b->file);
      g_free(infos);
      return false;
    }
    if (!open_file(r, e, b, m->cluster_size, &m->files[i], &infos[i], error)) {
      g_free(infos);
      return false;
    }
  }
  state = g_malloc0(m->nclusters);
  for (unsigned i = m->nfiles; i-- > 0;)
    if (!map_file(m, i, &infos[i], state, error)) {
      g_free(infos);
      return false;
    }
  g_free(infos);

  /* What reads as zeros: decided as zero, or never decided. */
  m->zeros = g_array_new(FALSE, FALSE, sizeof(struct stream_range));
  {
    g_autofree uint8_t *data = g_malloc0(m->nclusters);

    for (unsigned i = 0; i < m->nfiles; i++)
      for (guint k = 0; k < m->files[i].runs->len; k++) {
        const struct chain_run *run = &g_array_index(m->files[i].runs, struct chain_run, k);

        memset(data + run->guest, 1, run->clusters);
      }
    for (uint64_t c = 0; c < m->nclusters;) {
      uint64_t e = c;

      if (data[c]) {
        c++;
        continue;
      }
      while (e < m->nclusters && !data[e])
        e++;
      {
        struct stream_range z = { c * m->cluster_size,
                                  MIN(e * m->cluster_size, m->image_size) - c * m->cluster_size };

        g_array_append_val(m->zeros, z);
      }
      c = e;
    }
  }
  *out = g_steal_pointer(&m);
  return true;
}

/* The first run of @f that ends after @host (runs are sorted by host and
 * do not overlap in a file cbt wrote; a crafted one is still safe: every
 * run is checked against the piece it is written from). */
guint
chain_file_find(const struct chain_file *f, uint64_t host, uint64_t cs)
{
  guint lo = 0, hi = f->runs->len;

  while (lo < hi) {
    guint mid = lo + (hi - lo) / 2;
    const struct chain_run *run = &g_array_index(f->runs, struct chain_run, mid);

    if (run->host + run->clusters * cs <= host)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}
