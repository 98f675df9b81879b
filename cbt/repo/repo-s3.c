/* A backup repository in an S3 bucket: s3://BUCKET/PREFIX.
 *
 * The layout is the directory's (repo.c) with PREFIX/ in place of DIR/:
 *   PREFIX/manifest.json                      the list of backups
 *   PREFIX/000001-full-20250102T030405Z.qcow2 the backup files
 *   PREFIX/lock                               the writer's lock (s3-lock.c)
 * An empty PREFIX (s3://BUCKET) puts them at the top of the bucket.
 * docs/s3.md describes it for users.
 *
 * Consistency without rename or fsync: a backup file is uploaded whole
 * (a multipart upload that becomes visible only when completed, see
 * repo-s3-write.c) before the manifest that lists it is written, and the
 * manifest is written with one PUT, which S3 makes visible atomically.
 * So a reader sees the old manifest or the new one, and every file a
 * manifest lists is complete.  A failed or killed backup leaves an
 * incomplete multipart upload or an unlisted object whose seq is >=
 * next-seq; the next writer removes both under the lock
 * (repo_s3_clean_stale), as repo_clean_stale does in a directory.
 *
 * Locking: an exclusive open takes PREFIX/lock (an S3 lock object with
 * an owner and a ttl, s3-lock.c) with S3_LOCK_PROCESS, so a lock left by
 * a killed cbt on this host is taken over at once, and a thread rewrites
 * it every ttl/4.  If the lock is taken over by another writer (ours
 * expired: the refresh failed for too long) or cannot be refreshed for
 * 3/4 of the ttl, it is "lost": repo_s3_lock_check reports it, the
 * backup stops, and the manifest is never written, because
 * repo_s3_put_manifest refreshes the lock (under the same mutex) right
 * before its PUT.  There are no shared locks on S3: readers read without
 * one (a prune running at the same time can delete a file a restore
 * reads; the restore then fails cleanly with "not found").
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "repo.h"
#include "s3.h"

#define LOCK_NAME        "lock"
#define LOCK_TTL_DEFAULT 60u          /* seconds; CBT_S3_LOCK_TTL (tests) */

struct repo_s3 {
  s3_client *c;
  char *bucket;
  char *prefix;                 /* "" or without a final '/' */

  /* The writer's lock and its refresher (exclusive opens only). */
  GMutex lock_mutex;            /* the s3_lock, lost, stop */
  GCond lock_cond;
  s3_lock *lock;
  GThread *refresher;
  bool stop;
  GError *lost;                 /* why the lock is no longer ours */
  gint lost_flag;               /* atomic: lost is set (read without the mutex) */
  guint ttl;
};

bool
repo_is_s3(const repo *r)
{
  return r && r->s3;
}

s3_client *
repo_s3(const repo *r)
{
  return r && r->s3 ? r->s3->c : NULL;
}

const char *
repo_s3_bucket(const repo *r)
{
  return r && r->s3 ? r->s3->bucket : NULL;
}

char *
repo_s3_key(const repo *r, const char *file)
{
  const char *p = r->s3->prefix;

  return *p ? g_strconcat(p, "/", file, NULL) : g_strdup(file);
}

/* --- the lock ----------------------------------------------------------- */

static gpointer
refresher_main(gpointer opaque)
{
  struct repo_s3 *s = opaque;
  const gint64 period = (gint64)s->ttl * G_TIME_SPAN_SECOND / 4;
  gint64 last_ok = g_get_monotonic_time();

  g_mutex_lock(&s->lock_mutex);
  while (!s->stop && !s->lost) {
    gint64 until = g_get_monotonic_time() + period;
    GError *err = NULL;

    while (!s->stop && g_cond_wait_until(&s->lock_cond, &s->lock_mutex, until))
      ;
    if (s->stop)
      break;
    if (s3_lock_refresh(s->lock, &err)) {
      last_ok = g_get_monotonic_time();
      continue;
    }
    if (err->code == S3_ERROR_LOCKED ||
        g_get_monotonic_time() - last_ok > (gint64)s->ttl * G_TIME_SPAN_SECOND * 3 / 4) {
      g_prefix_error(&err, "the repository lock is lost: ");
      cli_debug("%s", err->message);   /* the backup reports it when it stops */
      s->lost = err;
      g_atomic_int_set(&s->lost_flag, 1);
    } else {
      cli_debug("%s (trying again in %u s)", err->message, s->ttl / 4);
      g_error_free(err);
    }
  }
  g_mutex_unlock(&s->lock_mutex);
  return NULL;
}

static bool
take_lock(repo *r, GError **error)
{
  struct repo_s3 *s = r->s3;
  g_autofree char *key = repo_s3_key(r, LOCK_NAME);
  g_autofree char *note = g_strdup_printf("cbt backup of %s", r->dir);
  const char *v = g_getenv("CBT_S3_LOCK_TTL");
  guint64 ttl = LOCK_TTL_DEFAULT;

  if (v && *v && !g_ascii_string_to_unsigned(v, 10, 4, 86400, &ttl, NULL)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "CBT_S3_LOCK_TTL='%s': not a number of seconds from 4 to 86400", v);
    return false;
  }
  s->ttl = (guint)ttl;
  if (!s3_lock_acquire_flags(s->c, s->bucket, key, s->ttl, note, S3_LOCK_PROCESS,
                             &s->lock, error))
    return false;
  s->refresher = g_thread_new("s3-lock", refresher_main, s);
  return true;
}

bool
repo_s3_lock_check(repo *r, GError **error)
{
  struct repo_s3 *s = r->s3;
  bool ok = true;

  /* The data path calls this for every piece: no waiting on the mutex,
   * which a refresh holds for a round trip, unless the lock is lost. */
  if (!s || !s->lock || !g_atomic_int_get(&s->lost_flag))
    return true;
  g_mutex_lock(&s->lock_mutex);
  if (s->lost) {
    g_propagate_error(error, g_error_copy(s->lost));
    ok = false;
  }
  g_mutex_unlock(&s->lock_mutex);
  return ok;
}

void
repo_s3_free(struct repo_s3 *s)
{
  if (!s)
    return;
  if (s->refresher) {
    g_mutex_lock(&s->lock_mutex);
    s->stop = true;
    g_cond_broadcast(&s->lock_cond);
    g_mutex_unlock(&s->lock_mutex);
    g_thread_join(s->refresher);
  }
  if (s->lock) {
    g_autoptr(GError) err = NULL;

    if (!s->lost && !s3_lock_release(s->lock, &err))
      cli_error("%s (a later writer on this host takes it over; elsewhere it expires "
                "in %u s)", err->message, s->ttl);
    s3_lock_free(s->lock);
  }
  g_clear_error(&s->lost);
  g_mutex_clear(&s->lock_mutex);
  g_cond_clear(&s->lock_cond);
  s3_client_free(s->c);
  g_free(s->bucket);
  g_free(s->prefix);
  g_free(s);
}

/* --- open --------------------------------------------------------------- */

static bool
load_manifest(repo *r, bool create, GError **error)
{
  struct repo_s3 *s = r->s3;
  g_autofree char *key = repo_s3_key(r, REPO_MANIFEST);
  g_autofree char *where = g_strdup_printf("s3://%s/%s", s->bucket, key);
  g_autoptr(GBytes) data = NULL;
  GError *err = NULL;
  gsize len;
  const char *text;

  if (!s3_get_object(s->c, s->bucket, key, REPO_MANIFEST_MAX, &data, NULL, &err)) {
    if (err->code != S3_ERROR_NOT_FOUND) {
      g_propagate_error(error, err);
      return false;
    }
    g_error_free(err);
    if (create)
      return true;
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: not a backup repository (no " REPO_MANIFEST ")", r->dir);
    return false;
  }
  text = g_bytes_get_data(data, &len);
  return repo_parse_manifest(r, text, len, where, error);
}

bool
repo_s3_open(repo *r, const char *url, enum repo_lock lock, bool create, GError **error)
{
  g_autofree char *bucket = NULL;
  g_autofree char *prefix = NULL;
  struct repo_s3 *s;
  size_t n;

  if (!s3_url_parse(url, &bucket, &prefix, error))
    return false;
  n = strlen(prefix);
  while (n > 0 && prefix[n - 1] == '/')
    prefix[--n] = '\0';
  if (strstr(prefix, "//") || prefix[0] == '/') {
    g_set_error(error, CLI_ERROR, CLI_EXIT_USAGE, "%s: empty component in the prefix", url);
    return false;
  }
  s = g_new0(struct repo_s3, 1);
  g_mutex_init(&s->lock_mutex);
  g_cond_init(&s->lock_cond);
  s->bucket = g_steal_pointer(&bucket);
  s->prefix = g_steal_pointer(&prefix);
  r->s3 = s;
  r->dir = *s->prefix ? g_strdup_printf("s3://%s/%s", s->bucket, s->prefix)
                      : g_strdup_printf("s3://%s", s->bucket);
  if (!cli_s3_client(&s->c, error))
    return false;
  /* Lock first, so the manifest we read is the one we may replace. */
  if (lock == REPO_LOCK_EXCLUSIVE && !take_lock(r, error))
    return false;
  return load_manifest(r, create, error);
}

/* --- writing ------------------------------------------------------------ */

bool
repo_s3_put_manifest(repo *r, const char *text, GError **error)
{
  struct repo_s3 *s = r->s3;
  g_autofree char *key = repo_s3_key(r, REPO_MANIFEST);
  bool ok;

  g_assert(s->lock);
  /* Ours right now, so no writer that took over an expired lock of ours
   * can have written a manifest we would overwrite. */
  g_mutex_lock(&s->lock_mutex);
  if (s->lost) {
    g_propagate_error(error, g_error_copy(s->lost));
    ok = false;
  } else {
    GError *err = NULL;

    ok = s3_lock_refresh(s->lock, &err);
    if (!ok && err->code == S3_ERROR_LOCKED) {
      g_prefix_error(&err, "the repository lock is lost: ");
      s->lost = g_error_copy(err);
      g_atomic_int_set(&s->lost_flag, 1);
    }
    if (!ok)
      g_propagate_error(error, err);
  }
  if (ok)
    ok = s3_put_object(s->c, s->bucket, key, text, strlen(text), NULL, NULL, error);
  g_mutex_unlock(&s->lock_mutex);
  return ok;
}

/* "000123-...qcow2": a backup file name, *@seq its number. */
static bool
backup_name(const char *name, unsigned *seq)
{
  return g_str_has_suffix(name, ".qcow2") && !strchr(name, '/') &&
         sscanf(name, "%6u-", seq) == 1;
}

bool
repo_s3_clean_stale(repo *r, GError **error)
{
  struct repo_s3 *s = r->s3;
  g_autofree char *pfx = *s->prefix ? g_strconcat(s->prefix, "/", NULL) : g_strdup("");
  g_autoptr(GPtrArray) uploads = NULL;
  g_autoptr(GPtrArray) entries = NULL;

  g_assert(s->lock);
  /* The listings hold only keys under PREFIX/ (s3_list and s3_mpu_list
   * drop the rest): what is deleted here never lies outside the
   * repository, whatever the server answers. */
  if (!s3_mpu_list(s->c, s->bucket, pfx, &uploads, error))
    return false;
  for (guint i = 0; i < uploads->len; i++) {
    const s3_upload_entry *u = g_ptr_array_index(uploads, i);
    const char *name = s3_key_under(u->key, pfx);
    unsigned seq;

    if (!name || !backup_name(name, &seq))
      continue;
    if (!s3_mpu_abort(s->c, s->bucket, u->key, u->upload_id, error))
      return false;
    cli_note("s3://%s/%s: aborted an upload left by a backup that did not finish "
             "(started %s)", s->bucket, u->key, u->initiated ? u->initiated : "?");
  }
  if (!s3_list(s->c, s->bucket, pfx, "/", 0, &entries, NULL, error))
    return false;
  for (guint i = 0; i < entries->len; i++) {
    const s3_entry *e = g_ptr_array_index(entries, i);
    const char *name = s3_key_under(e->key, pfx);
    const char *why;
    unsigned seq;

    if (!name || !backup_name(name, &seq) || repo_listed(r, name) || !(why = repo_stale_reason(r, seq)))
      continue;
    if (!s3_delete_object(s->c, s->bucket, e->key, error))
      return false;
    cli_note("s3://%s/%s: removed (%s)", s->bucket, e->key, why);
  }
  return true;
}

bool
repo_s3_delete_file(repo *r, const char *file, GError **error)
{
  g_autofree char *key = repo_s3_key(r, file);

  return s3_delete_object(r->s3->c, r->s3->bucket, key, error);
}

static void
s3_close(repo *r)
{
  repo_s3_free(r->s3);
  r->s3 = NULL;
}

const struct repo_backend repo_s3_backend = {
  .name = "S3",
  .open = repo_s3_open,
  .close = s3_close,
  .put_manifest = repo_s3_put_manifest,
  .clean_stale = repo_s3_clean_stale,
  .lock_check = repo_s3_lock_check,
  .delete_file = repo_s3_delete_file,
};
