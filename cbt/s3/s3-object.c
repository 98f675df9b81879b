/* The S3 operations on objects that are one request each: PUT (also
 * conditional), GET (whole, bounded; or a byte range into the caller's
 * buffer), HEAD, DELETE, create bucket, and LIST (ListObjectsV2, page
 * after page until the listing is complete).  A listed key outside the
 * prefix asked for is dropped with a note (s3_key_under tells): callers
 * delete what they list, and must not be led outside their prefix.
 *
 * Each builds an s3_request, lets s3.c send it (signed, retried) and
 * turns the answer into what s3.h promises.  Multipart uploads are in
 * s3-multipart.c, the lock in s3-lock.c.
 */
#include <inttypes.h>
#include <string.h>

#include "msg.h"
#include "s3.h"

bool
s3_put_object(s3_client *c, const char *bucket, const char *key, const void *data,
              size_t len, const s3_put_cond *cond, char **etag, GError **error)
{
  g_autofree char *if_match = NULL;
  s3_request r = { .op = "PUT", .method = "PUT", .bucket = bucket, .key = key,
                   .body = data, .body_len = len };
  guint nh = 0;
  bool ok;

  if (cond && cond->if_absent)
    r.headers[nh++] = "if-none-match: *";
  if (cond && cond->if_match) {
    /* Unquoted: RGW 16 compares the header with its stored ETag byte for
     * byte (a quoted one never matches); AWS takes either form. */
    if_match = g_strdup_printf("if-match: %s", cond->if_match);
    r.headers[nh++] = if_match;
  }
  ok = s3_perform(c, &r, error);
  if (ok && etag)
    *etag = g_strdup(r.info.etag ? r.info.etag : "");
  s3_request_clear(&r);
  return ok;
}

static void
take_info(s3_request *r, s3_object_info *info)
{
  if (!info)
    return;
  *info = r->info;
  memset(&r->info, 0, sizeof r->info);
}

bool
s3_get_object(s3_client *c, const char *bucket, const char *key, size_t max, GBytes **data,
              s3_object_info *info, GError **error)
{
  s3_request r = { .op = "GET", .method = "GET", .bucket = bucket, .key = key,
                   .max_body = max };
  bool ok = s3_perform(c, &r, error);

  if (ok) {
    *data = g_byte_array_free_to_bytes(g_steal_pointer(&r.body_out));
    r.info.size = g_bytes_get_size(*data);
    take_info(&r, info);
  }
  s3_request_clear(&r);
  return ok;
}

bool
s3_get_range(s3_client *c, const char *bucket, const char *key, uint64_t off, size_t len,
             void *buf, size_t *got, s3_object_info *info, GError **error)
{
  g_autofree char *range = NULL;
  s3_request r = { .op = "GET", .method = "GET", .bucket = bucket, .key = key,
                   .dst = buf, .dst_cap = len };
  GError *err = NULL;
  bool ok;

  *got = 0;
  if (len == 0 || off > UINT64_MAX - len) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "S3 GET s3://%s/%s: empty or overflowing "
                "range %" PRIu64 "+%zu", bucket, key, off, len);
    return false;
  }
  range = g_strdup_printf("range: bytes=%" PRIu64 "-%" PRIu64, off, off + len - 1);
  r.headers[0] = range;
  ok = s3_perform(c, &r, &err);
  if (!ok && r.status == 416) {
    /* Nothing at or after @off: the object is shorter. */
    g_clear_error(&err);
    s3_request_clear(&r);
    return true;
  }
  if (!ok) {
    g_propagate_error(error, err);
    s3_request_clear(&r);
    return false;
  }
  if (r.status != 206 && off != 0) {
    /* A server that ignores Range sends the object from byte 0. */
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                "S3 GET s3://%s/%s: the server ignored the byte range (HTTP %ld)", bucket,
                key, r.status);
    s3_request_clear(&r);
    return false;
  }
  if (r.status == 200)
    r.info.size = r.dst_len;
  *got = r.dst_len;
  take_info(&r, info);
  s3_request_clear(&r);
  return true;
}

bool
s3_head_object(s3_client *c, const char *bucket, const char *key, s3_object_info *info,
               GError **error)
{
  s3_request r = { .op = "HEAD", .method = "HEAD", .bucket = bucket, .key = key };
  bool ok = s3_perform(c, &r, error);

  if (ok)
    take_info(&r, info);
  s3_request_clear(&r);
  return ok;
}

bool
s3_delete_object(s3_client *c, const char *bucket, const char *key, GError **error)
{
  s3_request r = { .op = "DELETE", .method = "DELETE", .bucket = bucket, .key = key };

  /* S3 answers 204 for a missing key; some servers say NoSuchKey. */
  return s3_perform_delete(c, &r, error);
}

bool
s3_perform_delete(s3_client *c, s3_request *r, GError **error)
{
  GError *err = NULL;
  bool ok = s3_perform(c, r, &err);

  if (!ok && err->code == S3_ERROR_NOT_FOUND) {
    g_clear_error(&err);
    ok = true;
  }
  if (err)
    g_propagate_error(error, err);
  s3_request_clear(r);
  return ok;
}

bool
s3_create_bucket(s3_client *c, const char *bucket, GError **error)
{
  g_autofree char *body = NULL;
  s3_request r = { .op = "create bucket", .method = "PUT", .bucket = bucket };
  bool ok;

  /* Outside us-east-1, AWS wants the region named; us-east-1 must not be. */
  if (strcmp(s3_client_region(c), "us-east-1") != 0) {
    body = g_strdup_printf("<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/"
                           "2006-03-01/\"><LocationConstraint>%s</LocationConstraint>"
                           "</CreateBucketConfiguration>", s3_client_region(c));
    r.body = body;
    r.body_len = strlen(body);
  }
  ok = s3_perform(c, &r, error);
  s3_request_clear(&r);
  return ok;
}

void
s3_entry_free(s3_entry *e)
{
  if (!e)
    return;
  g_free(e->key);
  g_free(e->etag);
  g_free(e->last_modified);
  g_free(e);
}

const char *
s3_key_under(const char *key, const char *prefix)
{
  size_t n = prefix ? strlen(prefix) : 0;

  return strncmp(key, prefix ? prefix : "", n) == 0 ? key + n : NULL;
}

bool
s3_listed_key_ok(const char *bucket, const char *prefix, const char *key)
{
  g_autofree char *shown = NULL;
  char high[129];

  if (s3_key_under(key, prefix))
    return true;
  /* Not ours, so not to be trusted on a terminal either: control bytes
   * are escaped (UTF-8 is left alone). */
  for (int i = 0; i < 128; i++)
    high[i] = (char)(128 + i);
  high[128] = '\0';
  shown = g_strescape(key, high);
  cli_note("s3://%s/%s: in a listing of s3://%s/%s but outside that prefix (ignored)",
           bucket, shown, bucket, prefix ? prefix : "");
  return false;
}

bool
s3_list(s3_client *c, const char *bucket, const char *prefix, const char *delimiter,
        guint page_size, GPtrArray **entries, GPtrArray **prefixes, GError **error)
{
  g_autoptr(GPtrArray) all = g_ptr_array_new_with_free_func((GDestroyNotify)s3_entry_free);
  g_autoptr(GPtrArray) pfx = g_ptr_array_new_with_free_func(g_free);
  g_autofree char *token = NULL;
  g_autofree char *max_keys = page_size ? g_strdup_printf("%u", page_size) : NULL;

  do {
    g_autofree char *query = NULL;
    s3_request r = { .op = "LIST", .method = "GET", .bucket = bucket };
    s3_list_page page = { 0 };
    GError *err = NULL;

    /* Parameters whose value is NULL are left out. */
    query = s3_query("list-type", "2", "encoding-type", "url", "prefix", prefix,
                     "continuation-token", token, "max-keys", max_keys,
                     "delimiter", delimiter, NULL);
    r.query = query;
    if (!s3_perform(c, &r, error)) {
      s3_request_clear(&r);
      return false;
    }
    if (!s3_xml_list_objects((const char *)r.body_out->data, r.body_out->len, &page,
                             &err)) {
      g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL, "S3 LIST s3://%s/%s: %s", bucket,
                  prefix, err->message);
      g_error_free(err);
      s3_request_clear(&r);
      return false;
    }
    s3_request_clear(&r);
    /* What is left in the page is freed with it. */
    for (guint i = 0; i < page.entries->len; i++) {
      const s3_entry *e = g_ptr_array_index(page.entries, i);

      if (s3_listed_key_ok(bucket, prefix, e->key))
        g_ptr_array_add(all, g_steal_pointer(&page.entries->pdata[i]));
    }
    for (guint i = 0; i < page.prefixes->len; i++)
      if (s3_listed_key_ok(bucket, prefix, g_ptr_array_index(page.prefixes, i)))
        g_ptr_array_add(pfx, g_steal_pointer(&page.prefixes->pdata[i]));
    g_free(token);
    token = g_steal_pointer(&page.next_token);
    if (page.truncated && !token) {
      g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                  "S3 LIST s3://%s/%s: truncated listing without a continuation token",
                  bucket, prefix);
      s3_list_page_clear(&page);
      return false;
    }
    if (!page.truncated)
      g_clear_pointer(&token, g_free);
    s3_list_page_clear(&page);
  } while (token);

  *entries = g_steal_pointer(&all);
  if (prefixes)
    *prefixes = g_steal_pointer(&pfx);
  return true;
}
