/* Internals of the `cbt` command line, shared by its source files.
 *
 * One header, one section per file that defines the symbols (nbdkit's
 * server/internal.h).  A subcommand lives in cbt/cmd/cmd-NAME.c and exports
 * one entry point, `int cmd_NAME(int argc, char **argv)`, which gets argv
 * starting at its own name and returns the process exit status; cbt.c
 * lists it in its command table.  Adding a subcommand is: the new file,
 * its entry point below, one line in cbt.c's table, one line in
 * cbt/cmd/meson.build.
 *
 * Errors: helpers take a GError ** last and return bool.  A command turns
 * a GError into a message on stderr and an exit code with cli_report();
 * errors in the CLI_ERROR domain carry the exit code as their code, any
 * other domain means CLI_EXIT_FAILED.
 */
#ifndef CBT_CLI_H
#define CBT_CLI_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include <glib.h>
#include <json-c/json.h>

#include "msg.h"
#include "repo.h"
#include "s3.h"

/* cli-common.c ---------------------------------------------------------- */

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
/* Threads for a copy (backup's connections, restore's qcow2 writers): one
 * per CPU, at least 2 and at most 4.  More than the CPUs only queue for
 * them and for the output file's lock; fewer than 2 leave the disk idle
 * while one thread computes.  (A 2 GiB full on 2 CPUs: 4 connections
 * 1.13-1.50 s, 2 connections 0.96-1.14 s, 1 connection 1.6 s.) */
unsigned cli_copy_threads(void);
/* The cbt-filterd to run: $CBT_FILTERD, else the one next to this cbt,
 * else the first on PATH; NULL if none.  g_free it. */
char *cli_find_filterd(void);
/* Append "@name @val" to the argument vector @av when @val is set. */
void cli_argv_add_opt(GPtrArray *av, const char *name, const char *val);
/* Append @extra (NULL-terminated, may be NULL) and the closing NULL to
 * @av (whose first element is the program name) and exec @prog; returns
 * false with @error only when the exec fails. */
bool cli_exec(const char *prog, GPtrArray *av, char **extra, GError **error);

bool cli_json_print(json_object *obj, GError **error);

/* Flush stdout and turn a write error into @error (naming stdout). */
bool cli_flush_stdout(GError **error);

/* The --s3-endpoint entry for a command's GOptionEntry list (every
 * command that takes --repo has it); it sets cli_s3_endpoint (s3.h). */
#define CLI_S3_OPTION \
  { "s3-endpoint", 0, 0, G_OPTION_ARG_STRING, &cli_s3_endpoint, \
    "S3 endpoint of an s3:// repository (default: $AWS_ENDPOINT_URL)", "URL" }


/* cmd-bitmap.c ---------------------------------------------------------- */

/* cbt bitmap create|info|dump|check: see the --help text in the file. */
int cmd_bitmap(int argc, char **argv);

/* cmd-backup.c, cmd-restore.c, cmd-verify.c, cmd-list.c ---------------- */

/* cbt backup|restore|verify|list: see the --help text in each file. */
int cmd_backup(int argc, char **argv);
int cmd_restore(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_prune(int argc, char **argv);  /* cmd-prune.c */
int cmd_s3(int argc, char **argv);     /* cmd-s3.c: hidden from cbt --help */
/* cbt restore --instant (cmd-restore-instant.c): cmd_restore hands argv
 * over when it holds --instant. */
int cmd_restore_instant(int argc, char **argv);

/* cmd-mount.c, cmd-serve.c ---------------------------------------------- */

/* cbt mount|umount|serve: a backup point read in place, as a file through
 * FUSE or as an NBD export; see the --help text in each file. */
int cmd_mount(int argc, char **argv);
int cmd_umount(int argc, char **argv);
int cmd_serve(int argc, char **argv);

/* control.c ------------------------------------------------------------- */

/* A client of cbt-filterd's control socket (--control). */
#define CONTROL_ERROR (control_error_quark())
GQuark control_error_quark(void);
/* Error codes: the daemon's error classes, then our own. */
enum control_error {
  CONTROL_ERR_GENERIC,          /* GenericError or an unknown class */
  CONTROL_ERR_IN_PROGRESS,      /* CheckpointInProgress */
  CONTROL_ERR_NO_CHECKPOINT,    /* NoCheckpoint */
  CONTROL_ERR_MISMATCH,         /* CheckpointMismatch */
  CONTROL_ERR_NO_BITMAP,        /* NoBitmap */
  CONTROL_ERR_READ_ONLY,        /* ReadOnly */
  CONTROL_ERR_BAD_REQUEST,      /* BadRequest */
  CONTROL_ERR_PROTOCOL,         /* the daemon's reply made no sense */
};

/* The daemon's "status" reply (every command returns one). */
struct control_status {
  uint64_t size;
  bool has_bitmap;
  char *uuid;                   /* bitmap: */
  uint64_t granularity;
  bool trusted;
  uint64_t dirty_bytes;
  char *checkpoint;             /* active bitmap's start, or NULL */
  char *context;
  bool in_progress;             /* checkpoint: */
  char *cp_id;
  char *cp_previous;            /* or NULL */
  bool cp_trusted;
  uint64_t cp_dirty_bytes;
  char *cp_context;
  char *pit_mode;               /* point-in-time view of the checkpoint, */
  char *pit_export;             /* NULL when there is none */
  char *pit_failed;             /* why the view failed, or NULL */
  uint64_t pit_scratch_peak;
  uint64_t pit_copied;          /* bytes saved before guest overwrites */
};
void control_status_clear(struct control_status *st);

typedef struct control control;
bool control_connect(const char *path, control **out, GError **error);
void control_close(control *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(control, control_close)
/* Run @cmd ("status", "checkpoint-begin", ...), with argument "checkpoint"
 * = @checkpoint unless NULL, and parse the status it returns into @st
 * (cleared first; may be NULL).  A daemon error is a CONTROL_ERROR whose
 * code is its class and whose message is its "desc". */
bool control_execute(control *c, const char *cmd, const char *checkpoint,
                     struct control_status *st, GError **error);
/* checkpoint-begin with a point-in-time view for a "full" or
 * "incremental" backup ("off": none). */
bool control_begin(control *c, const char *point_in_time, struct control_status *st,
                   GError **error);

/* cmd-mount.c (for cmd-restore-instant.c and cmd-serve.c) -------------- */

/* Mount backup @at of repository @repo_url read-only in a new private
 * directory, from a child process forked at once, and wait until it is
 * mounted: what cbt-filterd reads as a raw image for cbt serve and cbt
 * restore --instant, so that every chunk it reads is checked against the
 * manifest (a damaged one fails the read with EBADMSG; cmd-mount.c).
 * Call it before this process starts threads or opens an S3 repository.
 * @caller_lock is the caller's lock descriptor of a directory repository,
 * opened and locked (shared) before the call: the child then reads under
 * that lock, taking none of its own, and closes its copy, so that the
 * lock ends exactly with the caller's (pass it on through the exec); -1
 * (S3, or no lock) lets the child lock as cbt mount does.  *@mp is the
 * mountpoint (MP/disk.raw the disk), *@ino disk.raw's inode number
 * (chain_reader_ident), *@file the backup file the child found for @at,
 * *@life the write end of a pipe (O_CLOEXEC): the child unmounts
 * (lazily), removes *@mp and exits once every copy of it is closed.  A
 * child that fails says why on stderr; the error is then
 * CLI_EXIT_DAMAGED if it was damage. */
bool mount_private(const char *repo_url, const char *at, int caller_lock, char **mp,
                   uint64_t *ino, char **file, int *life, GError **error);

#endif
