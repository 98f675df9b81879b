/* Messages, errors and JSON values of the cbt program: the base every
 * layer of the CLI reports through (cmd/, repo/, s3/), so that the
 * layers depend on it and never on the commands.
 *
 * Errors: helpers take a GError ** last and return bool.  Errors in the
 * CLI_ERROR domain carry the exit code they stand for as their code; a
 * command turns a GError into a message and an exit code (cli_report in
 * cmd/cli.h), any other domain meaning CLI_EXIT_FAILED.
 */
#ifndef CBT_MSG_H
#define CBT_MSG_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>
#include <json-c/json.h>

/* Exit codes ------------------------------------------------------------
 * The one list of them: cbt --help prints CLI_EXIT_CODES_HELP, and cron
 * jobs and scripts rely on these numbers, so never renumber them. */
enum cli_exit {
  CLI_EXIT_OK = 0,              /* success */
  CLI_EXIT_FAILED = 1,          /* failed (I/O error, missing file, ...) */
  CLI_EXIT_USAGE = 2,           /* bad command line */
  CLI_EXIT_NO_INCREMENTAL = 3,  /* --incremental asked but impossible */
  CLI_EXIT_DAMAGED = 4,         /* check/verify found damage or mismatch */
};

#define CLI_EXIT_CODES_HELP \
  "Exit status:\n" \
  "  0  success\n" \
  "  1  failed (I/O error, missing file, daemon unreachable, ...)\n" \
  "  2  usage error (unknown subcommand, bad option or argument)\n" \
  "  3  an incremental backup was required (--incremental) but is impossible\n" \
  "  4  check or verify found damage, or a file belongs to another image\n"

#define CLI_ERROR (cli_error_quark())
GQuark cli_error_quark(void);

/* Set by --quiet / --verbose (global or per subcommand). */
extern gboolean cli_quiet;
extern gboolean cli_verbose;

/* "cbt: MESSAGE\n" on stderr.  cli_error always, cli_note unless --quiet
 * (warnings and notes a human should see), cli_debug only with
 * --verbose. */
void cli_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
void cli_note(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
void cli_debug(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* JSON output (json-c).  Keys are stable: scripts depend on them, so add
 * keys, never rename or drop them.  The helpers take ownership of nothing
 * but what they create. */
G_DEFINE_AUTOPTR_CLEANUP_FUNC(json_object, json_object_put)
void cli_json_add_str(json_object *obj, const char *key, const char *val);
void cli_json_add_u64(json_object *obj, const char *key, uint64_t val);
void cli_json_add_bool(json_object *obj, const char *key, bool val);
/* A percentage as a JSON number with two decimals (12.5 -> 12.50). */
void cli_json_add_percent(json_object *obj, const char *key, double val);

#endif
