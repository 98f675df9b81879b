/* cbt s3: a small S3 client on the command line, for tests and for
 * looking into a bucket by hand.  Not listed in `cbt --help`: it is a
 * debugging tool over the code that S3 repositories use (s3*.c), so that
 * the tests drive that code against a real server.
 *
 *   cbt s3 mb s3://BUCKET
 *   cbt s3 ls s3://BUCKET[/PREFIX]              SIZE KEY per line
 *   cbt s3 put FILE|- s3://BUCKET/KEY           ETAG KEY
 *   cbt s3 put FILE... s3://BUCKET/PREFIX/      one object per FILE
 *   cbt s3 get s3://BUCKET/KEY FILE|-           (--range OFF:LEN)
 *   cbt s3 head s3://BUCKET/KEY                 SIZE ETAG
 *   cbt s3 rm s3://BUCKET/KEY...
 *   cbt s3 uploads s3://BUCKET[/PREFIX]         UPLOAD-ID KEY per line
 *   cbt s3 abort s3://BUCKET/KEY UPLOAD-ID | --all s3://BUCKET[/PREFIX]
 *   cbt s3 lock-acquire s3://BUCKET/KEY         prints the owner token
 *   cbt s3 lock-refresh|lock-release s3://BUCKET/KEY TOKEN
 *
 * The endpoint and credentials come from the environment (s3.h:
 * AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or --endpoint, --region,
 * --path-style, --virtual-host.  put streams a file of any size through a
 * multipart upload with --jobs parts in flight; get of a whole object
 * into a file reads --jobs ranges in parallel and checks that every range
 * came from the same version of the object (ETag).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "s3.h"

#define IO_CHUNK ((size_t)1 << 20)

/* Options every s3 subcommand takes. */
static char *opt_endpoint;
static char *opt_region;
static gboolean opt_path_style;
static gboolean opt_virtual_host;

#define S3_COMMON_ENTRIES \
  { "endpoint", 0, 0, G_OPTION_ARG_STRING, &opt_endpoint, \
    "S3 endpoint (default: $AWS_ENDPOINT_URL)", "URL" }, \
  { "region", 0, 0, G_OPTION_ARG_STRING, &opt_region, \
    "region (default: $AWS_REGION or us-east-1)", "REGION" }, \
  { "path-style", 0, 0, G_OPTION_ARG_NONE, &opt_path_style, \
    "bucket in the URL path (http://HOST/BUCKET/KEY)", NULL }, \
  { "virtual-host", 0, 0, G_OPTION_ARG_NONE, &opt_virtual_host, \
    "bucket in the host name (http://BUCKET.HOST/KEY)", NULL }

#define S3_DESCRIPTION \
  "Configuration: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,\n" \
  "AWS_REGION, AWS_MAX_ATTEMPTS, CBT_S3_ADDRESSING_STYLE (see docs/s3.md).\n\n" \
  CLI_EXIT_CODES_HELP

static s3_client *
open_client(GError **error)
{
  s3_config cfg;
  s3_client *c;

  if (opt_path_style && opt_virtual_host) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_USAGE,
                "--path-style and --virtual-host exclude each other");
    return NULL;
  }
  if (!s3_config_from_env(&cfg, error))
    return NULL;
  if (opt_endpoint && !s3_config_set_endpoint(&cfg, opt_endpoint, error)) {
    s3_config_clear(&cfg);
    return NULL;
  }
  if (opt_region) {
    g_free(cfg.region);
    cfg.region = g_strdup(opt_region);
  }
  if (opt_path_style)
    cfg.path_style = true;
  if (opt_virtual_host)
    cfg.path_style = false;
  c = s3_client_new(&cfg, error);
  s3_config_clear(&cfg);
  return c;
}

/* Parse @url into *@bucket and *@key, requiring a key if @need_key. */
static bool
parse_url(const char *url, bool need_key, char **bucket, char **key, GError **error)
{
  if (!s3_url_parse(url, bucket, key, error))
    return false;
  if (need_key && !**key) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "'%s': no key after the bucket", url);
    g_clear_pointer(bucket, g_free);
    g_clear_pointer(key, g_free);
    return false;
  }
  return true;
}

/* Run a subcommand's option parsing: returns false (exit code in *@rc)
 * unless there are between @min and @max arguments left. */
static bool
parse_args(GOptionContext *ctx, const char *cmd, int *argc, char ***argv, int min, int max,
           int *rc)
{
  if (!cli_parse(ctx, cmd, argc, argv)) {
    *rc = CLI_EXIT_USAGE;
    return false;
  }
  if (*argc - 1 < min) {
    *rc = cli_usage_error(cmd, "missing argument");
    return false;
  }
  if (max >= 0 && *argc - 1 > max) {
    *rc = cli_usage_error(cmd, "unexpected argument '%s'", (*argv)[max + 1]);
    return false;
  }
  return true;
}

/* ---- mb, ls, head, rm ------------------------------------------------ */

static int
s3_mb(int argc, char **argv)
{
  GOptionEntry entries[] = { S3_COMMON_ENTRIES, { NULL } };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 mb", "s3://BUCKET", "Create a bucket.", S3_DESCRIPTION, entries);
  g_autoptr(s3_client) c = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *key = NULL;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 mb", &argc, &argv, 1, 1, &rc))
    return rc;
  if (!parse_url(argv[1], false, &bucket, &key, &error) || !(c = open_client(&error)) ||
      !s3_create_bucket(c, bucket, &error))
    return cli_report(error);
  return CLI_EXIT_OK;
}

static int
s3_ls(int argc, char **argv)
{
  gint page = 0;
  gchar *delimiter = NULL;
  GOptionEntry entries[] = {
    { "page-size", 0, 0, G_OPTION_ARG_INT, &page, "keys per LIST request (1-1000)", "N" },
    { "delimiter", 'd', 0, G_OPTION_ARG_STRING, &delimiter,
      "roll keys up to this delimiter (shown as PRE PREFIX)", "D" },
    S3_COMMON_ENTRIES, { NULL }
  };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 ls", "s3://BUCKET[/PREFIX]",
                       "List the objects under a prefix: SIZE KEY per line.",
                       S3_DESCRIPTION, entries);
  g_autoptr(s3_client) c = NULL;
  g_autoptr(GPtrArray) entries_out = NULL;
  g_autoptr(GPtrArray) prefixes = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *prefix = NULL;
  g_autofree char *delim = NULL;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 ls", &argc, &argv, 1, 1, &rc))
    return rc;
  delim = delimiter;
  if (page < 0 || page > 1000)
    return cli_usage_error("s3 ls", "--page-size %d: must be 1 to 1000", page);
  if (!parse_url(argv[1], false, &bucket, &prefix, &error) || !(c = open_client(&error)) ||
      !s3_list(c, bucket, prefix, delim, (guint)page, &entries_out, &prefixes, &error))
    return cli_report(error);
  for (guint i = 0; i < prefixes->len; i++)
    printf("PRE %s\n", (const char *)g_ptr_array_index(prefixes, i));
  for (guint i = 0; i < entries_out->len; i++) {
    const s3_entry *e = g_ptr_array_index(entries_out, i);

    printf("%" PRIu64 " %s\n", e->size, e->key);
  }
  if (!cli_flush_stdout(&error))
    return cli_report(error);
  return CLI_EXIT_OK;
}

static int
s3_head(int argc, char **argv)
{
  GOptionEntry entries[] = { S3_COMMON_ENTRIES, { NULL } };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 head", "s3://BUCKET/KEY", "Show an object's size and ETag.",
                       S3_DESCRIPTION, entries);
  g_autoptr(s3_client) c = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *key = NULL;
  s3_object_info info = { 0 };
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 head", &argc, &argv, 1, 1, &rc))
    return rc;
  if (!parse_url(argv[1], true, &bucket, &key, &error) || !(c = open_client(&error)) ||
      !s3_head_object(c, bucket, key, &info, &error))
    return cli_report(error);
  printf("%" PRIu64 " %s\n", info.size, info.etag ? info.etag : "");
  s3_object_info_clear(&info);
  if (!cli_flush_stdout(&error))
    return cli_report(error);
  return CLI_EXIT_OK;
}

static int
s3_rm(int argc, char **argv)
{
  GOptionEntry entries[] = { S3_COMMON_ENTRIES, { NULL } };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 rm", "s3://BUCKET/KEY...", "Delete objects.", S3_DESCRIPTION,
                       entries);
  g_autoptr(s3_client) c = NULL;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 rm", &argc, &argv, 1, -1, &rc))
    return rc;
  if (!(c = open_client(&error)))
    return cli_report(error);
  for (int i = 1; i < argc; i++) {
    g_autofree char *bucket = NULL;
    g_autofree char *key = NULL;

    if (!parse_url(argv[i], true, &bucket, &key, &error) ||
        !s3_delete_object(c, bucket, key, &error))
      return cli_report(error);
  }
  return CLI_EXIT_OK;
}

/* ---- put ------------------------------------------------------------- */

/* read(2) until @len bytes or end of file; returns the count or -1. */
static ssize_t
read_full(int fd, void *buf, size_t len)
{
  size_t done = 0;

  while (done < len) {
    ssize_t r = read(fd, (char *)buf + done, len - done);

    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -1;
    if (r == 0)
      break;
    done += (size_t)r;
  }
  return (ssize_t)done;
}

static int
open_input(const char *path, GError **error)
{
  int fd = strcmp(path, "-") == 0 ? dup(0) : open(path, O_RDONLY | O_CLOEXEC);

  if (fd < 0)
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
  return fd;
}

/* Stream @path (or stdin) to BUCKET/KEY; *@etag is the caller's. */
static bool
put_stream(s3_client *c, const char *path, const char *bucket, const char *key,
           size_t part_size, guint jobs, char **etag, GError **error)
{
  g_autoptr(s3_upload) u = NULL;
  g_autofree guint8 *buf = NULL;
  int fd = open_input(path, error);
  ssize_t n;

  if (fd < 0)
    return false;
  if (!(u = s3_upload_new(c, bucket, key, part_size, jobs, error))) {
    close(fd);
    return false;
  }
  buf = g_malloc(IO_CHUNK);
  while ((n = read_full(fd, buf, IO_CHUNK)) > 0)
    if (!s3_upload_write(u, buf, (size_t)n, error)) {
      close(fd);
      return false;
    }
  if (n < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
    close(fd);
    return false;
  }
  close(fd);
  return s3_upload_finish(u, etag, error);
}

/* The parts of @path uploaded to a new multipart upload that is left
 * incomplete, as a killed run leaves one; prints its id. */
static bool
put_incomplete(s3_client *c, const char *path, const char *bucket, const char *key,
               size_t part_size, GError **error)
{
  g_autofree char *id = NULL;
  g_autofree guint8 *buf = g_malloc(part_size);
  int fd = open_input(path, error);
  ssize_t n;

  if (fd < 0)
    return false;
  if (!s3_mpu_create(c, bucket, key, &id, error)) {
    close(fd);
    return false;
  }
  for (guint part = 1; (n = read_full(fd, buf, part_size)) > 0; part++) {
    g_autofree char *etag = NULL;

    if (!s3_mpu_put_part(c, bucket, key, id, part, buf, (size_t)n, &etag, error)) {
      close(fd);
      return false;
    }
  }
  close(fd);
  if (n < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
    return false;
  }
  printf("%s %s\n", id, key);
  return true;
}

/* Many small files, one PUT each, @jobs at a time. */
struct put_many {
  s3_client *c;
  const char *bucket;
  const char *prefix;
  GMutex lock;
  GError *error;
};

static void
put_one(gpointer data, gpointer user)
{
  const char *path = data;
  struct put_many *pm = user;
  g_autofree char *base = g_path_get_basename(path);
  g_autofree char *key = g_strconcat(pm->prefix, base, NULL);
  g_autofree char *contents = NULL;
  gsize len;
  GError *err = NULL;

  if (g_file_get_contents(path, &contents, &len, &err))
    s3_put_object(pm->c, pm->bucket, key, contents, len, NULL, NULL, &err);
  if (err) {
    g_mutex_lock(&pm->lock);
    if (!pm->error)
      pm->error = g_steal_pointer(&err);
    g_mutex_unlock(&pm->lock);
    g_clear_error(&err);
  }
}

static int
s3_put(int argc, char **argv)
{
  g_autofree char *part_str = NULL;
  gint jobs = 4;
  gboolean incomplete = FALSE;
  GOptionEntry entries[] = {
    { "part-size", 0, 0, G_OPTION_ARG_STRING, &part_str,
      "multipart part size (default 8M, at least 5M)", "SIZE" },
    { "jobs", 'j', 0, G_OPTION_ARG_INT, &jobs, "parts or files in flight (default 4)", "N" },
    { "no-complete", 0, 0, G_OPTION_ARG_NONE, &incomplete,
      "upload the parts but leave the multipart upload incomplete; print its id", NULL },
    S3_COMMON_ENTRIES, { NULL }
  };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 put", "FILE... s3://BUCKET/KEY",
                       "Upload a file (- for stdin) to KEY, or several files to the prefix "
                       "KEY/ (named by their base names); print ETAG KEY.",
                       S3_DESCRIPTION, entries);
  g_autoptr(s3_client) c = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *key = NULL;
  g_autofree char *etag = NULL;
  uint64_t part_size = 8 << 20;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 put", &argc, &argv, 2, -1, &rc))
    return rc;
  if (jobs < 1 || jobs > 64)
    return cli_usage_error("s3 put", "--jobs %d: must be 1 to 64", jobs);
  if (part_str && !cli_parse_size("--part-size", part_str, &part_size, &error))
    return cli_report(error);
  if (part_size < S3_PART_MIN || part_size > S3_PART_MAX)
    return cli_usage_error("s3 put", "--part-size %s: must be 5M to 5G", part_str);
  if (!parse_url(argv[argc - 1], argc == 3, &bucket, &key, &error) ||
      !(c = open_client(&error)))
    return cli_report(error);

  if (argc > 3) {
    struct put_many pm = { .c = c, .bucket = bucket, .prefix = key };
    GThreadPool *pool;

    if (*key && !g_str_has_suffix(key, "/"))
      return cli_usage_error("s3 put", "with several files the target must be a prefix "
                             "ending in '/'");
    g_mutex_init(&pm.lock);
    pool = g_thread_pool_new(put_one, &pm, jobs, FALSE, NULL);
    for (int i = 1; i < argc - 1; i++)
      g_thread_pool_push(pool, argv[i], NULL);
    g_thread_pool_free(pool, FALSE, TRUE);
    g_mutex_clear(&pm.lock);
    if (pm.error)
      return cli_report(pm.error);
    return CLI_EXIT_OK;
  }
  if (incomplete) {
    if (!put_incomplete(c, argv[1], bucket, key, part_size, &error) ||
        !cli_flush_stdout(&error))
      return cli_report(error);
    return CLI_EXIT_OK;
  }
  if (!put_stream(c, argv[1], bucket, key, part_size, (guint)jobs, &etag, &error))
    return cli_report(error);
  printf("%s %s\n", etag, key);
  if (!cli_flush_stdout(&error))
    return cli_report(error);
  return CLI_EXIT_OK;
}

/* ---- get ------------------------------------------------------------- */

static bool
write_full(int fd, const void *buf, size_t len, uint64_t off, bool seek, const char *path,
           GError **error)
{
  size_t done = 0;

  while (done < len) {
    ssize_t w = seek ? pwrite(fd, (const char *)buf + done, len - done,
                              (off_t)(off + done))
                     : write(fd, (const char *)buf + done, len - done);

    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
      return false;
    }
    done += (size_t)w;
  }
  return true;
}

/* Parallel ranged GETs of one object version into a file. */
struct get_job {
  s3_client *c;
  const char *bucket;
  const char *key;
  const char *etag;         /* the version HEAD saw */
  const char *path;
  int fd;
  size_t chunk;
  GMutex lock;
  GError *error;
};

static void
get_one(gpointer data, gpointer user)
{
  struct get_job *g = user;
  uint64_t off = *(uint64_t *)data;
  g_autofree guint8 *buf = g_malloc(g->chunk);
  s3_object_info info = { 0 };
  GError *err = NULL;
  size_t got;

  g_free(data);
  g_mutex_lock(&g->lock);
  if (g->error) {
    g_mutex_unlock(&g->lock);
    return;
  }
  g_mutex_unlock(&g->lock);
  if (s3_get_range(g->c, g->bucket, g->key, off, g->chunk, buf, &got, &info, &err)) {
    if (g_strcmp0(info.etag, g->etag) != 0)
      g_set_error(&err, S3_ERROR, S3_ERROR_FAILED,
                  "S3 GET s3://%s/%s: the object changed while it was read (ETag %s, "
                  "then %s)", g->bucket, g->key, g->etag, info.etag ? info.etag : "none");
    else
      write_full(g->fd, buf, got, off, true, g->path, &err);
  }
  s3_object_info_clear(&info);
  if (err) {
    g_mutex_lock(&g->lock);
    if (!g->error)
      g->error = g_steal_pointer(&err);
    g_mutex_unlock(&g->lock);
    g_clear_error(&err);
  }
}

static bool
get_parallel(s3_client *c, const char *bucket, const char *key, const char *path,
             size_t chunk, guint jobs, GError **error)
{
  struct get_job g = { .c = c, .bucket = bucket, .key = key, .path = path, .chunk = chunk };
  s3_object_info info = { 0 };
  GThreadPool *pool;

  if (!s3_head_object(c, bucket, key, &info, error))
    return false;
  g.etag = info.etag;
  g.fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (g.fd < 0 || ftruncate(g.fd, (off_t)info.size) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
    if (g.fd >= 0)
      close(g.fd);
    s3_object_info_clear(&info);
    return false;
  }
  g_mutex_init(&g.lock);
  pool = g_thread_pool_new(get_one, &g, (gint)jobs, FALSE, NULL);
  for (uint64_t off = 0; off < info.size; off += chunk)
    g_thread_pool_push(pool, g_memdup2(&off, sizeof off), NULL);
  g_thread_pool_free(pool, FALSE, TRUE);
  g_mutex_clear(&g.lock);
  s3_object_info_clear(&info);
  if (!g.error && close(g.fd) < 0)
    g_set_error(&g.error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
  else if (g.error)
    close(g.fd);
  if (g.error) {
    g_propagate_error(error, g.error);
    return false;
  }
  return true;
}

static int
s3_get(int argc, char **argv)
{
  g_autofree char *range = NULL;
  g_autofree char *chunk_str = NULL;
  gint jobs = 4;
  GOptionEntry entries[] = {
    { "range", 0, 0, G_OPTION_ARG_STRING, &range, "only LEN bytes from OFF", "OFF:LEN" },
    { "jobs", 'j', 0, G_OPTION_ARG_INT, &jobs, "ranges in flight (default 4)", "N" },
    { "chunk", 0, 0, G_OPTION_ARG_STRING, &chunk_str,
      "bytes per ranged GET (default 8M)", "SIZE" },
    S3_COMMON_ENTRIES, { NULL }
  };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 get", "s3://BUCKET/KEY FILE",
                       "Download an object (or a byte range of it) into FILE (- for stdout).",
                       S3_DESCRIPTION, entries);
  g_autoptr(s3_client) c = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *key = NULL;
  g_autofree guint8 *buf = NULL;
  uint64_t chunk = 8 << 20, off, len;
  bool to_stdout;
  GError *error = NULL;
  int rc, fd;

  if (!parse_args(ctx, "s3 get", &argc, &argv, 2, 2, &rc))
    return rc;
  if (jobs < 1 || jobs > 64)
    return cli_usage_error("s3 get", "--jobs %d: must be 1 to 64", jobs);
  if (chunk_str && (!cli_parse_size("--chunk", chunk_str, &chunk, &error)))
    return cli_report(error);
  if (chunk < 4096 || chunk > ((uint64_t)1 << 30))
    return cli_usage_error("s3 get", "--chunk: must be 4K to 1G");
  if (!parse_url(argv[1], true, &bucket, &key, &error) || !(c = open_client(&error)))
    return cli_report(error);
  to_stdout = strcmp(argv[2], "-") == 0;

  if (!range && !to_stdout) {
    if (!get_parallel(c, bucket, key, argv[2], (size_t)chunk, (guint)jobs, &error))
      return cli_report(error);
    return CLI_EXIT_OK;
  }
  if (range) {
    char *colon = strchr(range, ':');

    if (!colon)
      return cli_usage_error("s3 get", "--range %s: expected OFF:LEN", range);
    *colon = '\0';
    if (!cli_parse_size("--range offset", range, &off, &error) ||
        !cli_parse_size("--range length", colon + 1, &len, &error))
      return cli_report(error);
    if (len == 0 || len > ((uint64_t)1 << 30))
      return cli_usage_error("s3 get", "--range: length must be 1 to 1G");
  } else {
    off = 0;
    len = UINT64_MAX;
  }
  fd = to_stdout ? dup(1) : open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    g_set_error(&error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", argv[2], g_strerror(errno));
    return cli_report(error);
  }
  /* In order, one chunk at a time (stdout cannot seek). */
  buf = g_malloc(MIN(chunk, len));
  while (len > 0) {
    size_t want = (size_t)MIN(chunk, len), got;

    if (!s3_get_range(c, bucket, key, off, want, buf, &got, NULL, &error) ||
        !write_full(fd, buf, got, 0, false, argv[2], &error)) {
      close(fd);
      return cli_report(error);
    }
    off += got;
    len -= got;
    if (got < want)
      break;
  }
  if (close(fd) < 0) {
    g_set_error(&error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", argv[2], g_strerror(errno));
    return cli_report(error);
  }
  return CLI_EXIT_OK;
}

/* ---- uploads, abort -------------------------------------------------- */

static int
s3_uploads(int argc, char **argv)
{
  GOptionEntry entries[] = { S3_COMMON_ENTRIES, { NULL } };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 uploads", "s3://BUCKET[/PREFIX]",
                       "List the multipart uploads in progress: UPLOAD-ID KEY per line.",
                       S3_DESCRIPTION, entries);
  g_autoptr(s3_client) c = NULL;
  g_autoptr(GPtrArray) ups = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *prefix = NULL;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 uploads", &argc, &argv, 1, 1, &rc))
    return rc;
  if (!parse_url(argv[1], false, &bucket, &prefix, &error) || !(c = open_client(&error)) ||
      !s3_mpu_list(c, bucket, prefix, &ups, &error))
    return cli_report(error);
  for (guint i = 0; i < ups->len; i++) {
    const s3_upload_entry *u = g_ptr_array_index(ups, i);

    printf("%s %s\n", u->upload_id, u->key);
  }
  if (!cli_flush_stdout(&error))
    return cli_report(error);
  return CLI_EXIT_OK;
}

static int
s3_abort(int argc, char **argv)
{
  gboolean all = FALSE;
  GOptionEntry entries[] = {
    { "all", 'a', 0, G_OPTION_ARG_NONE, &all,
      "abort every upload under the prefix (leftovers of killed runs)", NULL },
    S3_COMMON_ENTRIES, { NULL }
  };
  g_autoptr(GOptionContext) ctx =
    cli_option_context("s3 abort", "s3://BUCKET/KEY UPLOAD-ID | --all s3://BUCKET[/PREFIX]",
                       "Abort multipart uploads (their parts are deleted).", S3_DESCRIPTION,
                       entries);
  g_autoptr(s3_client) c = NULL;
  g_autoptr(GPtrArray) ups = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *key = NULL;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, "s3 abort", &argc, &argv, 1, 2, &rc))
    return rc;
  if (all != (argc == 2))
    return cli_usage_error("s3 abort", "give either KEY UPLOAD-ID or --all PREFIX");
  if (!parse_url(argv[1], !all, &bucket, &key, &error) || !(c = open_client(&error)))
    return cli_report(error);
  if (!all) {
    if (!s3_mpu_abort(c, bucket, key, argv[2], &error))
      return cli_report(error);
    return CLI_EXIT_OK;
  }
  if (!s3_mpu_list(c, bucket, key, &ups, &error))
    return cli_report(error);
  for (guint i = 0; i < ups->len; i++) {
    const s3_upload_entry *u = g_ptr_array_index(ups, i);

    if (!s3_mpu_abort(c, bucket, u->key, u->upload_id, &error))
      return cli_report(error);
    cli_note("aborted upload %s of %s (begun %s)", u->upload_id, u->key, u->initiated);
  }
  return CLI_EXIT_OK;
}

/* ---- lock ------------------------------------------------------------ */

static int
s3_lock_cmd(int argc, char **argv)
{
  const char *what = argv[0] + strlen("lock-");
  g_autofree char *cmd = g_strdup_printf("s3 %s", argv[0]);
  gint ttl = 60;
  g_autofree char *note = NULL;
  GOptionEntry acquire_entries[] = {
    { "ttl", 0, 0, G_OPTION_ARG_INT, &ttl, "seconds until the lock expires (default 60)",
      "SECONDS" },
    { "note", 0, 0, G_OPTION_ARG_STRING, &note, "text stored in the lock", "TEXT" },
    S3_COMMON_ENTRIES, { NULL }
  };
  GOptionEntry token_entries[] = { S3_COMMON_ENTRIES, { NULL } };
  bool acquire = strcmp(what, "acquire") == 0;
  g_autoptr(GOptionContext) ctx =
    cli_option_context(cmd, acquire ? "s3://BUCKET/KEY" : "s3://BUCKET/KEY TOKEN",
                       acquire ? "Take the lock object KEY; print the owner token." :
                       strcmp(what, "refresh") == 0 ?
                       "Restart the ttl of a lock that TOKEN holds." :
                       "Remove a lock that TOKEN holds.",
                       S3_DESCRIPTION, acquire ? acquire_entries : token_entries);
  g_autoptr(s3_client) c = NULL;
  g_autoptr(s3_lock) l = NULL;
  g_autofree char *bucket = NULL;
  g_autofree char *key = NULL;
  GError *error = NULL;
  int rc;

  if (!parse_args(ctx, cmd, &argc, &argv, acquire ? 1 : 2, acquire ? 1 : 2, &rc))
    return rc;
  if (ttl < 1)
    return cli_usage_error(cmd, "--ttl %d: must be at least 1", ttl);
  if (!parse_url(argv[1], true, &bucket, &key, &error) || !(c = open_client(&error)))
    return cli_report(error);
  if (acquire) {
    if (!s3_lock_acquire(c, bucket, key, (guint)ttl, note, &l, &error))
      return cli_report(error);
    printf("%s\n", s3_lock_token(l));
    if (!cli_flush_stdout(&error))
      return cli_report(error);
    return CLI_EXIT_OK;
  }
  if (!s3_lock_resume(c, bucket, key, argv[2], &l, &error) ||
      !(strcmp(what, "refresh") == 0 ? s3_lock_refresh(l, &error)
                                     : s3_lock_release(l, &error)))
    return cli_report(error);
  return CLI_EXIT_OK;
}

/* ---- dispatch -------------------------------------------------------- */

static const struct {
  const char *name;
  int (*run)(int argc, char **argv);
} subcommands[] = {
  { "mb", s3_mb },
  { "ls", s3_ls },
  { "put", s3_put },
  { "get", s3_get },
  { "head", s3_head },
  { "rm", s3_rm },
  { "uploads", s3_uploads },
  { "abort", s3_abort },
  { "lock-acquire", s3_lock_cmd },
  { "lock-refresh", s3_lock_cmd },
  { "lock-release", s3_lock_cmd },
};

int
cmd_s3(int argc, char **argv)
{
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    printf("Usage: cbt s3 SUBCOMMAND [OPTION...] ARGS\n\n"
           "A debugging S3 client over the code S3 repositories use.\n\n"
           "Subcommands: mb ls put get head rm uploads abort lock-acquire lock-refresh\n"
           "lock-release; 'cbt s3 SUBCOMMAND --help' for each.\n");
    return argc < 2 ? CLI_EXIT_USAGE : CLI_EXIT_OK;
  }
  for (size_t i = 0; i < G_N_ELEMENTS(subcommands); i++)
    if (strcmp(argv[1], subcommands[i].name) == 0)
      return subcommands[i].run(argc - 1, argv + 1);
  return cli_usage_error("s3", "unknown subcommand '%s'", argv[1]);
}
