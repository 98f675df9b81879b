/* cbt verify: check every backup file against the manifest.
 *
 * For each entry of the manifest, oldest first: the file exists and has
 * the recorded size; the SHA-256 of each chunk matches (a mismatch names
 * the byte range); the qcow2 header decodes (lib/qcow2.c validates it
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

#define HEADER_READ (UINT64_C(2) << 20)   /* the largest cluster */

struct verify {
  repo *r;
  unsigned damaged, failed;
  json_object *jbackups;
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
check_header(struct verify *v, const repo_backup *b, const char *path,
             json_object *jp)
{
  g_autofree uint8_t *buf = NULL;
  g_autofree char *why = NULL;
  struct cbt_qcow2_info info;
  size_t n = (size_t)MIN(b->file_size, HEADER_READ);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  int r;

  if (fd < 0) {
    problem(v, jp, "%s: %s", path, g_strerror(errno));
    return false;
  }
  buf = g_malloc(n);
  r = cbt_io_pread(fd, buf, n, 0);
  close(fd);
  if (r < 0) {
    problem(v, jp, "%s: reading the header: %s", path, g_strerror(-r));
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

static void
check_backup(struct verify *v, const repo_backup *b)
{
  g_autofree char *path = repo_path(v->r, b->file);
  g_autoptr(GPtrArray) sums = NULL;
  g_autoptr(GError) err = NULL;
  json_object *jb = json_object_new_object();
  json_object *jp = json_object_new_array();
  unsigned before = v->damaged, failed_before = v->failed;
  uint64_t size = 0;
  struct stat st;

  cli_json_add_str(jb, "file", b->file);
  json_object_object_add(jb, "problems", jp);
  json_object_array_add(v->jbackups, jb);

  if (stat(path, &st) < 0) {
    problem(v, jp, "%s: %s (listed in the manifest as backup %u)", path,
            errno == ENOENT ? "missing" : g_strerror(errno), b->seq);
    goto done;
  }
  if ((uint64_t)st.st_size != b->file_size) {
    problem(v, jp, "%s: %" PRIu64 " bytes, the manifest says %" PRIu64, path,
            (uint64_t)st.st_size, b->file_size);
    goto done;
  }
  if (!repo_checksum_file(path, b->chunk_size, &sums, &size, &err)) {
    cli_error("%s", err->message);
    json_object_array_add(jp, json_object_new_string(err->message));
    v->failed++;
    goto done;
  }
  for (guint i = 0; i < sums->len && i < b->sha256->len; i++) {
    if (g_ascii_strcasecmp(g_ptr_array_index(sums, i), g_ptr_array_index(b->sha256, i)) != 0) {
      uint64_t off = (uint64_t)i * b->chunk_size;

      problem(v, jp, "%s: checksum mismatch in bytes %" PRIu64 "..%" PRIu64
              " (chunk %u): the file was modified or is damaged", path, off,
              MIN(off + b->chunk_size, size) - 1, i);
    }
  }
  if (sums->len != b->sha256->len)
    problem(v, jp, "%s: %u chunks, the manifest has %u checksums", path, sums->len,
            b->sha256->len);
  check_header(v, b, path, jp);
done:
  cli_json_add_bool(jb, "ok", v->damaged == before && v->failed == failed_before);
  cli_debug("%s: %s", path, v->damaged == before ? "ok" : "damaged");
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
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository directory", "DIR" },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &json, "print the result as JSON on stdout", NULL },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("verify", "",
                       "Check every backup file against the manifest: size, SHA-256 of\n"
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
  for (guint i = 0; i < v.r->backups->len; i++) {
    const repo_backup *b = g_ptr_array_index(v.r->backups, i);

    check_backup(&v, b);
    bytes += b->file_size;
  }
  {
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
