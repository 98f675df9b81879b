/* cbt restore: rebuild the image as of one backup.
 *
 * The source is the backup's qcow2 file opened with our own qcow2 backend
 * (lib/image-qcow2.c) on top of its chain down to the full backup, so
 * reading it gives the disk as it was.  The chain is the manifest's, never
 * the backing names written in the files: each file the manifest lists is
 * opened here, in the repository, as a regular file (no symbolic links),
 * and its header must name the manifest's backing file or the restore is
 * refused (a rebased or replaced file would otherwise be read instead).  We walk the disk in
 * WINDOW-sized, cluster-aligned windows: block status says whether a
 * window reads as zeros everywhere; if so the sink is told "zero",
 * otherwise the window is read and handed to the sink, which skips or
 * zeroes all-zero pieces itself.  So the output is sparse.
 *
 * Sinks, chosen by --output:
 *   nbd://..., nbd+unix://...  an NBD export of exactly the image size;
 *                              zero windows are written with NBD_CMD_WRITE_ZEROES
 *                              (the export may hold old data), then flush
 *   FILE.qcow2                 a flat qcow2 (no backing) via our writer
 *   anything else              a raw file, sparse (holes for zeros)
 * A file output must not exist; it is created O_EXCL and removed again if
 * the restore fails, so a half restore never looks like a result.
 *
 * The repository is held with a shared lock so that pruning cannot delete
 * a file of the chain while we read it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libnbd.h>

#include "cbt/image.h"
#include "cbt/nbd-proto.h"
#include "cbt/qcow2.h"
#include "cbt/qcow2-writer.h"
#include "cbt/uring-io.h"
#include "cbt/util.h"
#include "cli.h"

#define WINDOW   (UINT64_C(4) << 20)
#define PIECE    (UINT64_C(64) << 10)   /* sparseness granule of raw output */

typedef struct cbt_image cbt_image;
G_DEFINE_AUTOPTR_CLEANUP_FUNC(cbt_image, cbt_image_close)

enum sink_kind { SINK_RAW, SINK_QCOW2, SINK_NBD };

struct sink {
  enum sink_kind kind;
  const char *name;
  int fd;                         /* raw */
  cbt_qcow2_writer *w;            /* qcow2 */
  struct nbd_handle *h;           /* nbd */
  bool can_zero;
  uint64_t written;               /* data bytes written */
  bool created;                   /* a file we must remove on failure */
};

static bool
sink_open(struct sink *s, const char *out, uint64_t size, GError **error)
{
  s->name = out;
  s->fd = -1;
  if (g_str_has_prefix(out, "nbd://") || g_str_has_prefix(out, "nbd+unix://") ||
      g_str_has_prefix(out, "nbds://") || g_str_has_prefix(out, "nbds+unix://")) {
    int64_t esize;

    s->kind = SINK_NBD;
    s->h = nbd_create();
    if (!s->h || nbd_connect_uri(s->h, out) < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: %s", out, nbd_get_error());
      return false;
    }
    esize = nbd_get_size(s->h);
    if (esize < 0 || (uint64_t)esize != size) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "NBD %s: export size %" PRId64 ", the backup is %" PRIu64 " bytes",
                  out, esize, size);
      return false;
    }
    if (nbd_is_read_only(s->h) == 1) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: the export is read-only", out);
      return false;
    }
    s->can_zero = nbd_can_zero(s->h) == 1;
    return true;
  }
  if (g_str_has_suffix(out, ".qcow2")) {
    struct cbt_qcow2_writer_opts o = { .size = size };
    g_autofree char *why = NULL;
    int r;

    s->kind = SINK_QCOW2;
    r = cbt_qcow2_writer_create(out, &o, &s->w, &why);
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", out,
                  r == -EEXIST ? "exists (remove it or choose another name)"
                               : why ? why : g_strerror(-r));
      return false;
    }
    s->created = true;
    return true;
  }
  s->kind = SINK_RAW;
  s->fd = open(out, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (s->fd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", out,
                errno == EEXIST ? "exists (remove it or choose another name)"
                                : g_strerror(errno));
    return false;
  }
  s->created = true;
  if (ftruncate(s->fd, (off_t)size) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: truncate to %" PRIu64 ": %s", out,
                size, g_strerror(errno));
    return false;
  }
  return true;
}

/* [off, off+len) reads as zeros in the backup. */
static bool
sink_zero(struct sink *s, uint64_t off, uint64_t len, GError **error)
{
  if (s->kind != SINK_NBD)
    return true;                  /* fresh files read zeros there already */
  if (s->can_zero) {
    if (nbd_zero(s->h, len, off, 0) < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: zeroing %" PRIu64 "+%" PRIu64
                  ": %s", s->name, off, len, nbd_get_error());
      return false;
    }
    return true;
  }
  {
    g_autofree uint8_t *z = g_malloc0(MIN(len, WINDOW));

    for (uint64_t p = 0; p < len; p += WINDOW) {
      if (nbd_pwrite(s->h, z, MIN(len - p, WINDOW), off + p, 0) < 0) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: writing %" PRIu64 ": %s",
                    s->name, off + p, nbd_get_error());
        return false;
      }
    }
  }
  return true;
}

static bool
sink_write(struct sink *s, uint64_t off, const uint8_t *buf, uint64_t len, GError **error)
{
  int r;

  switch (s->kind) {
  case SINK_QCOW2:
    r = cbt_qcow2_writer_write(s->w, off, buf, (size_t)len);
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: writing guest offset %" PRIu64
                  ": %s", s->name, off, g_strerror(-r));
      return false;
    }
    s->written += len;
    return true;
  case SINK_RAW:
  case SINK_NBD:
    for (uint64_t p = 0; p < len; p += PIECE) {
      uint64_t n = MIN(PIECE, len - p);

      if (cbt_is_zero(buf + p, (size_t)n)) {
        if (!sink_zero(s, off + p, n, error))
          return false;
        continue;
      }
      if (s->kind == SINK_RAW) {
        r = cbt_io_pwrite(s->fd, buf + p, (size_t)n, off + p);
        if (r < 0) {
          g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: writing at %" PRIu64 ": %s",
                      s->name, off + p, g_strerror(-r));
          return false;
        }
      } else if (nbd_pwrite(s->h, buf + p, n, off + p, 0) < 0) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: writing %" PRIu64 ": %s",
                    s->name, off + p, nbd_get_error());
        return false;
      }
      s->written += n;
    }
    return true;
  }
  g_assert_not_reached();
}

/* Make the output durable and close it. */
static bool
sink_finish(struct sink *s, GError **error)
{
  g_autofree char *why = NULL;
  int r;

  switch (s->kind) {
  case SINK_RAW:
    r = cbt_io_fsync(s->fd);
    close(s->fd);
    s->fd = -1;
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: fsync: %s", s->name, g_strerror(-r));
      return false;
    }
    break;
  case SINK_QCOW2:
    /* What the file stores, not what was handed over in windows. */
    s->written = cbt_qcow2_writer_data_bytes(s->w);
    r = cbt_qcow2_writer_finish(s->w, &why);
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", s->name,
                  why ? why : g_strerror(-r));
      return false;
    }
    break;
  case SINK_NBD:
    if (nbd_can_flush(s->h) == 1 && nbd_flush(s->h, 0) < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "NBD %s: flush: %s", s->name,
                  nbd_get_error());
      return false;
    }
    if (nbd_shutdown(s->h, 0) < 0)
      cli_debug("NBD %s: shutdown: %s", s->name, nbd_get_error());
    break;
  }
  s->created = false;
  return true;
}

static void
sink_close(struct sink *s)
{
  if (s->fd >= 0)
    close(s->fd);
  cbt_qcow2_writer_free(s->w);
  if (s->h)
    nbd_close(s->h);
  if (s->created && unlink(s->name) < 0 && errno != ENOENT)
    cli_error("%s: cannot remove the incomplete output: %s", s->name, g_strerror(errno));
}

/* Does [off, off+len) of @img read as zeros everywhere? */
static bool
window_is_zero(cbt_image *img, const char *path, uint64_t off, uint64_t len,
               bool *zero, GError **error)
{
  struct cbt_extent ext[64];

  *zero = true;
  while (len > 0) {
    int n = img->ops->block_status(img, off, len, ext, G_N_ELEMENTS(ext));

    if (n <= 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: block status at %" PRIu64 ": %s",
                  path, off, g_strerror(n < 0 ? -n : EIO));
      return false;
    }
    for (int i = 0; i < n && len > 0; i++) {
      uint64_t l = MIN(ext[i].length, len);

      if (!(ext[i].flags & NBD_STATE_ZERO)) {
        *zero = false;
        return true;
      }
      if (l == 0) {
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                    "%s: block status at %" PRIu64 " returned an empty extent", path, off);
        return false;
      }
      off += l;
      len -= l;
    }
  }
  return true;
}

/* Open @b on top of its chain, full backup first, each file as the
 * manifest lists it (repo_open_file) with the one below as its backing
 * image.  So every file of the chain is there before anything is written,
 * and no name written inside a file is followed. */
static bool
open_chain(repo *r, const repo_backup *b, cbt_image **out, GError **error)
{
  g_autoptr(cbt_image) below = NULL;

  for (guint i = repo_chain_start(r, b); ; i++) {
    const repo_backup *c = g_ptr_array_index(r->backups, i);
    g_autofree char *p = repo_path(r, c->file);
    g_autofree char *why = NULL;
    g_autoptr(GError) err = NULL;
    struct cbt_qcow2_link link = { .backing_name = c->backing };
    cbt_image *img = NULL;
    int rc;

    link.fd = repo_open_file(r, c->file, &err);
    if (link.fd < 0) {
      g_set_error(error, CLI_ERROR, err->code, "%s (needed to restore %s)",
                  err->message, b->file);
      return false;
    }
    link.backing = g_steal_pointer(&below);
    rc = cbt_image_open_qcow2_link(p, &link, &img, &why);
    if (rc < 0) {
      /* The chain is the manifest's: a disagreeing file is damage. */
      g_set_error(error, CLI_ERROR, rc == -EBADMSG ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                  "%s (in the manifest's chain of %s; not restoring)",
                  why ? why : g_strerror(-rc), b->file);
      return false;
    }
    below = img;
    if (c == b)
      break;
  }
  *out = g_steal_pointer(&below);
  return true;
}

static bool
restore(const char *dir, const char *at, const char *out, GError **error)
{
  g_autoptr(repo) r = NULL;
  g_autoptr(cbt_image) img = NULL;
  g_autofree char *path = NULL;
  g_autofree uint8_t *buf = NULL;
  struct sink s = { .fd = -1 };
  const repo_backup *b = NULL;
  gint64 start = g_get_monotonic_time();
  bool ok = false;
  int rc;

  if (!repo_open(dir, REPO_LOCK_SHARED, false, &r, error) || !repo_find(r, at, &b, error))
    return false;
  if (!open_chain(r, b, &img, error))
    return false;
  path = repo_path(r, b->file);
  /* qcow2 counts in 512-byte sectors; the manifest has the exact size. */
  if (img->size < b->image_size || img->size - b->image_size >= 512) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: virtual size %" PRIu64
                " does not match the manifest's %" PRIu64, path, img->size, b->image_size);
    return false;
  }
  if (!sink_open(&s, out, b->image_size, error))
    goto out;
  buf = g_malloc(WINDOW);
  for (uint64_t off = 0; off < b->image_size; off += WINDOW) {
    uint64_t len = MIN(WINDOW, b->image_size - off);
    bool zero;

    if (!window_is_zero(img, path, off, len, &zero, error))
      goto out;
    if (zero) {
      if (!sink_zero(&s, off, len, error))
        goto out;
      continue;
    }
    rc = cbt_image_run_sync(img, CBT_IO_READ, 0, off, len, buf);
    if (rc < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: reading guest offset %" PRIu64
                  ": %s", path, off, g_strerror(-rc));
      goto out;
    }
    if (!sink_write(&s, off, buf, len, error))
      goto out;
  }
  if (!sink_finish(&s, error))
    goto out;
  ok = true;
  {
    g_autofree char *size = cli_format_size(b->image_size);
    g_autofree char *data = cli_format_size(s.written);

    cli_note("restored %s (%s, %s of data) to %s in %.1f s", b->file, size, data, out,
             (double)(g_get_monotonic_time() - start) / 1e6);
  }
out:
  sink_close(&s);
  return ok;
}

int
cmd_restore(int argc, char **argv)
{
  for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++)
    if (strcmp(argv[i], "--instant") == 0)
      return cmd_restore_instant(argc, argv);   /* cmd-restore-instant.c */
  g_autofree char *dir = NULL, *at = NULL, *out = NULL;
  GError *error = NULL;
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository directory", "DIR" },
    { "at", 'a', 0, G_OPTION_ARG_STRING, &at, "the backup to restore: seq number, file name or 'latest' (default)", "BACKUP" },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &out, "FILE.raw, FILE.qcow2 or an NBD URI", "OUTPUT" },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("restore", "",
                       "Rebuild the disk image as of one backup.",
                       "A file output must not exist yet; it is written sparse and\n"
                       "removed again if the restore fails.  An NBD export must have\n"
                       "the image's size; all of it is overwritten.\n"
                       "Only the files of the manifest's chain are read, as regular\n"
                       "files in DIR; one whose backing file disagrees with the\n"
                       "manifest, a symbolic link or a FIFO is refused (exit 4).\n\n"
                       CLI_EXIT_CODES_HELP,
                       entries);

  if (!cli_parse(octx, "restore", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1)
    return cli_usage_error("restore", "unexpected argument '%s'", argv[1]);
  if (!dir || !out)
    return cli_usage_error("restore", "--repo and --output are required");
  signal(SIGPIPE, SIG_IGN);
  return restore(dir, at, out, &error) ? CLI_EXIT_OK : cli_report(error);
}
