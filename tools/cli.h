/* Internals of the `cbt` command line, shared by its source files.
 *
 * One header, one section per file that defines the symbols (nbdkit's
 * server/internal.h).  A subcommand lives in tools/cmd-NAME.c and exports
 * one entry point, `int cmd_NAME(int argc, char **argv)`, which gets argv
 * starting at its own name and returns the process exit status; cbt.c
 * lists it in its command table.  Adding a subcommand is: the new file,
 * its entry point below, one line in cbt.c's table, one line in
 * tools/meson.build.
 *
 * Errors: helpers take a GError ** last and return bool.  A command turns
 * a GError into a message on stderr and an exit code with cli_report();
 * errors in the CLI_ERROR domain carry the exit code as their code, any
 * other domain means CLI_EXIT_FAILED.
 */
#ifndef CBT_CLI_H
#define CBT_CLI_H

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

/* cli-common.c ---------------------------------------------------------- */

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

/* Print @error (which may be NULL: then "unknown error") as cli_error()
 * does, free it, and return the exit code it stands for. */
int cli_report(GError *error);

/* A usage error in @cmd ("bitmap create", or NULL for cbt itself): one
 * line naming the problem, one line pointing at --help, on stderr.
 * Returns CLI_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

/* A GOptionContext for subcommand @cmd ("bitmap info"): the usage line
 * reads "cbt bitmap info [OPTION…] @params", @summary goes above the
 * options and @description (may be NULL) below them.  --quiet and
 * --verbose are added to @entries.  Caller frees (g_autoptr). */
GOptionContext *cli_option_context(const char *cmd, const char *params,
                                   const char *summary,
                                   const char *description,
                                   const GOptionEntry *entries);

/* Parse argv with @ctx (argv[0] is the subcommand name and is kept).  On a
 * bad option prints a usage error for @cmd and returns false; the caller
 * then exits CLI_EXIT_USAGE.  --help prints the help and exits 0. */
bool cli_parse(GOptionContext *ctx, const char *cmd, int *argc, char ***argv);

/* "65536", "64K", "64KiB", "1M", "2G", "1T": a byte count.  Fails (naming
 * @what, e.g. "--granularity") on junk or overflow. */
bool cli_parse_size(const char *what, const char *s, uint64_t *out,
                    GError **error);

/* Human size: "64 KiB" when exact, otherwise "1.5 GiB"; bytes below 1 KiB
 * as "512 B".  Caller frees. */
char *cli_format_size(uint64_t bytes);

/* 100 * part / whole, 0 when whole is 0. */
double cli_percent(uint64_t part, uint64_t whole);

/* JSON output (json-c).  Keys are stable: scripts depend on them, so add
 * keys, never rename or drop them.  The helpers take ownership of nothing
 * but what they create.  cli_json_print writes @obj pretty-printed with a
 * final newline to stdout; returns false (and sets @error) on a write
 * error, so that "disk full" on a redirect is not a silent success. */
G_DEFINE_AUTOPTR_CLEANUP_FUNC(json_object, json_object_put)
void cli_json_add_str(json_object *obj, const char *key, const char *val);
void cli_json_add_u64(json_object *obj, const char *key, uint64_t val);
void cli_json_add_bool(json_object *obj, const char *key, bool val);
/* A percentage as a JSON number with two decimals (12.5 -> 12.50). */
void cli_json_add_percent(json_object *obj, const char *key, double val);
bool cli_json_print(json_object *obj, GError **error);

/* Flush stdout and turn a write error into @error (naming stdout). */
bool cli_flush_stdout(GError **error);

/* cmd-bitmap.c ---------------------------------------------------------- */

/* cbt bitmap create|info|dump|check: see the --help text in the file. */
int cmd_bitmap(int argc, char **argv);

/* To come (issue 4), one file each:
 * int cmd_backup(int argc, char **argv);    cmd-backup.c
 * int cmd_restore(int argc, char **argv);   cmd-restore.c
 * int cmd_verify(int argc, char **argv);    cmd-verify.c
 * int cmd_list(int argc, char **argv);      cmd-list.c
 */

#endif
