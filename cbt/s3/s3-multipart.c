/* Multipart uploads: the five S3 calls, and a streaming uploader on top.
 *
 * An upload is created (POST ?uploads), parts are PUT by number in any
 * order and at the same time (PUT ?partNumber=N&uploadId=ID), and the
 * object appears, whole and at once, only when the upload is completed
 * with the list of part ETags (POST ?uploadId=ID).  Until then nothing is
 * visible under the key; an upload that is never completed keeps its
 * parts on the server until it is aborted (DELETE ?uploadId=ID), which is
 * why s3_mpu_list exists: a later run lists the uploads under its prefix
 * and aborts those a killed run left behind.
 *
 * Completing is the one call whose retry can see the effect of its own
 * first try: if the answer to a successful complete is lost, the retry
 * finds no such upload.  The object's ETag then tells whether it was
 * ours: S3 and RGW make a multipart object's ETag the MD5 of the parts'
 * binary MD5s (their ETags) followed by "-" and the number of parts.
 * A 200 answer to complete can also carry an <Error> (S3 documents it);
 * s3.c treats that as a failed try.
 *
 * The streaming uploader (s3_upload) cuts what it is given into parts
 * and hands each full part to a thread pool of @jobs threads, each
 * running one synchronous s3_mpu_put_part at a time on its own pooled
 * connection.  The writer blocks while @jobs parts are in flight, so
 * memory is (jobs + 1) * part_size whatever the object's size.  (Up to
 * @jobs more queued parts, to absorb a bursty writer, made no difference
 * measurable on the loaded test machine: not done.)  Buffers of finished
 * parts are reused.  The first part error is
 * kept and every later call returns it; finishing or freeing a failed
 * upload aborts it.
 *
 * An object whose beginning comes last (s3_upload_reserve_first)
 * reserves the part numbers 1..n for it, and sends it at the end as n
 * parts of at least part_size (n <= FIRST_PARTS), through the pool like
 * the others.  A backup's parts are its checksum chunks (64 MiB), so its
 * head is part 1 alone and n is 1.  The numbers it does not need stay
 * unused (complete skips them).
 *
 * Payload hashes: over http:// every part is signed with its SHA-256.
 * A writer that hashed the part already (a backup: each part is one
 * checksum chunk) hands that hash over (s3_upload_part_sha256, and
 * finish_first's @first_sha256); it goes with the part to its thread
 * and into the request, so the client does not read the 64 MiB again.
 * A part of another length than the hash was given for is hashed as
 * usual.
 *
 * Locking: u->lock protects inflight, next_part's ETag slot, the free
 * buffers and the first error; the writer is the only thread touching
 * cur/cur_len/upload_id.
 */
#include <inttypes.h>
#include <string.h>

#include "msg.h"
#include "s3.h"

/* ---- the five calls -------------------------------------------------- */

bool
s3_mpu_create(s3_client *c, const char *bucket, const char *key, char **upload_id,
              GError **error)
{
  g_autofree char *query = s3_query("uploads", "", NULL);
  s3_request r = { .op = "create multipart upload", .method = "POST", .bucket = bucket,
                   .key = key, .query = query };
  GError *err = NULL;
  bool ok = s3_perform(c, &r, error);

  if (ok && !s3_xml_upload_id((const char *)r.body_out->data, r.body_out->len, upload_id,
                              &err)) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                "S3 create multipart upload s3://%s/%s: %s", bucket, key, err->message);
    g_error_free(err);
    ok = false;
  }
  s3_request_clear(&r);
  return ok;
}

bool
s3_mpu_put_part(s3_client *c, const char *bucket, const char *key, const char *upload_id,
                guint part, const void *data, size_t len, char **etag, GError **error)
{
  return s3_mpu_put_part_sha256(c, bucket, key, upload_id, part, data, len, NULL, etag,
                                error);
}

bool
s3_mpu_put_part_sha256(s3_client *c, const char *bucket, const char *key,
                       const char *upload_id, guint part, const void *data, size_t len,
                       const char *payload_sha256, char **etag, GError **error)
{
  g_autofree char *num = g_strdup_printf("%u", part);
  g_autofree char *op = g_strdup_printf("upload part %u", part);
  g_autofree char *query = s3_query("partNumber", num, "uploadId", upload_id, NULL);
  /* A part begun after the cancel is not sent: the grace is for the
   * cleanup (s3_client_set_cancel). */
  s3_request r = { .op = op, .method = "PUT", .bucket = bucket, .key = key,
                   .query = query, .body = data, .body_len = len,
                   .payload_sha256 = payload_sha256, .no_grace = true };
  bool ok;

  if (part < 1 || part > S3_MAX_PARTS || len > S3_PART_MAX) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3 upload part %u of s3://%s/%s: part number or size (%zu) out of range",
                part, bucket, key, len);
    return false;
  }
  ok = s3_perform(c, &r, error);
  if (ok && (!r.info.etag || !*r.info.etag)) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                "S3 upload part %u of s3://%s/%s: no ETag in the answer", part, bucket, key);
    ok = false;
  }
  if (ok)
    *etag = g_strdup(r.info.etag);
  s3_request_clear(&r);
  return ok;
}

/* The ETag S3 gives the object completed from parts with @etags: hex MD5
 * of their binary MD5s, "-", their number.  NULL if an ETag is not an
 * MD5 (servers with some kinds of encryption). */
static char *
multipart_etag(GPtrArray *etags)
{
  g_autoptr(GChecksum) sum = g_checksum_new(G_CHECKSUM_MD5);
  guint parts = 0;

  for (guint i = 0; i < etags->len; i++) {
    const char *e = g_ptr_array_index(etags, i);
    guint8 md5[16];

    if (!e)
      continue;             /* a part number left unused */
    if (strlen(e) != 32)
      return NULL;
    for (guint j = 0; j < 16; j++) {
      int hi = g_ascii_xdigit_value(e[2 * j]), lo = g_ascii_xdigit_value(e[2 * j + 1]);

      if (hi < 0 || lo < 0)
        return NULL;
      md5[j] = (guint8)(hi << 4 | lo);
    }
    g_checksum_update(sum, md5, sizeof md5);
    parts++;
  }
  return g_strdup_printf("%s-%u", g_checksum_get_string(sum), parts);
}

bool
s3_mpu_complete(s3_client *c, const char *bucket, const char *key, const char *upload_id,
                GPtrArray *etags, char **etag, GError **error)
{
  g_autofree char *query = s3_query("uploadId", upload_id, NULL);
  GString *body = g_string_new("<CompleteMultipartUpload>");
  s3_request r = { .op = "complete multipart upload", .method = "POST", .bucket = bucket,
                   .key = key, .query = query, .error_in_200 = true };
  GError *err = NULL;
  bool ok;

  for (guint i = 0; i < etags->len; i++) {
    g_autofree char *e = NULL;

    if (!g_ptr_array_index(etags, i))
      continue;             /* S3 allows gaps in the part numbers */
    e = g_markup_escape_text(g_ptr_array_index(etags, i), -1);
    g_string_append_printf(body, "<Part><PartNumber>%u</PartNumber><ETag>\"%s\"</ETag>"
                           "</Part>", i + 1, e);
  }
  g_string_append(body, "</CompleteMultipartUpload>");
  r.body = body->str;
  r.body_len = body->len;
  ok = s3_perform(c, &r, &err);
  if (!ok && err->code == S3_ERROR_NOT_FOUND && r.attempts > 1) {
    /* Maybe our first try completed it and its answer was lost. */
    g_autofree char *want = multipart_etag(etags);
    s3_object_info info = { 0 };

    if (want && s3_head_object(c, bucket, key, &info, NULL) && info.etag &&
        strcmp(info.etag, want) == 0) {
      g_clear_error(&err);
      *etag = g_strdup(want);
      s3_object_info_clear(&info);
      s3_request_clear(&r);
      g_string_free(body, TRUE);
      return true;
    }
    s3_object_info_clear(&info);
  }
  if (ok && !s3_xml_complete((const char *)r.body_out->data, r.body_out->len, etag, &err)) {
    g_prefix_error(&err, "S3 complete multipart upload s3://%s/%s: ", bucket, key);
    ok = false;
  }
  if (ok && !**etag) {
    /* RGW 16 answers <ETag></ETag>; the object has the usual one. */
    s3_object_info info = { 0 };

    g_free(*etag);
    *etag = multipart_etag(etags);
    if (!*etag && s3_head_object(c, bucket, key, &info, NULL))
      *etag = g_strdup(info.etag ? info.etag : "");
    if (!*etag)
      *etag = g_strdup("");
    s3_object_info_clear(&info);
  }
  if (err)
    g_propagate_error(error, err);
  s3_request_clear(&r);
  g_string_free(body, TRUE);
  return ok;
}

bool
s3_mpu_abort(s3_client *c, const char *bucket, const char *key, const char *upload_id,
             GError **error)
{
  g_autofree char *query = s3_query("uploadId", upload_id, NULL);
  s3_request r = { .op = "abort multipart upload", .method = "DELETE", .bucket = bucket,
                   .key = key, .query = query };

  /* Gone already (aborted, or completed by a run we cannot tell from
   * ours): nothing is left to clean. */
  return s3_perform_delete(c, &r, error);
}

bool
s3_mpu_list(s3_client *c, const char *bucket, const char *prefix, GPtrArray **uploads,
            GError **error)
{
  g_autoptr(GPtrArray) all =
    g_ptr_array_new_with_free_func((GDestroyNotify)s3_upload_entry_free);
  g_autofree char *key_marker = NULL;
  g_autofree char *id_marker = NULL;
  bool more;

  do {
    g_autofree char *query = s3_query("uploads", "", "prefix", prefix, "encoding-type",
                                      "url", "key-marker", key_marker, "upload-id-marker",
                                      id_marker, NULL);
    s3_request r = { .op = "list multipart uploads", .method = "GET", .bucket = bucket,
                     .query = query };
    s3_uploads_page page = { 0 };
    GError *err = NULL;

    if (!s3_perform(c, &r, error)) {
      s3_request_clear(&r);
      return false;
    }
    if (!s3_xml_list_uploads((const char *)r.body_out->data, r.body_out->len, true, &page,
                             &err)) {
      g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                  "S3 list multipart uploads s3://%s/%s: %s", bucket, prefix, err->message);
      g_error_free(err);
      s3_request_clear(&r);
      return false;
    }
    s3_request_clear(&r);
    /* Only those under @prefix (s3_key_under); the rest is freed with
     * the page. */
    for (guint i = 0; i < page.uploads->len; i++) {
      const s3_upload_entry *u = g_ptr_array_index(page.uploads, i);

      if (s3_listed_key_ok(bucket, prefix, u->key))
        g_ptr_array_add(all, g_steal_pointer(&page.uploads->pdata[i]));
    }
    more = page.truncated;
    if (more && !page.next_key_marker) {
      g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                  "S3 list multipart uploads s3://%s/%s: truncated without a next marker",
                  bucket, prefix);
      s3_uploads_page_clear(&page);
      return false;
    }
    g_free(key_marker);
    g_free(id_marker);
    key_marker = g_steal_pointer(&page.next_key_marker);
    id_marker = g_steal_pointer(&page.next_upload_id_marker);
    s3_uploads_page_clear(&page);
  } while (more);
  *uploads = g_steal_pointer(&all);
  return true;
}

/* ---- the streaming uploader ------------------------------------------ */

static void abort_upload(s3_upload *u);
static void wait_idle(s3_upload *u);

/* Part numbers reserved for the beginning sent last. */
#define FIRST_PARTS 16u

struct s3_upload {
  s3_client *c;
  char *bucket;
  char *key;
  size_t part_size;
  guint jobs;
  GThreadPool *pool;

  /* The writer's. */
  char *upload_id;          /* NULL until the first part goes out */
  guint8 *cur;              /* the part being filled */
  size_t cur_len;
  bool done;                /* finished or aborted: nothing more to do */
  bool first_reserved;      /* part 1 comes last (s3_upload_reserve_first) */
  guint first_parts;        /* the part numbers reserved for it */
  char *cur_sha256;         /* SHA-256 of the part being filled, when it */
  size_t cur_sha256_len;    /* is this long (s3_upload_part_sha256) */

  GMutex lock;
  GCond cond;
  guint inflight;
  guint next_part;          /* number of the next part to send, from 1 */
  GPtrArray *etags;         /* [part - 1], filled as parts finish */
  GPtrArray *spare;         /* part buffers to reuse */
  GError *error;            /* the first part error */
};

struct part_task {
  guint part;
  const guint8 *data;
  size_t len;
  guint8 *buf;              /* data's part buffer, or NULL: the caller's */
  char *sha256;             /* SHA-256 of data, hex, or NULL: hash it */
};

static void
upload_part(gpointer data, gpointer user)
{
  struct part_task *t = data;
  s3_upload *u = user;
  char *etag = NULL;
  GError *err = NULL;
  bool ok;

  ok = s3_mpu_put_part_sha256(u->c, u->bucket, u->key, u->upload_id, t->part, t->data,
                              t->len, t->sha256, &etag, &err);
  g_mutex_lock(&u->lock);
  if (ok)
    u->etags->pdata[t->part - 1] = etag;
  else if (!u->error)
    u->error = g_steal_pointer(&err);
  if (t->buf)
    g_ptr_array_add(u->spare, t->buf);
  u->inflight--;
  g_cond_broadcast(&u->cond);
  g_mutex_unlock(&u->lock);
  g_clear_error(&err);
  g_free(t->sha256);
  g_free(t);
}

s3_upload *
s3_upload_new(s3_client *c, const char *bucket, const char *key, size_t part_size,
              guint jobs, GError **error)
{
  s3_upload *u;
  GError *err = NULL;

  if (part_size < S3_PART_MIN || part_size > S3_PART_MAX || jobs < 1 || jobs > 64) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3 upload s3://%s/%s: part size %zu outside 5 MiB..5 GiB or %u jobs "
                "outside 1..64", bucket, key, part_size, jobs);
    return NULL;
  }
  u = g_new0(s3_upload, 1);
  u->c = c;
  u->bucket = g_strdup(bucket);
  u->key = g_strdup(key);
  u->part_size = part_size;
  u->jobs = jobs;
  u->next_part = 1;
  u->cur = g_malloc(part_size);
  u->etags = g_ptr_array_new_with_free_func(g_free);
  u->spare = g_ptr_array_new_with_free_func(g_free);
  g_mutex_init(&u->lock);
  g_cond_init(&u->cond);
  u->pool = g_thread_pool_new(upload_part, u, (gint)jobs, FALSE, &err);
  if (!u->pool) {
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3 upload s3://%s/%s: threads: %s",
                bucket, key, err->message);
    g_error_free(err);
    u->done = true;
    s3_upload_free(u);
    return NULL;
  }
  return u;
}

const char *
s3_upload_id(const s3_upload *u)
{
  return u->upload_id;
}

/* The first part error, copied into @error, or true if none. */
static bool
no_error(s3_upload *u, GError **error)
{
  bool ok;

  g_mutex_lock(&u->lock);
  ok = !u->error;
  if (!ok)
    g_propagate_error(error, g_error_copy(u->error));
  g_mutex_unlock(&u->lock);
  return ok;
}

/* Queue part @part of @len bytes at @data once there is room.  @buf is
 * the part buffer @data is in, which goes back to the spares, or NULL:
 * @data is the caller's and stays valid until wait_idle.  @sha256 (may
 * be NULL) is @data's SHA-256, hex, copied.  Called with u->lock held;
 * fails with the first part error. */
static bool
push_part(s3_upload *u, guint part, const guint8 *data, size_t len, guint8 *buf,
          const char *sha256, GError **error)
{
  struct part_task *t;

  while (u->inflight >= u->jobs && !u->error)
    g_cond_wait(&u->cond, &u->lock);
  if (u->error) {
    g_propagate_error(error, g_error_copy(u->error));
    return false;
  }
  t = g_new0(struct part_task, 1);
  t->part = part;
  t->data = data;
  t->len = len;
  t->buf = buf;
  t->sha256 = g_strdup(sha256);
  if (u->etags->len < part)
    g_ptr_array_set_size(u->etags, (gint)part);
  u->inflight++;
  g_thread_pool_push(u->pool, t, NULL);
  return true;
}

/* Hand the current part to the pool and start a new one. */
static bool
submit(s3_upload *u, GError **error)
{
  g_autofree char *sha256 = g_steal_pointer(&u->cur_sha256);

  if (!u->upload_id && !s3_mpu_create(u->c, u->bucket, u->key, &u->upload_id, error))
    return false;
  if (u->next_part > S3_MAX_PARTS) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3 upload s3://%s/%s: more than %u parts of %zu bytes; use larger parts",
                u->bucket, u->key, S3_MAX_PARTS, u->part_size);
    return false;
  }
  if (sha256 && u->cur_sha256_len != u->cur_len) {
    cli_debug("S3 upload s3://%s/%s: part %u has %zu bytes, its hash was for %zu: "
              "hashing it again", u->bucket, u->key, u->next_part, u->cur_len,
              u->cur_sha256_len);
    g_clear_pointer(&sha256, g_free);
  }
  g_mutex_lock(&u->lock);
  if (!push_part(u, u->next_part, u->cur, u->cur_len, u->cur, sha256, error)) {
    g_mutex_unlock(&u->lock);
    return false;
  }
  u->next_part++;
  u->cur = u->spare->len ? g_ptr_array_steal_index_fast(u->spare, u->spare->len - 1) : NULL;
  g_mutex_unlock(&u->lock);
  if (!u->cur)
    u->cur = g_malloc(u->part_size);
  u->cur_len = 0;
  return true;
}

void
s3_upload_part_sha256(s3_upload *u, const char *hex, size_t len)
{
  g_free(u->cur_sha256);
  u->cur_sha256 = g_strdup(hex);
  u->cur_sha256_len = len;
}

/* How many parts the first @len bytes are cut into: at least part_size
 * each (so at least S3_PART_MIN: none of them is the object's last
 * part), FIRST_PARTS at most. */
static guint
first_parts(const s3_upload *u, size_t len)
{
  return (guint)MIN((size_t)FIRST_PARTS, MAX((size_t)1, len / u->part_size));
}

void
s3_upload_reserve_first(s3_upload *u, size_t max_first)
{
  g_assert(u->next_part == 1 && u->cur_len == 0);
  u->first_reserved = true;
  u->first_parts = first_parts(u, max_first);
  u->next_part = u->first_parts + 1;
}

bool
s3_upload_finish_first(s3_upload *u, const void *first, size_t len,
                       const char *first_sha256, char **etag, GError **error)
{
  g_autofree char *tag = NULL;
  guint n;
  size_t piece;
  bool ok = true;

  g_assert(u->first_reserved);
  if (u->done) {
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3 upload s3://%s/%s: already ended",
                u->bucket, u->key);
    return false;
  }
  if (!u->upload_id && u->cur_len == 0) {
    /* Nothing after the first part: one PUT. */
    u->done = true;
    return s3_put_object(u->c, u->bucket, u->key, first, len, NULL, etag, error);
  }
  if (len < S3_PART_MIN) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3 upload s3://%s/%s: a first part of %zu bytes is below the minimum "
                "part size", u->bucket, u->key, len);
    abort_upload(u);
    return false;
  }
  if (u->cur_len > 0 && !submit(u, error)) {
    abort_upload(u);
    return false;
  }
  /* Parts 1..n, the last one taking the rest.  One part is @first
   * whole, and its hash is @first_sha256. */
  n = MIN(first_parts(u, len), u->first_parts);
  piece = len / n;
  g_mutex_lock(&u->lock);
  for (guint i = 0; i < n && ok; i++)
    ok = push_part(u, i + 1, (const guint8 *)first + (size_t)i * piece,
                   i + 1 < n ? piece : len - (size_t)i * piece, NULL,
                   n == 1 ? first_sha256 : NULL, error);
  g_mutex_unlock(&u->lock);
  /* Also on failure: no part may still read @first when we return. */
  wait_idle(u);
  if (!ok) {
    abort_upload(u);
    return false;
  }
  if (!no_error(u, error) ||
      !s3_mpu_complete(u->c, u->bucket, u->key, u->upload_id, u->etags, &tag, error)) {
    abort_upload(u);
    return false;
  }
  u->done = true;
  if (etag)
    *etag = g_steal_pointer(&tag);
  return true;
}

bool
s3_upload_write(s3_upload *u, const void *data, size_t len, GError **error)
{
  const guint8 *p = data;

  if (u->done) {
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3 upload s3://%s/%s: already ended",
                u->bucket, u->key);
    return false;
  }
  if (!no_error(u, error))
    return false;
  while (len > 0) {
    size_t n = MIN(len, u->part_size - u->cur_len);

    memcpy(u->cur + u->cur_len, p, n);
    u->cur_len += n;
    p += n;
    len -= n;
    if (u->cur_len == u->part_size && !submit(u, error))
      return false;
  }
  return true;
}

static void
wait_idle(s3_upload *u)
{
  g_mutex_lock(&u->lock);
  while (u->inflight > 0)
    g_cond_wait(&u->cond, &u->lock);
  g_mutex_unlock(&u->lock);
}

/* Abort the multipart upload, if there is one.  Its failure is not
 * reported: the upload then stays listed for a later run to abort. */
static void
abort_upload(s3_upload *u)
{
  GError *err = NULL;

  wait_idle(u);
  if (u->upload_id && !s3_mpu_abort(u->c, u->bucket, u->key, u->upload_id, &err)) {
    cli_debug("%s (the upload stays until it is aborted)", err->message);
    g_error_free(err);
  }
  u->done = true;
}

bool
s3_upload_finish(s3_upload *u, char **etag, GError **error)
{
  g_autofree char *tag = NULL;
  bool ok;

  if (u->done) {
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3 upload s3://%s/%s: already ended",
                u->bucket, u->key);
    return false;
  }
  g_assert(!u->first_reserved);
  if (!u->upload_id) {
    /* Smaller than one part: one PUT. */
    u->done = true;
    return s3_put_object(u->c, u->bucket, u->key, u->cur, u->cur_len, NULL, etag, error);
  }
  /* The last part may be short. */
  if (u->cur_len > 0 && !submit(u, error)) {
    abort_upload(u);
    return false;
  }
  wait_idle(u);
  if (!no_error(u, error)) {
    abort_upload(u);
    return false;
  }
  ok = s3_mpu_complete(u->c, u->bucket, u->key, u->upload_id, u->etags, &tag, error);
  if (!ok) {
    abort_upload(u);
    return false;
  }
  u->done = true;
  if (etag)
    *etag = g_steal_pointer(&tag);
  return true;
}

void
s3_upload_free(s3_upload *u)
{
  if (!u)
    return;
  if (!u->done)
    abort_upload(u);
  if (u->pool)
    g_thread_pool_free(u->pool, FALSE, TRUE);
  g_free(u->cur);
  g_free(u->cur_sha256);
  g_ptr_array_unref(u->etags);
  g_ptr_array_unref(u->spare);
  g_clear_error(&u->error);
  g_mutex_clear(&u->lock);
  g_cond_clear(&u->cond);
  g_free(u->upload_id);
  g_free(u->bucket);
  g_free(u->key);
  g_free(u);
}
