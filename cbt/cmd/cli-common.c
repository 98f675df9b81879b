/* Helpers every `cbt` subcommand uses: messages, option parsing, sizes,
 * JSON output.
 *
 * Messages: everything meant for a human who is not reading the command's
 * result goes to stderr prefixed "cbt: ", so that stdout carries only the
 * result (a listing, a JSON object) and a cron job's mail shows the
 * problems.  --quiet drops notes, never errors; --verbose adds debug lines.
 *
 * JSON goes through json-c and is written in one piece, then stdout is
 * flushed and checked, so a full disk behind a redirect is an error.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

gboolean cli_quiet;
gboolean cli_verbose;

G_DEFINE_QUARK(cbt-cli-error-quark, cli_error)

static void G_GNUC_PRINTF(1, 0)
vmessage(const char *fmt, va_list ap)
{
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);

  /* One write per message, so lines of concurrent processes (a daemon log
   * and a cron job) do not interleave mid-line. */
  fprintf(stderr, "cbt: %s\n", msg);
}

void
cli_error(const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  vmessage(fmt, ap);
  va_end(ap);
}

void
cli_note(const char *fmt, ...)
{
  va_list ap;

  if (cli_quiet)
    return;
  va_start(ap, fmt);
  vmessage(fmt, ap);
  va_end(ap);
}

void
cli_debug(const char *fmt, ...)
{
  va_list ap;

  if (!cli_verbose)
    return;
  va_start(ap, fmt);
  vmessage(fmt, ap);
  va_end(ap);
}

int
cli_report(GError *error)
{
  int code = CLI_EXIT_FAILED;

  if (!error) {
    cli_error("unknown error");
    return code;
  }
  if (error->domain == CLI_ERROR && error->code > 0)
    code = error->code;
  cli_error("%s", error->message);
  g_error_free(error);
  return code;
}

int
cli_usage_error(const char *cmd, const char *fmt, ...)
{
  g_autofree char *msg = NULL;
  va_list ap;

  va_start(ap, fmt);
  msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  if (cmd) {
    fprintf(stderr, "cbt %s: %s\n", cmd, msg);
    fprintf(stderr, "Try 'cbt %s --help' for more information.\n", cmd);
  } else {
    fprintf(stderr, "cbt: %s\n", msg);
    fprintf(stderr, "Try 'cbt --help' for more information.\n");
  }
  return CLI_EXIT_USAGE;
}

static const GOptionEntry common_entries[] = {
  { "quiet", 'q', 0, G_OPTION_ARG_NONE, &cli_quiet, "Print only errors and the result", NULL },
  { "verbose", 'v', 0, G_OPTION_ARG_NONE, &cli_verbose, "Explain what is being done", NULL },
  { NULL }
};

GOptionContext *
cli_option_context(const char *cmd, const char *params, const char *summary,
                   const char *description, const GOptionEntry *entries)
{
  GOptionContext *ctx = g_option_context_new(params);

  /* GOption prints the program name in the usage line; make it name the
   * subcommand, as a user would type it. */
  {
    g_autofree char *prg = g_strdup_printf("cbt %s", cmd);
    g_set_prgname(prg);
  }
  if (summary)
    g_option_context_set_summary(ctx, summary);
  if (description)
    g_option_context_set_description(ctx, description);
  if (entries)
    g_option_context_add_main_entries(ctx, entries, NULL);
  g_option_context_add_main_entries(ctx, common_entries, NULL);
  return ctx;
}

bool
cli_parse(GOptionContext *ctx, const char *cmd, int *argc, char ***argv)
{
  g_autoptr(GError) error = NULL;

  if (!g_option_context_parse(ctx, argc, argv, &error)) {
    cli_usage_error(cmd, "%s", error->message);
    return false;
  }
  if (cli_quiet && cli_verbose) {
    cli_usage_error(cmd, "--quiet and --verbose exclude each other");
    return false;
  }
  return true;
}

bool
cli_parse_size(const char *what, const char *s, uint64_t *out, GError **error)
{
  static const char units[] = "KMGTPE";
  const char *u;
  char *end = NULL;
  guint64 v;
  unsigned shift = 0;

  errno = 0;
  if (!g_ascii_isdigit(*s))
    goto bad;
  v = g_ascii_strtoull(s, &end, 10);
  if (errno != 0 || end == s)
    goto bad;
  if (*end && (u = strchr(units, g_ascii_toupper(*end))) != NULL) {
    shift = 10u * (unsigned)(u - units + 1);
    end++;
    if (*end == 'i')            /* KiB */
      end++;
    if (*end == 'B')
      end++;
  } else if (*end == 'B') {
    end++;
  }
  if (*end != '\0')
    goto bad;
  if (shift && v > (UINT64_MAX >> shift))
    goto bad;
  *out = v << shift;
  return true;

bad:
  g_set_error(error, CLI_ERROR, CLI_EXIT_USAGE,
              "%s %s: expected a size such as 65536, 64K or 1M", what, s);
  return false;
}

char *
cli_format_size(uint64_t bytes)
{
  static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  unsigned i = 0;

  while (i + 1 < G_N_ELEMENTS(units) && bytes >= (UINT64_C(1024) << (10 * i)))
    i++;
  if (i == 0)
    return g_strdup_printf("%" PRIu64 " B", bytes);
  if ((bytes & ((UINT64_C(1) << (10 * i)) - 1)) == 0)
    return g_strdup_printf("%" PRIu64 " %s", bytes >> (10 * i), units[i]);
  return g_strdup_printf("%.1f %s", (double)bytes / (double)(UINT64_C(1) << (10 * i)),
                         units[i]);
}

unsigned
cli_copy_threads(void)
{
  return CLAMP(g_get_num_processors(), 2u, 4u);
}

char *
cli_find_filterd(void)
{
  const char *env = g_getenv("CBT_FILTERD");
  g_autofree char *self = NULL;

  if (env && *env)
    return g_strdup(env);
  self = g_file_read_link("/proc/self/exe", NULL);
  if (self) {
    g_autofree char *dir = g_path_get_dirname(self);
    char *p = g_build_filename(dir, "cbt-filterd", NULL);

    if (access(p, X_OK) == 0)
      return p;
    g_free(p);
  }
  return g_find_program_in_path("cbt-filterd");
}

void
cli_argv_add_opt(GPtrArray *av, const char *name, const char *val)
{
  if (!val)
    return;
  g_ptr_array_add(av, g_strdup(name));
  g_ptr_array_add(av, g_strdup(val));
}

bool
cli_exec(const char *prog, GPtrArray *av, char **extra, GError **error)
{
  for (char **e = extra; e && *e; e++)
    g_ptr_array_add(av, g_strdup(*e));
  g_ptr_array_add(av, NULL);
  cli_debug("exec %s", prog);
  fflush(NULL);
  execv(prog, (char **)av->pdata);
  g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", prog, g_strerror(errno));
  return false;
}

double
cli_percent(uint64_t part, uint64_t whole)
{
  return whole ? 100.0 * (double)part / (double)whole : 0.0;
}

void
cli_json_add_str(json_object *obj, const char *key, const char *val)
{
  json_object_object_add(obj, key, val ? json_object_new_string(val) : NULL);
}

void
cli_json_add_u64(json_object *obj, const char *key, uint64_t val)
{
  json_object_object_add(obj, key, json_object_new_uint64(val));
}

void
cli_json_add_bool(json_object *obj, const char *key, bool val)
{
  json_object_object_add(obj, key, json_object_new_boolean(val));
}

void
cli_json_add_percent(json_object *obj, const char *key, double val)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  /* Serialise as written here, not as %.17g ("0.10000000000000001"). */
  g_ascii_formatd(buf, sizeof buf, "%.2f", val);
  json_object_object_add(obj, key, json_object_new_double_s(val, buf));
}

bool
cli_flush_stdout(GError **error)
{
  if (fflush(stdout) != 0 || ferror(stdout)) {
    int err = errno ? errno : EIO;

    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "writing to standard output: %s",
                g_strerror(err));
    return false;
  }
  return true;
}

bool
cli_json_print(json_object *obj, GError **error)
{
  const char *s = json_object_to_json_string_ext(obj,
      JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);

  fputs(s, stdout);
  fputc('\n', stdout);
  return cli_flush_stdout(error);
}

/* --- S3 repositories ---------------------------------------------------- */

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
