/* Reading the files of a repository, wherever it is: a file of a
 * directory repository is read through its descriptor, an object of an
 * S3 repository (docs/s3.md) with ranged GETs.  cbt restore, verify,
 * mount and instant restore read backup files only through this.
 *
 * An rfile is one backup file, opened for reading: in a directory with
 * repo_open_file (a regular file inside the repository), on S3 with a
 * HEAD that gives its size and ETag.  A missing object is damage
 * (CLI_EXIT_DAMAGED): the manifest lists it, so the repository lost it.
 *
 * Reads are exact: rfile_pread either fills the whole buffer or fails.
 * On S3 each GET is checked against what the HEAD said: an object that
 * ends early, disappears or has another ETag (it was replaced, e.g. by a
 * writer that rewrote the repository under us; readers take no lock on
 * S3) is CLI_EXIT_DAMAGED naming the object and the range, so a reader
 * never mixes two versions of a file.
 *
 * Parallel reads: S3 gives its speed to many requests at once, not to one
 * (one connection of a GET moves a few hundred MB/s at best).  The fetch
 * pool is one process-wide GThreadPool of RFETCH_THREADS threads, each
 * running blocking ranged GETs on the repository's s3_client (thread-safe,
 * with a pool of kept-alive connections): stream.c hands it a piece to
 * read and gets the completion on a pool thread; chain-map.c and the
 * mount's cache read batches of ranges through rfile_read_ranges, which
 * waits for all of them.  Pool jobs never wait for other pool jobs, so
 * the pool cannot deadlock on itself.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/uring-io.h"
#include "repo.h"
#include "s3.h"

void
rfile_close(rfile *f)
{
  if (!f)
    return;
  if (f->fd >= 0)
    close(f->fd);
  g_free(f->name);
  g_free(f->bucket);
  g_free(f->key);
  g_free(f->etag);
  g_free(f);
}

rfile *
rfile_open(repo *r, const repo_backup *b, GError **error)
{
  g_autoptr(rfile) f = g_new0(rfile, 1);

  f->fd = -1;
  if (repo_is_s3(r)) {
    s3_object_info info = { 0 };
    g_autoptr(GError) err = NULL;

    f->s3 = repo_s3(r);
    f->bucket = g_strdup(repo_s3_bucket(r));
    f->key = repo_s3_key(r, b->file);
    f->name = g_strdup_printf("s3://%s/%s", f->bucket, f->key);
    if (!s3_head_object(f->s3, f->bucket, f->key, &info, &err)) {
      if (g_error_matches(err, S3_ERROR, S3_ERROR_NOT_FOUND))
        g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: missing (listed in the "
                    "manifest as backup %u)", f->name, b->seq);
      else
        g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s", err->message);
      return NULL;
    }
    f->size = info.size;
    f->etag = g_steal_pointer(&info.etag);
    s3_object_info_clear(&info);
  } else {
    struct stat st;

    f->name = repo_path(r, b->file);
    f->fd = repo_open_file(r, b->file, error);
    if (f->fd < 0)
      return NULL;
    if (fstat(f->fd, &st) < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", f->name, g_strerror(errno));
      return NULL;
    }
    f->size = (uint64_t)st.st_size;
    f->ino = (uint64_t)st.st_ino;
  }
  return g_steal_pointer(&f);
}

bool
rfile_pread(const rfile *f, void *buf, size_t len, uint64_t off, GError **error)
{
  g_autoptr(GError) err = NULL;
  s3_object_info info = { 0 };
  size_t got = 0;
  int r;

  if (len == 0)
    return true;
  if (!f->s3) {
    r = cbt_io_pread(f->fd, buf, len, off);
    if (r == -ENODATA)
      goto short_read;
    if (r < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: reading %zu bytes at offset %"
                  PRIu64 ": %s", f->name, len, off, g_strerror(-r));
      return false;
    }
    return true;
  }
  if (!s3_get_range(f->s3, f->bucket, f->key, off, len, buf, &got, &info, &err)) {
    if (g_error_matches(err, S3_ERROR, S3_ERROR_NOT_FOUND))
      g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: disappeared while being read "
                  "(bytes %" PRIu64 "..%" PRIu64 ")", f->name, off, off + len - 1);
    else
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s", err->message);
    return false;
  }
  if (got > 0 && f->etag && info.etag && strcmp(info.etag, f->etag) != 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: replaced while being read "
                "(ETag %s, was %s; bytes %" PRIu64 "..%" PRIu64 ")", f->name, info.etag,
                f->etag, off, off + len - 1);
    s3_object_info_clear(&info);
    return false;
  }
  s3_object_info_clear(&info);
  if (got == len)
    return true;

short_read:
  g_set_error(error, CLI_ERROR, CLI_EXIT_DAMAGED, "%s: ends before byte %" PRIu64
              " (reading bytes %" PRIu64 "..%" PRIu64 "): shorter than the manifest says",
              f->name, off + len - 1, off, off + len - 1);
  return false;
}

/* --- the fetch pool ------------------------------------------------------ */

struct fetch_job {
  const rfile *f;
  void *buf;
  size_t len;
  uint64_t off;
  void (*done)(void *opaque, GError *error);
  void *opaque;
};

static void
fetch_run(gpointer data, gpointer user_data)
{
  struct fetch_job *j = data;
  GError *err = NULL;

  (void)user_data;
  rfile_pread(j->f, j->buf, j->len, j->off, &err);
  j->done(j->opaque, err);
  g_free(j);
}

static GThreadPool *
fetch_pool(void)
{
  static gsize once;
  static GThreadPool *pool;

  if (g_once_init_enter(&once)) {
    pool = g_thread_pool_new(fetch_run, NULL, RFETCH_THREADS, FALSE, NULL);
    g_once_init_leave(&once, 1);
  }
  return pool;
}

void
rfile_fetch(const rfile *f, void *buf, size_t len, uint64_t off,
            void (*done)(void *opaque, GError *error), void *opaque)
{
  struct fetch_job *j = g_new0(struct fetch_job, 1);

  j->f = f;
  j->buf = buf;
  j->len = len;
  j->off = off;
  j->done = done;
  j->opaque = opaque;
  g_thread_pool_push(fetch_pool(), j, NULL);
}

/* A batch of reads waited for together. */
struct batch {
  GMutex lock;
  GCond cond;
  unsigned left;
  GError *error;                  /* the first failure */
};

static void
batch_done(void *opaque, GError *error)
{
  struct batch *b = opaque;

  g_mutex_lock(&b->lock);
  if (error && !b->error)
    b->error = error;
  else if (error)
    g_error_free(error);
  if (--b->left == 0)
    g_cond_signal(&b->cond);
  g_mutex_unlock(&b->lock);
}

bool
rfile_read_ranges(const rfile *f, const struct rfile_range *ranges, unsigned n,
                  GError **error)
{
  struct batch b = { .left = n };

  if (!f->s3 || n <= 1) {
    for (unsigned i = 0; i < n; i++)
      if (!rfile_pread(f, ranges[i].buf, ranges[i].len, ranges[i].off, error))
        return false;
    return true;
  }
  g_mutex_init(&b.lock);
  g_cond_init(&b.cond);
  for (unsigned i = 0; i < n; i++)
    rfile_fetch(f, ranges[i].buf, ranges[i].len, ranges[i].off, batch_done, &b);
  g_mutex_lock(&b.lock);
  while (b.left > 0)
    g_cond_wait(&b.cond, &b.lock);
  g_mutex_unlock(&b.lock);
  g_mutex_clear(&b.lock);
  g_cond_clear(&b.cond);
  if (b.error) {
    g_propagate_error(error, b.error);
    return false;
  }
  return true;
}
