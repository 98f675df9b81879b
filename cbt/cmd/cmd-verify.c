/* cbt verify: check every backup file against the manifest.
 *
 * For each entry of the manifest, oldest first: the file exists and has
 * the recorded size; the checksum of each chunk matches (SHA-256 or
 * XXH128, as the entry says; a mismatch names the byte range); the qcow2 header decodes (lib/qcow2/qcow2.c validates it
 * fully), its virtual size and cluster size are the recorded ones, and its
 * backing file and format are exactly the chain's (none for a full, the
 * previous backup for an incremental), so qemu-img and our restore follow
 * the chain the manifest describes.  The manifest itself was validated on
 * load (kinds, chain links, checksum counts).
 *
 * Every problem is reported (not just the first), then the exit status is
 * CLI_EXIT_DAMAGED; an unreadable file (I/O error) is CLI_EXIT_FAILED
 * unless damage was found too.  Files in the directory that the manifest
 * does not list are mentioned but are not damage.
 *
 * The checksums: all files whose size is right are read in one stream
 * (stream.c): one io_uring, a deep queue of large reads, chunks hashed on
 * one thread per CPU while the next reads are in flight, so verify runs
 * at the speed the files can be read.  A mismatch is reported and the
 * stream goes on; an I/O error stops it (the files not yet read count as
 * failed, not as verified).
 *
 * A repository on S3 is read the same way through repo-read.c: a HEAD
 * per object for its size (a missing object is damage), the checksums
 * from parallel ranged GETs, the header from one.  Objects under the
 * prefix that the manifest does not list are mentioned as files are.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/qcow2.h"
#include "cbt/uring-io.h"
#include "cli.h"
#include "s3.h"

#define HEADER_READ (UINT64_C(2) << 20)   /* the largest cluster */

struct verify {
  repo *r;
  unsigned damaged, failed;
  json_object *jbackups;
  json_object **jp;               /* per backup: its "problems" array */
  bool progress;
  uint64_t total;
  gint64 start;
};

static void G_GNUC_PRINTF(3, 4)
problem(struct verify *v, json_object *jproblems, const char *fmt, ...)
{
  g_autofree char *msg = NULL;
  va_list ap;

  va_start(ap, fmt);
  msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  cli_error("%s", msg);
  json_object_array_add(jproblems, json_object_new_string(msg));
  v->damaged++;
}

static bool
check_header(struct verify *v, const repo_backup *b, const rfile *rf, json_object *jp)
{
  g_autofree uint8_t *buf = NULL;
  g_autofree char *why = NULL;
  g_autoptr(GError) err = NULL;
  struct cbt_qcow2_info info;
  const char *path = rf->name;
  /* On S3 a GET of the first cluster, not of the largest one. */
  size_t n = (size_t)MIN(b->file_size, rfile_is_s3(rf)
                         ? CLAMP(b->cluster_size, 4096, HEADER_READ) : HEADER_READ);
  int r;

  buf = g_malloc(MAX(n, 1));
  if (!rfile_pread(rf, buf, n, 0, &err)) {
    problem(v, jp, "reading the header: %s", err->message);
    return false;
  }
  r = cbt_qcow2_header_decode(buf, n, b->file_size, &info, &why);
  if (r < 0) {
    problem(v, jp, "%s: not a valid qcow2 image: %s", path, why ? why : g_strerror(-r));
    return false;
  }
  if (info.size != (b->image_size + 511) / 512 * 512)
    problem(v, jp, "%s: virtual size %" PRIu64 ", the manifest says %" PRIu64, path,
            info.size, b->image_size);
  if (info.cluster_size != b->cluster_size)
    problem(v, jp, "%s: cluster size %" PRIu64 ", the manifest says %" PRIu64, path,
            info.cluster_size, b->cluster_size);
  if (!b->backing && info.backing_file[0])
    problem(v, jp, "%s: a full backup with backing file '%s'", path, info.backing_file);
  if (b->backing && strcmp(info.backing_file, b->backing) != 0)
    problem(v, jp, "%s: backing file is '%s', the chain needs '%s'", path,
            info.backing_file, b->backing);
  if (b->backing && strcmp(info.backing_format, "qcow2") != 0)
    problem(v, jp, "%s: backing format is '%s', expected 'qcow2'", path,
            info.backing_format);
  return true;
}

/* Size and existence of backup @i; true when its checksums can be read. */
static bool
check_file(struct verify *v, guint i, struct stream_file *sf, GError **error)
{
  const repo_backup *b = g_ptr_array_index(v->r->backups, i);
  g_autofree char *path = repo_path(v->r, b->file);
  json_object *jb = json_object_new_object();
  json_object *jp = json_object_new_array();
  g_autoptr(GError) err = NULL;
  g_autoptr(rfile) rf = NULL;
  struct stat st;

  cli_json_add_str(jb, "file", b->file);
  json_object_object_add(jb, "problems", jp);
  json_object_array_add(v->jbackups, jb);
  v->jp[i] = jp;

  if (!repo_is_s3(v->r) && stat(path, &st) < 0) {
    problem(v, jp, "%s: %s (listed in the manifest as backup %u)", path,
            errno == ENOENT ? "missing" : g_strerror(errno), b->seq);
    return false;
  }
  rf = rfile_open(v->r, b, &err);
  if (!rf) {
    if (err->code == CLI_EXIT_DAMAGED)
      problem(v, jp, "%s", err->message);
    else
      g_propagate_error(error, g_steal_pointer(&err));
    return false;
  }
  if (rf->size != b->file_size) {
    problem(v, jp, "%s: %" PRIu64 " bytes, the manifest says %" PRIu64, rf->name,
            rf->size, b->file_size);
    return false;
  }
  if (rf->fd >= 0)
    posix_fadvise(rf->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  sf->rf = g_steal_pointer(&rf);
  sf->size = b->file_size;
  sf->ranges = g_array_new(FALSE, FALSE, sizeof(struct stream_range));
  {
    struct stream_range all = { 0, b->file_size };

    g_array_append_val(sf->ranges, all);
  }
  sf->sums = b->sums;
  sf->chunk_size = b->chunk_size;
  sf->checksum = b->checksum;
  v->total += b->file_size;
  return true;
}

struct vstream {
  struct verify *v;
  guint *index;                   /* stream file -> backup index */
};

static void
mismatch_cb(void *opaque, unsigned file, GError *err)
{
  struct vstream *vs = opaque;

  problem(vs->v, vs->v->jp[vs->index[file]], "%s", err->message);
  g_error_free(err);
}

static void
progress_cb(void *opaque, uint64_t done)
{
  struct vstream *vs = opaque;
  struct verify *v = vs->v;
  double secs = (double)(g_get_monotonic_time() - v->start) / 1e6;
  g_autofree char *d = cli_format_size(done);
  g_autofree char *t = cli_format_size(v->total);

  if (!v->progress)
    return;
  fprintf(stderr, "\rcbt: verify %5.1f%% %s of %s, %.1f MiB/s   ", cli_percent(done, v->total),
          d, t, secs > 0 ? (double)done / secs / 1048576.0 : 0.0);
  fflush(stderr);
}

/* Read and hash every file that passed check_file. */
static void
check_sums(struct verify *v, struct stream_file *files, guint *index, unsigned n)
{
  struct vstream vs = { v, index };
  struct stream_opts so = { .mismatch = mismatch_cb, .opaque = &vs };
  g_autoptr(GError) err = NULL;

  if (v->progress)
    so.progress = progress_cb;
  if (n == 0)
    return;
  if (!stream_run(&so, files, n, &err)) {
    /* Name it on the file it is about (the message starts with its path). */
    unsigned at = 0;

    for (unsigned k = 0; k < n; k++)
      if (g_str_has_prefix(err->message, files[k].rf->name))
        at = k;
    if (v->progress)
      fputc('\n', stderr);
    cli_error("%s (the checksums of what was not read yet are not verified)", err->message);
    json_object_array_add(v->jp[index[at]], json_object_new_string(err->message));
    if (err->code == CLI_EXIT_DAMAGED)
      v->damaged++;
    else
      v->failed++;
    return;
  }
  if (v->progress)
    fputc('\n', stderr);
}

int
cmd_verify(int argc, char **argv)
{
  g_autofree char *dir = NULL;
  gboolean json = FALSE;
  g_autoptr(json_object) jo = NULL;
  g_autoptr(GError) lerr = NULL;
  GError *error = NULL;
  struct verify v = { 0 };
  uint64_t bytes = 0;
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    CLI_S3_OPTION,
    { "json", 'j', 0, G_OPTION_ARG_NONE, &json, "print the result as JSON on stdout", NULL },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("verify", "",
                       "Check every backup file against the manifest: size, checksum of\n"
                       "each chunk, qcow2 header, and the backing chain.",
                       CLI_EXIT_CODES_HELP, entries);

  if (!cli_parse(octx, "verify", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1)
    return cli_usage_error("verify", "unexpected argument '%s'", argv[1]);
  if (!dir)
    return cli_usage_error("verify", "--repo is required");
  if (!repo_open(dir, REPO_LOCK_SHARED, false, &v.r, &error))
    return cli_report(error);

  jo = json_object_new_object();
  v.jbackups = json_object_new_array();
  cli_json_add_str(jo, "repository", dir);
  json_object_object_add(jo, "backups", v.jbackups);
  v.jp = g_new0(json_object *, v.r->backups->len + 1);
  v.progress = !cli_quiet && !json && isatty(STDERR_FILENO);
  v.start = g_get_monotonic_time();
  {
    g_autofree struct stream_file *files = g_new0(struct stream_file, v.r->backups->len + 1);
    g_autofree guint *index = g_new0(guint, v.r->backups->len + 1);
    unsigned n = 0;

    for (guint i = 0; i < v.r->backups->len; i++) {
      const repo_backup *b = g_ptr_array_index(v.r->backups, i);
      g_autoptr(GError) err = NULL;

      bytes += b->file_size;
      if (check_file(&v, i, &files[n], &err)) {
        index[n++] = i;
      } else if (err) {
        cli_error("%s", err->message);
        json_object_array_add(v.jp[i], json_object_new_string(err->message));
        v.failed++;
      }
    }
    check_sums(&v, files, index, n);
    for (unsigned k = 0; k < n; k++) {
      const repo_backup *b = g_ptr_array_index(v.r->backups, index[k]);

      check_header(&v, b, files[k].rf, v.jp[index[k]]);
      rfile_close((rfile *)files[k].rf);
      g_array_unref(files[k].ranges);
    }
    for (guint i = 0; i < v.r->backups->len; i++) {
      const repo_backup *b = g_ptr_array_index(v.r->backups, i);
      bool ok = json_object_array_length(v.jp[i]) == 0;
      json_object *jb = json_object_array_get_idx(v.jbackups, i);

      cli_json_add_bool(jb, "ok", ok);
      cli_debug("%s/%s: %s", dir, b->file, ok ? "ok" : "damaged");
    }
  }
  g_free(v.jp);

  if (repo_is_s3(v.r)) {
    /* Objects the manifest does not know: worth a word, not damage. */
    g_autofree char *prefix = repo_s3_key(v.r, "");
    g_autoptr(GPtrArray) objs = NULL;

    if (!s3_list(repo_s3(v.r), repo_s3_bucket(v.r), prefix, "/", 0, &objs, NULL, &lerr))
      cli_note("listing %s: %s", dir, lerr->message);
    for (guint k = 0; objs && k < objs->len; k++) {
      const s3_entry *e = g_ptr_array_index(objs, k);
      /* s3_list kept only keys under the prefix (foreign ones are noted
       * there and are no concern of this repository). */
      const char *name = s3_key_under(e->key, prefix);
      bool known = false;

      if (!name || !g_str_has_suffix(name, ".qcow2"))
        continue;
      for (guint i = 0; i < v.r->backups->len && !known; i++)
        known = strcmp(((repo_backup *)g_ptr_array_index(v.r->backups, i))->file, name) == 0;
      if (!known)
        cli_note("s3://%s/%s: not listed in the manifest (ignored)", repo_s3_bucket(v.r),
                 e->key);
    }
  } else {
    /* Files the manifest does not know: worth a word, not damage. */
    g_autoptr(GDir) d = g_dir_open(dir, 0, &lerr);
    const char *name;

    while (d && (name = g_dir_read_name(d))) {
      bool known = false;

      if (!g_str_has_suffix(name, ".qcow2"))
        continue;
      for (guint i = 0; i < v.r->backups->len && !known; i++)
        known = strcmp(((repo_backup *)g_ptr_array_index(v.r->backups, i))->file, name) == 0;
      if (!known)
        cli_note("%s/%s: not listed in the manifest (ignored)", dir, name);
    }
  }
  cli_json_add_u64(jo, "count", v.r->backups->len);
  cli_json_add_u64(jo, "bytes", bytes);
  cli_json_add_bool(jo, "ok", v.damaged == 0 && v.failed == 0);
  if (json) {
    if (!cli_json_print(jo, &error)) {
      repo_free(v.r);
      return cli_report(error);
    }
  } else if (v.damaged == 0 && v.failed == 0 && !cli_quiet) {
    g_autofree char *sz = cli_format_size(bytes);

    printf("%s: %u backups, %s: all checksums and chains OK\n", dir, v.r->backups->len, sz);
  }
  repo_free(v.r);
  if (v.damaged) {
    cli_error("%s: %u problems found", dir, v.damaged);
    return CLI_EXIT_DAMAGED;
  }
  return v.failed ? CLI_EXIT_FAILED : CLI_EXIT_OK;
}
