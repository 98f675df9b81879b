/* Helpers every `cbt` subcommand uses: error reports and exit codes,
 * option parsing, sizes, printing JSON, S3 clients.  The messages
 * themselves are ../msg.c's.
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
