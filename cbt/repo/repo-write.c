/* Writing one new backup file into a repository, directory or S3, behind
 * one interface (repo_wfile in cli.h), so that cmd-backup.c does not
 * know which it writes to.  Both give the caller a qcow2 writer
 * (lib/qcow2/qcow2-writer.c) to fill, compute the manifest's per-chunk
 * checksums (checksum.c: xxh128 or sha256, as the caller chose) as the
 * bytes pass, and make the file visible under its name only in
 * repo_wfile_commit; the manifest entry comes after that (repo_add).
 *
 * Directory: the writer writes DIR/NAME.partial, reporting its bytes in
 * file order (set_stream) to a sums_stream that hashes every chunk but
 * the first; chunk 0, whose first cluster is the header written last,
 * is read back at commit (at most REPO_CHUNK_SIZE).  Commit fsyncs (the
 * writer's finish), renames to NAME; repo_add then fsyncs the directory
 * with the manifest.
 *
 * S3: the writer runs in sink mode (no file): its bytes arrive in file
 * order on the writing threads (one at a time, ordered by the writer)
 * and go into a streaming multipart upload (s3_upload, UPLOAD_JOBS parts
 * in flight), except the first chunk [0, REPO_CHUNK_SIZE), which is held
 * in memory because its first cluster, the header, comes last: at commit
 * it is hashed and sent as part 1, and the upload is completed.  The
 * parts are the checksum chunks (part size = REPO_CHUNK_SIZE, so part k
 * is chunk k - 1, and a short last chunk is the short last part): each
 * chunk is hashed once, here, as its bytes pass, and with sha256 (the S3
 * default) that SHA-256 is both the manifest's and the part's payload
 * hash over http:// (s3_upload_part_sha256), so the S3 client does not
 * hash the bytes a second time.  With --checksum xxh128 the manifest gets
 * XXH128 and the client hashes each part with SHA-256 itself over
 * http:// (two hashes, the cost sha256 avoids); over https:// it sends
 * UNSIGNED-PAYLOAD and hashes nothing.  A file too large for 10000 parts
 * of a chunk (an image over ~560 GiB) gets larger parts, which the client
 * hashes itself; so does a file no larger than the chunk, which is one
 * PUT.  Memory is the
 * head chunk plus (UPLOAD_JOBS + 1) parts: 64 MiB + 4 x 64 MiB = 320 MiB
 * whatever the size of the backup; nothing is staged on disk.  Before
 * anything is handed to the store the repository lock is checked: a lost
 * lock stops the backup.
 *
 * Errors: the sink callbacks can only return -errno to the writer, so
 * the first storage error (S3's GError, naming operation and cause) is
 * kept here; repo_wfile_check hands it out, so the caller can report it
 * instead of the writer's "Input/output error".
 *
 * A wfile freed without repo_wfile_keep removes what it wrote: the
 * partial or renamed file, the aborted upload or the completed object
 * (a failure after commit but before the manifest listed it).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/qcow2-writer.h"
#include "cbt/util.h"
#include "repo.h"

/* Directory: the writeback window.  Small, so that little is left for the
 * fdatasync at the end: a 20 MiB incremental spent 11 ms in it with a
 * 64 MiB window (none of it written back before), 4 ms with 8 MiB, for
 * about 1 ms more of copying.  (cmd-backup.c widens it for large copies.) */
#define WRITE_BEHIND   (UINT64_C(8) << 20)
#define UPLOAD_JOBS    3                      /* S3: parts in flight (64 MiB) */

struct repo_wfile {
  repo *r;
  char *file;
  char *name;                   /* path or s3://BUCKET/KEY, for messages */
  cbt_qcow2_writer *w;
  sums_stream *sums;
  enum chunk_alg alg;
  uint64_t chunk;
  bool committed, kept;

  /* Directory. */
  char *partial, *final;

  /* S3. */
  s3_upload *up;
  uint8_t *head;                /* [0, chunk) of the file until commit */
  uint64_t end;                 /* bytes from cluster_size on handed over */
  chunk_hash *hash;             /* the chunk being handed over */
  GPtrArray *hex;               /* [i]: checksum of chunk i; [0] at commit */
  bool aligned;                 /* parts are chunks: their SHA-256 is ours */
  GMutex err_lock;
  GError *error;                /* the first storage error */
};

const char *
repo_wfile_name(const repo_wfile *f)
{
  return f->name;
}

cbt_qcow2_writer *
repo_wfile_writer(repo_wfile *f)
{
  return f->w;
}

static void
keep_error(repo_wfile *f, GError *err)
{
  g_mutex_lock(&f->err_lock);
  if (!f->error)
    f->error = err;
  else
    g_error_free(err);
  g_mutex_unlock(&f->err_lock);
}

bool
repo_wfile_check(repo_wfile *f, GError **error)
{
  bool ok;

  g_mutex_lock(&f->err_lock);
  ok = !f->error;
  if (!ok)
    g_propagate_error(error, g_error_copy(f->error));
  g_mutex_unlock(&f->err_lock);
  return ok && repo_lock_check(f->r, error);
}

/* --- the S3 sink --------------------------------------------------------- */

/* Bytes [@off, @off + @len) of the file, in order (see the top). */
static int
sink_data(void *opaque, uint64_t off, const void *buf, size_t len)
{
  repo_wfile *f = opaque;
  const uint8_t *p = buf;
  GError *err = NULL;

  if (off != f->end) {
    keep_error(f, g_error_new(CLI_ERROR, CLI_EXIT_FAILED, "%s: bytes at %" PRIu64
                              " arrived while %" PRIu64 " was expected", f->name, off,
                              f->end));
    return -EIO;
  }
  if (!repo_lock_check(f->r, &err)) {
    keep_error(f, err);
    return -ENOLCK;
  }
  if (off < f->chunk) {
    size_t n = (size_t)MIN((uint64_t)len, f->chunk - off);

    memcpy(f->head + off, p, n);
    off += n;
    p += n;
    len -= n;
  }
  while (len > 0) {
    size_t n = (size_t)MIN((uint64_t)len, f->chunk - off % f->chunk);

    /* Hashed before it is handed over: the part that this completes
     * goes out with its chunk's hash. */
    chunk_hash_update(f->hash, p, n);
    if ((off + n) % f->chunk == 0) {
      char *hex = chunk_hash_hex(f->hash);

      g_ptr_array_add(f->hex, hex);
      if (f->aligned)
        s3_upload_part_sha256(f->up, hex, (size_t)f->chunk);
    }
    if (!s3_upload_write(f->up, p, n, &err)) {
      keep_error(f, err);
      return -EIO;
    }
    off += n;
    p += n;
    len -= n;
  }
  f->end = off;
  return 0;
}

/* Cluster 0, last. */
static int
sink_head(void *opaque, const void *buf, size_t len)
{
  repo_wfile *f = opaque;

  if (len > f->chunk)
    return -EINVAL;
  memcpy(f->head, buf, len);
  return 0;
}

/* The part size for a file of about @image_size bytes: the checksum
 * chunk, so that each part's payload hash is its chunk's SHA-256, unless
 * the file needs larger parts to stay within S3's 10000 (the file is the
 * image's data plus ~1% metadata at most: images above ~560 GiB). */
static size_t
part_size_for(uint64_t image_size, uint64_t chunk)
{
  uint64_t want = image_size / 9000 + 1;

  want = (want + ((1u << 20) - 1)) & ~(uint64_t)((1u << 20) - 1);
  return (size_t)MIN(MAX(want, chunk), (uint64_t)S3_PART_MAX);
}

static bool
new_s3(repo_wfile *f, const struct cbt_qcow2_writer_opts *wo, GError **error)
{
  g_autofree char *key = repo_s3_key(f->r, f->file);
  struct cbt_qcow2_writer_sink sink = { sink_data, sink_head, f };
  g_autofree char *why = NULL;
  size_t part_size = part_size_for(wo->size, f->chunk);
  int rc;

  f->name = g_strdup_printf("s3://%s/%s", repo_s3_bucket(f->r), key);
  f->up = s3_upload_new(repo_s3(f->r), repo_s3_bucket(f->r), key, part_size,
                        UPLOAD_JOBS, error);
  if (!f->up)
    return false;
  f->aligned = part_size == f->chunk && f->alg == CHUNK_SHA256;
  s3_upload_reserve_first(f->up, (size_t)f->chunk);
  f->hash = chunk_hash_new(f->alg);
  f->hex = g_ptr_array_new_with_free_func(g_free);
  g_ptr_array_add(f->hex, NULL);              /* chunk 0, the head */
  f->head = g_try_malloc(f->chunk);
  if (!f->head) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: out of memory", f->name);
    return false;
  }
  rc = cbt_qcow2_writer_create_sink(wo, &sink, &f->w, &why);
  if (rc < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", f->name,
                why ? why : g_strerror(-rc));
    return false;
  }
  f->end = cbt_qcow2_writer_cluster_size(f->w);
  return true;
}

static bool
commit_s3(repo_wfile *f, GPtrArray **sums, uint64_t *size, GError **error)
{
  g_autoptr(GPtrArray) hex = NULL;
  g_autofree char *why = NULL;
  size_t n0;
  int rc;

  rc = cbt_qcow2_writer_finish(f->w, &why);
  if (rc < 0) {
    if (!repo_wfile_check(f, error))
      return false;
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", f->name,
                why ? why : g_strerror(-rc));
    return false;
  }
  *size = f->end;
  n0 = (size_t)MIN(f->end, f->chunk);
  if (f->end > f->chunk && f->end % f->chunk != 0) {
    /* The short last chunk is the short last part. */
    char *last = chunk_hash_hex(f->hash);

    g_ptr_array_add(f->hex, last);
    if (f->aligned)
      s3_upload_part_sha256(f->up, last, (size_t)(f->end % f->chunk));
  }
  g_assert(f->hex->len == (f->end + f->chunk - 1) / f->chunk);
  g_ptr_array_index(f->hex, 0) = chunk_hash_data(f->alg, f->head, n0);
  hex = g_steal_pointer(&f->hex);
  if (!repo_lock_check(f->r, error) ||
      !s3_upload_finish_first(f->up, f->head, n0,
                              f->alg == CHUNK_SHA256 ? g_ptr_array_index(hex, 0) : NULL,
                              NULL, error))
    return false;
  g_clear_pointer(&f->head, g_free);
  f->committed = true;
  *sums = g_steal_pointer(&hex);
  return true;
}

/* --- the directory ------------------------------------------------------- */

static void
stream_cb(void *opaque, uint64_t offset, const void *buf, size_t len)
{
  sums_stream_feed(opaque, offset, buf, len);
}

static bool
new_dir(repo_wfile *f, const struct cbt_qcow2_writer_opts *wo, GError **error)
{
  g_autofree char *why = NULL;
  int rc;

  f->final = repo_path(f->r, f->file);
  f->partial = g_strconcat(f->final, REPO_PARTIAL_SUFFIX, NULL);
  f->name = g_strdup(f->partial);
  rc = cbt_qcow2_writer_create(f->partial, wo, &f->w, &why);
  if (rc < 0) {
    g_clear_pointer(&f->partial, g_free);   /* not ours to remove */
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", f->name,
                why ? why : g_strerror(-rc));
    return false;
  }
  cbt_qcow2_writer_set_stream(f->w, stream_cb, f->sums);
  /* Data goes to disk while the copy runs, not all in finish. */
  cbt_qcow2_writer_set_write_behind(f->w, WRITE_BEHIND);
  return true;
}

/* The manifest's checksums of the finished file @path: from @sums (every
 * chunk but the first, hashed as the writer wrote them) when @intact, the
 * first chunk read back; otherwise the whole file read back. */
static bool
file_checksums(enum chunk_alg alg, const char *path, sums_stream *sums, bool intact,
               uint64_t chunk, GPtrArray **out, uint64_t *size, GError **error)
{
  g_autofree char *why = NULL;
  g_autoptr(GPtrArray) hex = NULL;
  struct stat st;
  char *first;
  int fd;

  if (!intact || !sums_stream_intact(sums)) {
    cli_debug("%s: the file was not written in order: reading it back for the "
              "checksums", path);
    return repo_checksum_file(alg, path, chunk, out, size, error);
  }
  fd = cbt_open_regular(path, O_RDONLY | O_CLOEXEC, &st, &why);
  if (fd < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s", why);
    return false;
  }
  *size = (uint64_t)st.st_size;
  if (*size > chunk && sums_stream_pos(sums) != *size) {
    close(fd);
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %" PRIu64 " bytes, but %"
                PRIu64 " were written", path, *size, sums_stream_pos(sums));
    return false;
  }
  first = sums_range(alg, fd, path, 0, MIN(*size, chunk), error);
  close(fd);
  if (!first)
    return false;
  if (*size > chunk) {
    hex = sums_stream_end(sums);
    g_free(g_ptr_array_index(hex, 0));
    g_ptr_array_index(hex, 0) = first;
  } else {
    hex = g_ptr_array_new_with_free_func(g_free);
    g_ptr_array_add(hex, first);
  }
  *out = g_steal_pointer(&hex);
  return true;
}

static bool
commit_dir(repo_wfile *f, GPtrArray **sums, uint64_t *size, GError **error)
{
  g_autofree char *why = NULL;
  bool intact;
  int rc;

  rc = cbt_qcow2_writer_finish(f->w, &why);
  if (rc < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", f->partial,
                why ? why : g_strerror(-rc));
    return false;
  }
  intact = cbt_qcow2_writer_stream_intact(f->w);
  g_clear_pointer(&f->w, cbt_qcow2_writer_free);
  if (!file_checksums(f->alg, f->partial, f->sums, intact, f->chunk, sums, size, error))
    return false;
  if (rename(f->partial, f->final) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: rename to %s: %s", f->partial,
                f->final, g_strerror(errno));
    return false;
  }
  f->committed = true;
  g_free(f->name);
  f->name = g_strdup(f->final);
  return true;
}

/* --- the interface ------------------------------------------------------- */

bool
repo_wfile_new(repo *r, const char *file, const struct cbt_qcow2_writer_opts *wo,
               enum chunk_alg alg, repo_wfile **out, GError **error)
{
  g_autoptr(repo_wfile) f = g_new0(repo_wfile, 1);

  g_mutex_init(&f->err_lock);
  f->r = r;
  f->file = g_strdup(file);
  f->chunk = REPO_CHUNK_SIZE;
  f->alg = alg;
  if (!repo_is_s3(r))
    f->sums = sums_stream_new(alg, f->chunk, f->chunk);
  if (!(repo_is_s3(r) ? new_s3(f, wo, error) : new_dir(f, wo, error)))
    return false;
  *out = g_steal_pointer(&f);
  return true;
}

bool
repo_wfile_commit(repo_wfile *f, GPtrArray **sums, uint64_t *size, GError **error)
{
  g_assert(!f->committed);
  return repo_is_s3(f->r) ? commit_s3(f, sums, size, error)
                          : commit_dir(f, sums, size, error);
}

void
repo_wfile_keep(repo_wfile *f)
{
  g_assert(f->committed);
  f->kept = true;
}

void
repo_wfile_free(repo_wfile *f)
{
  g_autoptr(GError) err = NULL;

  if (!f)
    return;
  cbt_qcow2_writer_free(f->w);
  if (repo_is_s3(f->r)) {
    s3_upload_free(f->up);       /* aborts an unfinished upload */
    if (f->committed && !f->kept && !repo_delete_file(f->r, f->file, &err))
      cli_error("%s (the next backup removes it)", err->message);
  } else if (!f->kept) {
    const char *path = f->committed ? f->final : f->partial;

    if (path && unlink(path) < 0 && errno != ENOENT)
      cli_error("%s: cannot remove: %s (the next backup removes it)", path,
                g_strerror(errno));
  }
  sums_stream_free(f->sums);
  chunk_hash_free(f->hash);
  if (f->hex)
    g_ptr_array_unref(f->hex);
  g_free(f->head);
  g_clear_error(&f->error);
  g_mutex_clear(&f->err_lock);
  g_free(f->partial);
  g_free(f->final);
  g_free(f->name);
  g_free(f->file);
  g_free(f);
}
