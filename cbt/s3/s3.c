/* The S3 client's core: the client and its connections, and one signed
 * request with bounded retries, which every S3 call goes through.
 *
 * HTTP and signing are libcurl's: it is the field's standard HTTP client
 * (TLS, proxies, keep-alive, HTTP/2, every platform), and since 7.75 it
 * signs requests with AWS Signature Version 4 itself
 * (CURLOPT_AWS_SIGV4), so the one piece of cryptography an S3 client
 * needs is not ours to get wrong.  We rely on how libcurl >= 7.87 builds
 * the canonical request, and shape requests to fit it:
 *   - the path and the query go into the canonical request as sent, so
 *     we send them canonical: keys URI-encoded (every byte but A-Z a-z
 *     0-9 - . _ ~ and, in keys, '/') and query parameters sorted by name,
 *     each with its '=' (s3_query);
 *   - every header we add is signed, so we add only lowercase names and
 *     nothing that curl might not send as given;
 *   - the payload hash is taken from our x-amz-content-sha256 header
 *     (curl cannot hash a body it streams): SHA-256 of the body over
 *     http://, where the signature is all that protects the bytes (taken
 *     from the caller when it has hashed them already: s3_request's
 *     payload_sha256), and UNSIGNED-PAYLOAD over https://, where TLS
 *     does, as the AWS SDKs do.
 *
 * Connections: a pool of curl easy handles, each kept with its live
 * connection for the next request; a request takes one handle and gives
 * it back, so any number of threads may share one s3_client.
 *
 * Retries (docs/s3.md): a request is retried when the connection failed
 * or broke, or the server answered 429, 5xx, 400 RequestTimeout or a
 * payload checksum mismatch; after max_attempts tries in all it fails,
 * naming the last cause and how many tries it took.  Between tries we
 * sleep retry_base_ms * 2^(try-1), capped at retry_max_ms, of which a
 * random half (so that parallel requests spread out).  A try that moves
 * no byte for LOW_SPEED_SECONDS is a broken connection; no new try starts
 * once retry_budget_ms have passed since the first, so a stalled store
 * fails a request in about three minutes rather than tries x 60 s.
 *
 * Cancellation (s3_client_set_cancel): curl calls on_progress about once
 * a second whatever the transfer does, and it aborts a request that
 * began before the flag was set; the sleep between tries wakes every
 * 100 ms to look.  Requests that begin after it share one grace period,
 * so that a cancelled backup still aborts its upload and releases its
 * lock on a healthy store, and stops in seconds on a stalled one.
 * Requests are
 * retried whatever their method: every S3 call we make is idempotent or
 * checked by its caller (a conditional PUT that succeeded but whose
 * answer was lost fails its retry with 412; s3-lock.c reads the lock
 * back; s3-multipart.c recognises a completed upload by its ETag).
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <curl/curl.h>
#include <openssl/evp.h>

#include "msg.h"
#include "s3.h"

#if LIBCURL_VERSION_NUM < 0x075700
#error "libcurl >= 7.87 is needed: it takes the payload hash from x-amz-content-sha256"
#endif

G_DEFINE_QUARK(cbt-s3-error-quark, s3_error)

/* Bodies we parse (errors, listings) are small; anything larger is not
 * what we asked for. */
#define XML_BODY_MAX ((size_t)16 << 20)
#define ERROR_BODY_MAX ((size_t)64 << 10)
/* Idle connections kept per client. */
#define POOL_MAX 32
/* A connection that cannot be made in this time is a failed try; a
 * transfer that moves no byte for LOW_SPEED_SECONDS is a broken one. */
#define CONNECT_TIMEOUT_MS 10000L
#define LOW_SPEED_SECONDS 60L
#define UPLOAD_BUFFER (512L << 10)

#define EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

struct s3_client {
  s3_config cfg;
  char *scheme;             /* "http" or "https" */
  char *hostport;           /* host[:port] of the endpoint */
  char *base_path;          /* path of the endpoint, "" or "/..." */
  char *sigv4;              /* "aws:amz:REGION:s3" */
  bool https;
  GMutex lock;              /* protects idle, grace_end */
  GPtrArray *idle;          /* CURL * */
  const volatile sig_atomic_t *cancel;
  gint64 grace_end;         /* end of the cleanup grace (monotonic), 0; lock */
};

/* ---- client ---------------------------------------------------------- */

static gsize curl_ready;

s3_client *
s3_client_new(const s3_config *cfg, GError **error)
{
  g_autoptr(GUri) u = NULL;
  s3_client *c;
  const char *path;
  int port;

  if (g_once_init_enter(&curl_ready)) {
    /* Before any thread exists: curl_global_init is not thread-safe in
     * every build. */
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);

    g_once_init_leave(&curl_ready, rc == CURLE_OK ? 1 : 2);
  }
  if (curl_ready != 1) {
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3: libcurl failed to initialise");
    return NULL;
  }
  if (curl_version_info(CURLVERSION_NOW)->version_num < 0x075700) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3: libcurl %s is too old (7.87 or later signs S3 requests right)",
                curl_version_info(CURLVERSION_NOW)->version);
    return NULL;
  }
  if (!cfg->access_key || !cfg->secret_key) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    return NULL;
  }
  if (!cfg->endpoint || !(u = g_uri_parse(cfg->endpoint, G_URI_FLAGS_NONE, NULL)) ||
      !g_uri_get_host(u)) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "S3 endpoint '%s': not a URL",
                cfg->endpoint ? cfg->endpoint : "");
    return NULL;
  }
  if (!cfg->region || !*cfg->region || strpbrk(cfg->region, ":/ ")) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "S3 region '%s': not a region name",
                cfg->region ? cfg->region : "");
    return NULL;
  }

  c = g_new0(s3_client, 1);
  c->cfg = *cfg;
  c->cfg.endpoint = g_strdup(cfg->endpoint);
  c->cfg.region = g_strdup(cfg->region);
  c->cfg.access_key = g_strdup(cfg->access_key);
  c->cfg.secret_key = g_strdup(cfg->secret_key);
  c->cfg.session_token = g_strdup(cfg->session_token);
  c->cfg.ca_bundle = g_strdup(cfg->ca_bundle);
  if (c->cfg.max_attempts == 0)
    c->cfg.max_attempts = 1;
  c->scheme = g_ascii_strdown(g_uri_get_scheme(u), -1);
  c->https = strcmp(c->scheme, "https") == 0;
  port = g_uri_get_port(u);
  /* GUri keeps an IPv6 literal without its brackets. */
  if (strchr(g_uri_get_host(u), ':'))
    c->hostport = port > 0 ? g_strdup_printf("[%s]:%d", g_uri_get_host(u), port)
                           : g_strdup_printf("[%s]", g_uri_get_host(u));
  else
    c->hostport = port > 0 ? g_strdup_printf("%s:%d", g_uri_get_host(u), port)
                           : g_strdup(g_uri_get_host(u));
  path = g_uri_get_path(u);
  c->base_path = g_strdup(path && strcmp(path, "/") != 0 ? path : "");
  c->sigv4 = g_strdup_printf("aws:amz:%s:s3", c->cfg.region);
  g_mutex_init(&c->lock);
  c->idle = g_ptr_array_new();
  return c;
}

void
s3_client_free(s3_client *c)
{
  if (!c)
    return;
  for (guint i = 0; i < c->idle->len; i++)
    curl_easy_cleanup(g_ptr_array_index(c->idle, i));
  g_ptr_array_free(c->idle, TRUE);
  g_mutex_clear(&c->lock);
  s3_config_clear(&c->cfg);
  g_free(c->scheme);
  g_free(c->hostport);
  g_free(c->base_path);
  g_free(c->sigv4);
  g_free(c);
}

const char *
s3_client_region(const s3_client *c)
{
  return c->cfg.region;
}

void
s3_client_set_cancel(s3_client *c, const volatile sig_atomic_t *flag)
{
  c->cancel = flag;
}

static bool
is_cancelled(const s3_client *c)
{
  return c->cancel && *c->cancel;
}


/* Milliseconds left of the grace that requests started after the cancel
 * share (s3_client_set_cancel), starting it if this is the first; 0 when
 * it is over. */
static gint64
grace_left_ms(s3_client *c)
{
  gint64 now = g_get_monotonic_time();
  gint64 end;

  g_mutex_lock(&c->lock);
  if (c->grace_end == 0) {
    c->grace_end = now + (gint64)S3_CANCEL_GRACE_MS * 1000;
  }
  end = c->grace_end;
  g_mutex_unlock(&c->lock);
  return end > now ? (end - now + 999) / 1000 : 0;
}

static CURL *
take_handle(s3_client *c)
{
  CURL *h = NULL;

  g_mutex_lock(&c->lock);
  if (c->idle->len > 0)
    h = g_ptr_array_steal_index_fast(c->idle, c->idle->len - 1);
  g_mutex_unlock(&c->lock);
  return h ? h : curl_easy_init();
}

static void
give_handle(s3_client *c, CURL *h)
{
  g_mutex_lock(&c->lock);
  if (c->idle->len < POOL_MAX) {
    g_ptr_array_add(c->idle, h);
    h = NULL;
  }
  g_mutex_unlock(&c->lock);
  if (h)
    curl_easy_cleanup(h);
}

/* ---- URLs ------------------------------------------------------------ */

/* Append @s URI-encoded as SigV4 wants it: every byte but the unreserved
 * ones as %XX (uppercase), '/' kept when @keep_slash (object keys). */
static void
append_encoded(GString *out, const char *s, bool keep_slash)
{
  static const char hex[] = "0123456789ABCDEF";

  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (g_ascii_isalnum(*p) || *p == '-' || *p == '.' || *p == '_' || *p == '~' ||
        (keep_slash && *p == '/')) {
      g_string_append_c(out, (char)*p);
    } else {
      g_string_append_c(out, '%');
      g_string_append_c(out, hex[*p >> 4]);
      g_string_append_c(out, hex[*p & 15]);
    }
  }
}

static int
cmp_param(gconstpointer a, gconstpointer b)
{
  const char *const *pa = a, *const *pb = b;

  /* Each element is "NAME=VALUE" encoded; SigV4 orders by name, then
   * value: compare the names first, so that "a" sorts before "a-b". */
  size_t la = strcspn(pa[0], "="), lb = strcspn(pb[0], "=");
  int r = strncmp(pa[0], pb[0], MIN(la, lb));

  if (r == 0 && la != lb)
    return la < lb ? -1 : 1;
  return r != 0 ? r : strcmp(pa[0], pb[0]);
}

char *
s3_query(const char *name, const char *value, ...)
{
  g_autoptr(GPtrArray) params = g_ptr_array_new_with_free_func(g_free);
  GString *out = g_string_new(NULL);
  va_list ap;

  va_start(ap, value);
  while (name) {
    if (value) {
      GString *p = g_string_new(NULL);

      append_encoded(p, name, false);
      g_string_append_c(p, '=');
      append_encoded(p, value, false);
      g_ptr_array_add(params, g_string_free(p, FALSE));
    }
    name = va_arg(ap, const char *);
    value = name ? va_arg(ap, const char *) : NULL;
  }
  va_end(ap);
  g_ptr_array_sort(params, cmp_param);
  for (guint i = 0; i < params->len; i++) {
    if (i)
      g_string_append_c(out, '&');
    g_string_append(out, g_ptr_array_index(params, i));
  }
  return g_string_free(out, FALSE);
}

static char *
request_url(s3_client *c, const s3_request *r)
{
  GString *u = g_string_new(c->scheme);

  g_string_append(u, "://");
  if (r->bucket && !c->cfg.path_style) {
    g_string_append(u, r->bucket);
    g_string_append_c(u, '.');
  }
  g_string_append(u, c->hostport);
  g_string_append(u, c->base_path);
  if (r->bucket && c->cfg.path_style) {
    g_string_append_c(u, '/');
    append_encoded(u, r->bucket, false);
  }
  if (r->key && *r->key) {
    g_string_append_c(u, '/');
    append_encoded(u, r->key, true);
  } else if (!r->bucket || !c->cfg.path_style) {
    g_string_append_c(u, '/');
  }
  if (r->query && *r->query) {
    g_string_append_c(u, '?');
    g_string_append(u, r->query);
  }
  return g_string_free(u, FALSE);
}

/* "s3://bucket/key" for messages. */
static char *
object_name(const s3_request *r)
{
  if (!r->bucket)
    return g_strdup("s3://");
  return g_strdup_printf("s3://%s/%s", r->bucket, r->key ? r->key : "");
}

/* ---- one transfer ---------------------------------------------------- */

struct xfer {
  CURL *h;
  s3_client *c;
  s3_request *r;
  size_t sent;              /* bytes of r->body handed to curl */
  bool overflow;            /* the response was larger than allowed */
  bool abort_on_cancel;     /* begun before the cancel: stop it */
  bool cancelled;           /* on_progress stopped it */
};

/* "cancelled by SIGTERM", for messages. */
static const char *
cancel_reason(const s3_client *c)
{
  sig_atomic_t sig = c->cancel ? *c->cancel : 0;

  return sig == SIGTERM ? "cancelled by SIGTERM"
         : sig == SIGINT ? "cancelled by SIGINT" : "cancelled";
}

static int
on_progress(void *opaque, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
            curl_off_t ulnow)
{
  struct xfer *x = opaque;

  (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
  if (x->abort_on_cancel && is_cancelled(x->c)) {
    x->cancelled = true;
    return 1;
  }
  return 0;
}

static size_t
on_read(char *buf, size_t size, size_t n, void *opaque)
{
  struct xfer *x = opaque;
  size_t len = MIN(size * n, x->r->body_len - x->sent);

  memcpy(buf, (const char *)x->r->body + x->sent, len);
  x->sent += len;
  return len;
}

static int
on_seek(void *opaque, curl_off_t off, int origin)
{
  struct xfer *x = opaque;

  /* curl rewinds to resend the body (after a 100-continue refusal or a
   * redirect it follows on its own). */
  if (origin != SEEK_SET || off < 0 || (uint64_t)off > x->r->body_len)
    return CURL_SEEKFUNC_FAIL;
  x->sent = (size_t)off;
  return CURL_SEEKFUNC_OK;
}

static size_t
on_body(char *ptr, size_t size, size_t n, void *opaque)
{
  struct xfer *x = opaque;
  s3_request *r = x->r;
  size_t len = size * n, cap;
  long status = 0;

  curl_easy_getinfo(x->h, CURLINFO_RESPONSE_CODE, &status);
  if (status >= 200 && status <= 299 && r->dst) {
    if (len > r->dst_cap - r->dst_len) {
      x->overflow = true;
      return 0;
    }
    memcpy((char *)r->dst + r->dst_len, ptr, len);
    r->dst_len += len;
    return len;
  }
  cap = status >= 200 && status <= 299 ? (r->max_body ? r->max_body : XML_BODY_MAX)
                                       : ERROR_BODY_MAX;
  if (len > cap - MIN(cap, r->body_out->len)) {
    x->overflow = true;
    return 0;
  }
  g_byte_array_append(r->body_out, (const guint8 *)ptr, (guint)len);
  return len;
}

static char *
strip_quotes(const char *v)
{
  size_t n = strlen(v);

  if (n >= 2 && v[0] == '"' && v[n - 1] == '"')
    return g_strndup(v + 1, n - 2);
  return g_strdup(v);
}

static size_t
on_header(char *buf, size_t size, size_t n, void *opaque)
{
  struct xfer *x = opaque;
  s3_object_info *info = &x->r->info;
  size_t len = size * n;
  g_autofree char *line = g_strndup(buf, len);
  char *colon, *value;

  g_strchomp(line);
  if (g_str_has_prefix(line, "HTTP/")) {
    /* A new response (after a 100 Continue): forget the last one's. */
    s3_object_info_clear(info);
    return len;
  }
  colon = strchr(line, ':');
  if (!colon)
    return len;
  *colon = '\0';
  value = g_strstrip(colon + 1);
  if (g_ascii_strcasecmp(line, "etag") == 0) {
    g_free(info->etag);
    info->etag = strip_quotes(value);
  } else if (g_ascii_strcasecmp(line, "content-length") == 0) {
    guint64 v;

    if (g_ascii_string_to_unsigned(value, 10, 0, G_MAXUINT64, &v, NULL))
      info->size = v;
  } else if (g_ascii_strcasecmp(line, "content-range") == 0) {
    /* "bytes FIRST-LAST/TOTAL": the object's size is TOTAL. */
    const char *slash = strrchr(value, '/');
    guint64 v;

    if (slash && g_ascii_string_to_unsigned(slash + 1, 10, 0, G_MAXUINT64, &v, NULL))
      info->size = v;
  } else if (g_ascii_strcasecmp(line, "last-modified") == 0) {
    time_t t = curl_getdate(value, NULL);

    info->last_modified = t == (time_t)-1 ? -1 : (gint64)t;
  } else if (g_ascii_strcasecmp(line, "date") == 0) {
    time_t t = curl_getdate(value, NULL);

    info->server_time = t == (time_t)-1 ? -1 : (gint64)t;
  }
  return len;
}

void
s3_object_info_clear(s3_object_info *info)
{
  g_free(info->etag);
  memset(info, 0, sizeof *info);
  info->last_modified = -1;
  info->server_time = -1;
}

void
s3_request_clear(s3_request *r)
{
  if (r->body_out)
    g_byte_array_unref(r->body_out);
  r->body_out = NULL;
  s3_object_info_clear(&r->info);
  g_free(r->err_code);
  r->err_code = NULL;
}

/* Whether @s looks like a SHA-256 in hex as SigV4 wants it. */
static bool
is_sha256_hex(const char *s)
{
  size_t i;

  for (i = 0; s[i]; i++)
    if (!g_ascii_isdigit(s[i]) && !(s[i] >= 'a' && s[i] <= 'f'))
      return false;
  return i == 64;
}

/* SHA-256 (hex) of what we send, or UNSIGNED-PAYLOAD (see the top): the
 * caller's r->payload_sha256 if it has one (a backup's part is its
 * checksum chunk, hashed already), else libcrypto's, which uses the
 * CPU's SHA instructions: several times GLib's speed. */
static char *
payload_hash(s3_client *c, const s3_request *r)
{
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;

  if (!r->body || r->body_len == 0)
    return g_strdup(EMPTY_SHA256);
  if (c->https)
    return g_strdup("UNSIGNED-PAYLOAD");
  if (r->payload_sha256 && is_sha256_hex(r->payload_sha256))
    return g_strdup(r->payload_sha256);
  if (EVP_Digest(r->body, r->body_len, md, &n, EVP_sha256(), NULL) != 1 || n != 32)
    return g_compute_checksum_for_data(G_CHECKSUM_SHA256, r->body, r->body_len);
  {
    GString *hex = g_string_sized_new(65);

    for (unsigned int i = 0; i < n; i++)
      g_string_append_printf(hex, "%02x", md[i]);
    return g_string_free(hex, FALSE);
  }
}

/* What to do after one try. */
enum verdict { DONE, RETRY, FAIL };

/* Whether a curl error is worth another try: the connection could not be
 * made, or broke, or stalled. */
static bool
curl_transient(CURLcode rc)
{
  switch (rc) {
  case CURLE_COULDNT_CONNECT:
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_RESOLVE_PROXY:
  case CURLE_OPERATION_TIMEDOUT:
  case CURLE_SEND_ERROR:
  case CURLE_RECV_ERROR:
  case CURLE_GOT_NOTHING:
  case CURLE_PARTIAL_FILE:
  case CURLE_HTTP2:
  case CURLE_HTTP2_STREAM:
  case CURLE_SSL_CONNECT_ERROR:
    return true;
  default:
    return false;
  }
}

/* The error of a response the server refused: code, and a hint for the
 * common causes.  Returns the S3_ERROR code and sets *@retry. */
static int
classify_status(long status, const char *code, bool *retry)
{
  *retry = false;
  if (status == 429 || status == 500 || status == 502 || status == 503 || status == 504 ||
      (code && (strcmp(code, "SlowDown") == 0 || strcmp(code, "RequestTimeout") == 0 ||
                strcmp(code, "InternalError") == 0 || strcmp(code, "ServiceUnavailable") == 0 ||
                strcmp(code, "BadDigest") == 0 ||
                strcmp(code, "XAmzContentSHA256Mismatch") == 0 ||
                strcmp(code, "OperationAborted") == 0))) {
    *retry = true;
    return S3_ERROR_SERVER;
  }
  if (code && (strcmp(code, "QuotaExceeded") == 0 || strcmp(code, "InsufficientCapacity") == 0 ||
               strcmp(code, "EntityTooLarge") == 0))
    return S3_ERROR_FULL;
  if (status == 507)
    return S3_ERROR_FULL;
  if (status == 403 || (code && (strcmp(code, "ExpiredToken") == 0 ||
                                 strcmp(code, "InvalidToken") == 0)))
    return S3_ERROR_ACCESS_DENIED;
  if (code && strcmp(code, "NoSuchBucket") == 0)
    return S3_ERROR_NO_SUCH_BUCKET;
  if (status == 404)
    return S3_ERROR_NOT_FOUND;
  if (status == 412)
    return S3_ERROR_PRECONDITION;
  if (code && (strcmp(code, "BucketAlreadyExists") == 0 ||
               strcmp(code, "BucketAlreadyOwnedByYou") == 0))
    return S3_ERROR_EXISTS;
  if (status == 409 && code && strcmp(code, "ConditionalRequestConflict") == 0) {
    /* AWS: another conditional write to the key is in progress. */
    *retry = true;
    return S3_ERROR_PRECONDITION;
  }
  if (code && strcmp(code, "InvalidBucketName") == 0)
    return S3_ERROR_CONFIG;
  return S3_ERROR_FAILED;
}

/* The human part of a refusal: "access denied (SignatureDoesNotMatch:
 * ...)" with a hint where one helps. */
static char *
describe_refusal(const s3_request *r, int ecode, const char *code,
                 const char *message)
{
  g_autofree char *detail = NULL;
  const char *what, *hint = "";

  if (code)
    detail = message && *message ? g_strdup_printf("%s: %s", code, message)
                                 : g_strdup(code);
  else
    detail = g_strdup_printf("HTTP %ld", r->status);
  switch (ecode) {
  case S3_ERROR_ACCESS_DENIED:
    what = "access denied";
    if (code && strcmp(code, "InvalidAccessKeyId") == 0)
      hint = ": the server knows no such access key (AWS_ACCESS_KEY_ID)";
    else if (code && strcmp(code, "SignatureDoesNotMatch") == 0)
      hint = ": the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)";
    else if (code && strcmp(code, "RequestTimeTooSkewed") == 0)
      hint = ": this host's clock is too far from the server's";
    else if (!code)
      hint = ": check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's policy";
    break;
  case S3_ERROR_NO_SUCH_BUCKET:
    what = "no such bucket";
    break;
  case S3_ERROR_NOT_FOUND:
    what = "not found";
    break;
  case S3_ERROR_PRECONDITION:
    what = "precondition failed";
    break;
  case S3_ERROR_EXISTS:
    what = "already exists";
    break;
  case S3_ERROR_FULL:
    what = "the store is full";
    break;
  case S3_ERROR_SERVER:
    what = "server error";
    break;
  case S3_ERROR_CONFIG:
    what = "refused";
    break;
  default:
    what = "refused";
    if (r->status >= 300 && r->status < 400)
      hint = ": redirected (wrong region, or the server wants the other "
             "addressing style: CBT_S3_ADDRESSING_STYLE)";
    break;
  }
  return g_strdup_printf("%s (%s)%s", what, detail, hint);
}

/* One try of @r on handle @h, within @timeout_ms in all if not 0 (a
 * request begun after the cancel), else stopped by the cancel.  Returns
 * the verdict and, unless DONE, the error it would be in *@error
 * (S3_ERROR domain). */
static enum verdict
try_once(s3_client *c, CURL *h, s3_request *r, const char *url, struct curl_slist *hdrs,
         gint64 timeout_ms, GError **error)
{
  struct xfer x = { .h = h, .c = c, .r = r, .abort_on_cancel = timeout_ms == 0 };
  char errbuf[CURL_ERROR_SIZE] = "";
  g_autofree char *name = NULL;
  g_autofree char *code = NULL;
  g_autofree char *message = NULL;
  g_autofree char *why = NULL;
  CURLcode rc;
  bool retry;
  int ecode;

  s3_request_clear(r);
  r->body_out = g_byte_array_new();
  r->dst_len = 0;
  r->status = 0;

  curl_easy_reset(h);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_AWS_SIGV4, c->sigv4);
  curl_easy_setopt(h, CURLOPT_USERNAME, c->cfg.access_key);
  curl_easy_setopt(h, CURLOPT_PASSWORD, c->cfg.secret_key);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, LOW_SPEED_SECONDS);
  curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &x);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, &x);
  if (c->cancel) {
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &x);
  }
  if (timeout_ms > 0)
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
  if (c->cfg.ca_bundle)
    curl_easy_setopt(h, CURLOPT_CAINFO, c->cfg.ca_bundle);

  if (strcmp(r->method, "PUT") == 0) {
    curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(h, CURLOPT_READDATA, &x);
    curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
    curl_easy_setopt(h, CURLOPT_SEEKDATA, &x);
    curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)r->body_len);
    /* A part in 512 KiB sends rather than 64 KiB ones (curl's default):
     * a sixteenth of the poll + send calls and read callbacks. */
    curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, (long)UPLOAD_BUFFER);
  } else if (strcmp(r->method, "POST") == 0) {
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->body ? (const char *)r->body : "");
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
  } else if (strcmp(r->method, "HEAD") == 0) {
    curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  } else if (strcmp(r->method, "DELETE") == 0) {
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, "DELETE");
  }

  rc = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
  /* The handle goes back to the pool: no pointer into this frame. */
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
  name = object_name(r);

  if (rc != CURLE_OK) {
    if (x.cancelled || (timeout_ms > 0 && rc == CURLE_OPERATION_TIMEDOUT)) {
      g_set_error(error, S3_ERROR, S3_ERROR_CANCELLED, "S3 %s %s: %s%s", r->op, name,
                  cancel_reason(c),
                  x.cancelled ? "" : " (and the store did not answer in time)");
      return FAIL;
    }
    if (x.overflow) {
      if (r->dst)
        g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                    "S3 %s %s: the server sent more than the %zu bytes asked for", r->op,
                    name, r->dst_cap);
      else
        g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                    "S3 %s %s: the response is larger than the %zu bytes allowed", r->op,
                    name, r->max_body ? r->max_body : XML_BODY_MAX);
      return FAIL;
    }
    if (curl_transient(rc)) {
      long oserr = 0;

      /* curl's message leaves out the errno ("Connection refused"). */
      curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &oserr);
      if (rc == CURLE_COULDNT_CONNECT && oserr > 0)
        g_set_error(error, S3_ERROR, S3_ERROR_CONNECT, "S3 %s %s: cannot connect to %s: %s",
                    r->op, name, c->cfg.endpoint, g_strerror((int)oserr));
      else
        g_set_error(error, S3_ERROR, S3_ERROR_CONNECT, "S3 %s %s: cannot reach %s (%s%s%s)",
                    r->op, name, c->cfg.endpoint, *errbuf ? errbuf : curl_easy_strerror(rc),
                    oserr > 0 ? ": " : "", oserr > 0 ? g_strerror((int)oserr) : "");
      return RETRY;
    }
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3 %s %s: %s", r->op, name,
                *errbuf ? errbuf : curl_easy_strerror(rc));
    return FAIL;
  }

  if (r->status >= 200 && r->status <= 299) {
    /* CompleteMultipartUpload may answer 200 and fail in the body. */
    if (!(r->error_in_200 && r->body_out->len > 0 &&
          s3_xml_error((const char *)r->body_out->data, r->body_out->len, &code, &message)))
      return DONE;
    r->status = 500;
  } else if (r->body_out->len > 0) {
    s3_xml_error((const char *)r->body_out->data, r->body_out->len, &code, &message);
  }
  ecode = classify_status(r->status, code, &retry);
  why = describe_refusal(r, ecode, code, message);
  g_set_error(error, S3_ERROR, ecode, "S3 %s %s: %s", r->op, name, why);
  r->err_code = g_steal_pointer(&code);
  return retry ? RETRY : FAIL;
}

/* Sleep @ms, waking to look at the cancel flag; false if it is set. */
static bool
sleep_unless_cancelled(s3_client *c, guint64 ms)
{
  gint64 end = g_get_monotonic_time() + (gint64)ms * 1000;

  for (;;) {
    gint64 left = end - g_get_monotonic_time();

    if (is_cancelled(c))
      return false;
    if (left <= 0)
      return true;
    g_usleep((gulong)MIN(left, 100000));
  }
}

bool
s3_perform(s3_client *c, s3_request *r, GError **error)
{
  /* Begun after the cancel: cleanup, one try within the grace.  Looked
   * at before the hash, which takes a while for a part. */
  bool after_cancel = is_cancelled(c);
  g_autofree char *url = request_url(c, r);
  g_autofree char *hash = payload_hash(c, r);
  g_autofree char *hash_hdr = g_strdup_printf("x-amz-content-sha256: %s", hash);
  g_autofree char *token_hdr = NULL;
  g_autofree char *name = object_name(r);
  struct curl_slist *hdrs = NULL;
  gint64 start = g_get_monotonic_time();
  GError *err = NULL;
  CURL *h;
  bool ok = false;

  hdrs = curl_slist_append(hdrs, hash_hdr);
  if (c->cfg.session_token) {
    token_hdr = g_strdup_printf("x-amz-security-token: %s", c->cfg.session_token);
    hdrs = curl_slist_append(hdrs, token_hdr);
  }
  if (r->body && strcmp(r->method, "POST") == 0)
    hdrs = curl_slist_append(hdrs, "content-type: application/xml");
  for (guint i = 0; i < G_N_ELEMENTS(r->headers) && r->headers[i]; i++)
    hdrs = curl_slist_append(hdrs, r->headers[i]);

  h = take_handle(c);
  if (!h || !hdrs) {
    g_set_error(error, S3_ERROR, S3_ERROR_FAILED, "S3 %s: out of memory", r->op);
    curl_slist_free_all(hdrs);
    if (h)
      curl_easy_cleanup(h);
    return false;
  }
  for (r->attempts = 1;; r->attempts++) {
    enum verdict v;
    guint64 delay_ms;
    gint64 timeout_ms = 0;

    g_clear_error(&err);
    if (after_cancel && (r->no_grace || (timeout_ms = grace_left_ms(c)) == 0)) {
      g_set_error(&err, S3_ERROR, S3_ERROR_CANCELLED, "S3 %s %s: %s (not sent)", r->op, name,
                  cancel_reason(c));
      break;
    }
    v = try_once(c, h, r, url, hdrs, timeout_ms, &err);
    if (v == DONE) {
      ok = true;
      break;
    }
    if (v == FAIL || after_cancel || r->attempts >= c->cfg.max_attempts)
      break;
    if (c->cfg.retry_budget_ms &&
        g_get_monotonic_time() - start >= (gint64)c->cfg.retry_budget_ms * 1000)
      break;
    /* Equal jitter: half the exponential step, plus a random half. */
    delay_ms = (guint64)c->cfg.retry_base_ms << MIN(r->attempts - 1, 20u);
    delay_ms = MIN(delay_ms, (guint64)c->cfg.retry_max_ms);
    delay_ms = delay_ms / 2 + (guint64)g_random_int_range(0, (gint32)(delay_ms / 2 + 1));
    cli_note("%s; try %u of %u in %.1f s", err->message, r->attempts + 1,
             c->cfg.max_attempts, (double)delay_ms / 1000);
    if (!sleep_unless_cancelled(c, delay_ms)) {
      g_clear_error(&err);
      g_set_error(&err, S3_ERROR, S3_ERROR_CANCELLED, "S3 %s %s: %s", r->op, name,
                  cancel_reason(c));
      break;
    }
  }
  give_handle(c, h);
  curl_slist_free_all(hdrs);
  if (ok) {
    cli_debug("S3 %s %s/%s: HTTP %ld in %.3f s", r->op, r->bucket ? r->bucket : "",
              r->key ? r->key : "", r->status,
              (double)(g_get_monotonic_time() - start) / 1e6);
    return true;
  }
  if (r->attempts > 1 && err->code != S3_ERROR_CANCELLED) {
    /* Say how hard we tried. */
    g_set_error(error, S3_ERROR, err->code, "%s; gave up after %u tries in %.1f s",
                err->message, r->attempts,
                (double)(g_get_monotonic_time() - start) / 1e6);
    g_error_free(err);
    return false;
  }
  g_propagate_error(error, err);
  return false;
}
