/* Messages, errors and JSON values (msg.h): the base every layer of the
 * CLI reports through.
 *
 * Messages: everything meant for a human who is not reading the command's
 * result goes to stderr prefixed "cbt: ", so that stdout carries only the
 * result (a listing, a JSON object) and a cron job's mail shows the
 * problems.  --quiet drops notes, never errors; --verbose adds debug lines.
 */
#include <stdarg.h>
#include <stdio.h>

#include "msg.h"

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
