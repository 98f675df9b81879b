/* The configuration of the S3 client, read the way the AWS tools read
 * theirs (the variables are listed at s3_config in s3.h), and s3:// URLs.
 *
 * Nothing here talks to the server: a configuration that cannot work
 * (no credentials, an endpoint that is not http(s)://HOST) is refused
 * when the client is made, with a message naming the variable.
 */
#include <string.h>

#include "s3.h"

void
s3_config_clear(s3_config *cfg)
{
  g_free(cfg->endpoint);
  g_free(cfg->region);
  g_free(cfg->access_key);
  g_free(cfg->secret_key);
  g_free(cfg->session_token);
  g_free(cfg->ca_bundle);
  memset(cfg, 0, sizeof *cfg);
}

static const char *
env_nonempty(const char *name)
{
  const char *v = g_getenv(name);

  return v && *v ? v : NULL;
}

bool
s3_config_set_endpoint(s3_config *cfg, const char *url, GError **error)
{
  g_autoptr(GUri) u = g_uri_parse(url, G_URI_FLAGS_NONE, NULL);
  const char *scheme = u ? g_uri_get_scheme(u) : NULL;
  size_t n;

  if (!u || !scheme || (g_ascii_strcasecmp(scheme, "http") != 0 &&
                        g_ascii_strcasecmp(scheme, "https") != 0) ||
      !g_uri_get_host(u) || !*g_uri_get_host(u) || g_uri_get_query(u) ||
      g_uri_get_userinfo(u)) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                "S3 endpoint '%s': not an http:// or https:// URL of a host "
                "(like http://127.0.0.1:7480)", url);
    return false;
  }
  g_free(cfg->endpoint);
  cfg->endpoint = g_strdup(url);
  n = strlen(cfg->endpoint);
  while (n > 0 && cfg->endpoint[n - 1] == '/')
    cfg->endpoint[--n] = '\0';
  /* Servers of one's own (Ceph RGW, MinIO) rarely have the wildcard DNS
   * that virtual-host addressing needs. */
  cfg->path_style = true;
  return true;
}

bool
s3_config_from_env(s3_config *cfg, GError **error)
{
  const char *v;

  memset(cfg, 0, sizeof *cfg);
  cfg->max_attempts = 5;
  cfg->retry_base_ms = 200;
  cfg->retry_max_ms = 5000;
  cfg->retry_budget_ms = 120000;
  cfg->region = g_strdup((v = env_nonempty("AWS_REGION")) ? v :
                         (v = env_nonempty("AWS_DEFAULT_REGION")) ? v : "us-east-1");
  if ((v = env_nonempty("AWS_ENDPOINT_URL_S3")) || (v = env_nonempty("AWS_ENDPOINT_URL"))) {
    if (!s3_config_set_endpoint(cfg, v, error))
      goto fail;
  } else {
    cfg->endpoint = g_strdup_printf("https://s3.%s.amazonaws.com", cfg->region);
    cfg->path_style = false;
  }
  cfg->access_key = g_strdup(env_nonempty("AWS_ACCESS_KEY_ID"));
  cfg->secret_key = g_strdup(env_nonempty("AWS_SECRET_ACCESS_KEY"));
  cfg->session_token = g_strdup(env_nonempty("AWS_SESSION_TOKEN"));
  cfg->ca_bundle = g_strdup(env_nonempty("AWS_CA_BUNDLE"));
  if ((v = env_nonempty("AWS_MAX_ATTEMPTS"))) {
    guint64 n;

    if (!g_ascii_string_to_unsigned(v, 10, 1, 100, &n, NULL)) {
      g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                  "AWS_MAX_ATTEMPTS='%s': not a number from 1 to 100", v);
      goto fail;
    }
    cfg->max_attempts = (guint)n;
  }
  if ((v = env_nonempty("CBT_S3_ADDRESSING_STYLE"))) {
    if (strcmp(v, "path") == 0) {
      cfg->path_style = true;
    } else if (strcmp(v, "virtual") == 0) {
      cfg->path_style = false;
    } else {
      g_set_error(error, S3_ERROR, S3_ERROR_CONFIG,
                  "CBT_S3_ADDRESSING_STYLE='%s': must be 'path' or 'virtual'", v);
      goto fail;
    }
  }
  return true;

fail:
  s3_config_clear(cfg);
  return false;
}

bool
s3_url_parse(const char *url, char **bucket, char **key, GError **error)
{
  const char *b, *slash;

  if (g_ascii_strncasecmp(url, "s3://", 5) != 0) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "'%s': not an s3://BUCKET/KEY URL", url);
    return false;
  }
  b = url + 5;
  slash = strchr(b, '/');
  if (slash == b || !*b) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "'%s': no bucket name after s3://", url);
    return false;
  }
  *bucket = slash ? g_strndup(b, (gsize)(slash - b)) : g_strdup(b);
  *key = g_strdup(slash ? slash + 1 : "");
  return true;
}

/* --- the program's client -------------------------------------------- */

/* The command line sets these (--s3-endpoint, the signal handler); every
 * S3 client the program makes, for a command or for a repository, comes
 * from cli_s3_client so that they agree. */

char *cli_s3_endpoint;
const volatile sig_atomic_t *cli_s3_cancel;

bool
cli_s3_client(s3_client **out, GError **error)
{
  s3_config cfg;
  const char *style = g_getenv("CBT_S3_ADDRESSING_STYLE");

  if (!s3_config_from_env(&cfg, error))
    return false;
  if (cli_s3_endpoint && !s3_config_set_endpoint(&cfg, cli_s3_endpoint, error)) {
    s3_config_clear(&cfg);
    return false;
  }
  /* set_endpoint chose path style; an explicit choice still wins. */
  if (cli_s3_endpoint && style && strcmp(style, "virtual") == 0)
    cfg.path_style = false;
  *out = s3_client_new(&cfg, error);
  s3_config_clear(&cfg);
  if (*out)
    s3_client_set_cancel(*out, cli_s3_cancel);
  return *out != NULL;
}
