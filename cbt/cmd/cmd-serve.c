/* cbt serve: one backup point as a read-only NBD export.
 *
 * cbt-filterd already serves images with block status, multi-conn and
 * everything else its clients use, so cbt serve does not serve anything
 * itself: it prepares the backup and then becomes cbt-filterd (execv,
 * same pid: signals, --pid-file and exit status are the daemon's) with
 * --read-only.
 *
 * What the daemon reads is the point mounted privately with FUSE by a
 * child process (cmd-mount.c, mount_private), as MOUNTPOINT/disk.raw in
 * raw format, not the repository's qcow2 files: the mount resolves the
 * chain as cbt restore does (the manifest's chain, each file a regular
 * file of the repository naming the manifest's backing file) and checks
 * every chunk against the manifest's checksum before serving a byte of
 * it, so a damaged backup file is refused (exit 4: its header's or
 * tables' chunk) or fails the NBD reads of what is damaged with EIO (its
 * data), the log naming the file and byte range, never served altered.
 * The pipe that keeps the mount goes through the exec as a descriptor
 * the daemon never closes, so the mount ends when the daemon exits,
 * however it exits.
 *
 * A directory repository is locked shared before the mount and stays
 * locked while the daemon runs: the lock's open file description is
 * passed through the exec on a descriptor without FD_CLOEXEC (the mount
 * reads under it and holds no lock of its own), so no backup or pruning
 * can change the files while they are served, and the lock is free the
 * moment the daemon has exited.  On S3 nothing is locked (readers take
 * no lock object); the mount is made first, before this process has an
 * S3 client, whose threads a fork would not carry.
 *
 * cbt-filterd is $CBT_FILTERD if set, else the cbt-filterd next to this
 * program (both are installed in bindir), else the first on $PATH.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

struct serve_opts {
  const char *repo_dir, *at, *socket, *listen, *export_name, *pid_file;
  char **extra;                   /* more cbt-filterd options, or NULL */
};

/* The options every cbt serve passes on, and the exec. */
static bool
serve_exec(const struct serve_opts *o, const char *filterd, GPtrArray *av, GError **error)
{
  cli_argv_add_opt(av, "--socket", o->socket);
  cli_argv_add_opt(av, "--listen", o->listen);
  cli_argv_add_opt(av, "--export-name", o->export_name);
  cli_argv_add_opt(av, "--pid-file", o->pid_file);
  return cli_exec(filterd, av, o->extra, error);
}

static bool
serve_run(const struct serve_opts *o, GError **error)
{
  g_autoptr(repo) r = NULL;
  g_autoptr(GPtrArray) av = g_ptr_array_new_with_free_func(g_free);
  g_autofree char *filterd = NULL, *mp = NULL, *mfile = NULL;
  const repo_backup *b = NULL;
  bool s3 = g_str_has_prefix(o->repo_dir, "s3://");
  uint64_t ino = 0;
  int life = -1;

  filterd = cli_find_filterd();
  if (!filterd) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "cbt-filterd not found (not next to cbt, not on PATH; set CBT_FILTERD)");
    return false;
  }
  if (!s3 && (!repo_open(o->repo_dir, REPO_LOCK_SHARED, false, &r, error) ||
              !repo_find(r, o->at, &b, error)))
    return false;
  if (!mount_private(o->repo_dir, o->at, r ? r->lock_fd : -1, &mp, &ino, &mfile, &life,
                     error))
    return false;
  if (s3 && (!repo_open(o->repo_dir, REPO_LOCK_SHARED, false, &r, error) ||
             !repo_find(r, o->at, &b, error)))
    return false;
  if (strcmp(mfile, b->file) != 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: the repository changed while "
                "starting (%s, then %s): try again", o->repo_dir, mfile, b->file);
    return false;
  }
  /* Both through the exec: a duplicate without FD_CLOEXEC shares the
   * open file description (the lock is the description's). */
  if (fcntl(life, F_DUPFD, 3) < 0 || (r->lock_fd >= 0 && fcntl(r->lock_fd, F_DUPFD, 3) < 0)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: keeping the mount and the lock "
                "for cbt-filterd: %s", o->repo_dir, g_strerror(errno));
    return false;
  }

  g_ptr_array_add(av, g_strdup(filterd));
  g_ptr_array_add(av, g_strdup("--image"));
  g_ptr_array_add(av, g_build_filename(mp, "disk.raw", NULL));
  /* A disk may begin with anything, a qcow2 magic too: never guess. */
  g_ptr_array_add(av, g_strdup("--format=raw"));
  g_ptr_array_add(av, g_strdup("--read-only"));
  g_ptr_array_add(av, g_strdup_printf("--description=cbt backup %u (%s) of %s", b->seq,
                                      b->file, o->repo_dir));
  cli_debug("serving %s read-only", b->file);
  /* The S3 client's connections are no use to the daemon; the lock's
   * duplicate stays. */
  g_clear_pointer(&r, repo_free);
  return serve_exec(o, filterd, av, error);
}

int
cmd_serve(int argc, char **argv)
{
  g_autofree char *dir = NULL, *at = NULL, *socket = NULL, *listen = NULL;
  g_autofree char *export_name = NULL, *pid_file = NULL;
  GError *error = NULL;
  GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    CLI_S3_OPTION,
    { "at", 'a', 0, G_OPTION_ARG_STRING, &at, "the backup to serve: seq number, file name or 'latest' (default)", "BACKUP" },
    { "socket", 's', 0, G_OPTION_ARG_FILENAME, &socket, "listen on a unix socket", "PATH" },
    { "listen", 'l', 0, G_OPTION_ARG_STRING, &listen, "listen on TCP", "HOST:PORT" },
    { "export-name", 'e', 0, G_OPTION_ARG_STRING, &export_name, "export name (default \"\")", "NAME" },
    { "pid-file", 'P', 0, G_OPTION_ARG_FILENAME, &pid_file, "write the pid here once ready", "FILE" },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("serve", "[-- CBT-FILTERD-OPTION...]",
                       "Serve the disk as of one backup read-only over NBD.",
                       "Checks the backup's chain as cbt restore does, then runs\n"
                       "cbt-filterd --read-only on it in this process (same pid;\n"
                       "SIGTERM stops it).  As cbt restore does, every chunk is checked\n"
                       "against the manifest's checksum before it is served: a read of a\n"
                       "damaged chunk gets EIO and the log names the file and byte range.\n"
                       "Needs FUSE, as cbt mount.  Options after -- go to cbt-filterd\n"
                       "(e.g. --threads, --verbose).  The repository stays locked\n"
                       "(shared) while it serves, so no backup or pruning runs meanwhile.\n"
                       "cbt-filterd is $CBT_FILTERD, the one next to cbt, or on PATH.\n\n"
                       CLI_EXIT_CODES_HELP,
                       entries);
  struct serve_opts o;
  char **extra = NULL;

  if (!cli_parse(octx, "serve", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1) {
    /* GOption leaves what follows "--" (and, in some versions, "--"). */
    extra = argv + 1;
    if (strcmp(extra[0], "--") == 0)
      extra++;
    else if (extra[0][0] != '-')
      return cli_usage_error("serve", "unexpected argument '%s'", extra[0]);
  }
  if (!dir)
    return cli_usage_error("serve", "--repo is required");
  if (!socket && !listen && !(extra && *extra))
    return cli_usage_error("serve", "--socket or --listen is required");
  o = (struct serve_opts){ .repo_dir = dir, .at = at, .socket = socket, .listen = listen,
                           .export_name = export_name, .pid_file = pid_file,
                           .extra = extra };
  return serve_run(&o, &error) ? CLI_EXIT_OK : cli_report(error);
}
