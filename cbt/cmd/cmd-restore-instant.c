/* cbt restore --instant: serve the disk of a backup point read-write at
 * once, while its data is copied into the output in the background.
 *
 * The daemon does the work (filterd/restore.c: reads of what is not copied
 * yet come from the backup, guest writes go to the output and are never
 * overwritten, progress in a state file that survives crashes).  This
 * command prepares it and then becomes it (execv, same pid: SIGTERM,
 * --pid-file and the exit status are the daemon's), like cbt serve:
 *   - the backup point is named as cbt restore names it (--at) and
 *     mounted privately with FUSE (cmd-mount.c, mount_private) by a child
 *     process: the mount resolves the chain as cbt restore does and checks
 *     every chunk against the manifest's checksum before the daemon gets a
 *     byte of it, so a backup whose header or tables are damaged is
 *     refused (exit 4) before anything is created, and damaged data makes
 *     the daemon's read of it fail with EBADMSG: the daemon writes none of
 *     it to the output and stops with exit status 4 (filterd/restore.c),
 *     the log naming the file and byte range;
 *   - a new output is created without a backing file, of the point's size
 *     (FILE.qcow2: an empty qcow2; anything else: a sparse raw file),
 *     then its state file OUTPUT.restore-state (lib/restore-state.c)
 *     naming the output's inode and the backup: its file name, and as
 *     the source's identity disk.raw's inode number, which the mount
 *     makes the top file's inode number in a directory repository (what
 *     earlier versions, which handed the daemon the file itself,
 *     recorded) and a hash of the object's name and ETag on S3; if the
 *     state cannot be made, the output is removed again;
 *   - an existing output is used only when its state file says it is this
 *     restore (same output file, same backup file and identity): that is
 *     how a second run with the same arguments resumes after SIGTERM or a
 *     crash, and a replaced backup is refused; any other existing output
 *     is refused, never overwritten;
 *   - the daemon gets MOUNTPOINT/disk.raw as a raw source and, as
 *     --restore-release-fd descriptors, the write end of the pipe that
 *     keeps the mount and, for a directory repository, the repository's
 *     shared lock, taken before the mount, which reads under it and holds
 *     none of its own.  The daemon closes both once the restore is
 *     complete and it has closed the source (so backups of the restored
 *     machine into the same repository can run at once, and the mount
 *     goes), or they close when it exits however it exits.  On S3 nothing
 *     is locked, and the mount is made first, before this process has an
 *     S3 client, whose threads a fork would not carry.
 *
 * cbt-filterd is $CBT_FILTERD if set, else the one next to this program,
 * else the first on $PATH (as cbt serve finds it).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cbt/qcow2-writer.h"
#include "cbt/restore-state.h"
#include "cbt/uring-io.h"
#include "cli.h"

#define STATE_SUFFIX  ".restore-state"
#define GRANULARITY   (64u << 10)

struct instant_opts {
  const char *repo_dir, *at, *output, *state, *socket, *listen, *control, *bitmap;
  const char *rate, *pid_file;
  char **extra;                   /* more cbt-filterd options, or NULL */
};

typedef struct cbt_rstate cbt_rstate;
G_DEFINE_AUTOPTR_CLEANUP_FUNC(cbt_rstate, cbt_rstate_free)

static bool
is_qcow2(const char *out)
{
  return g_str_has_suffix(out, ".qcow2");
}

/* Create @out for a disk of @size bytes, empty, without a backing file. */
static bool
create_output(const char *out, uint64_t size, GError **error)
{
  g_autofree char *why = NULL;
  int fd, r;

  if (is_qcow2(out)) {
    struct cbt_qcow2_writer_opts o = { .size = size };
    cbt_qcow2_writer *w = NULL;

    r = cbt_qcow2_writer_create(out, &o, &w, &why);
    if (r == 0) {
      r = cbt_qcow2_writer_finish(w, &why);
      cbt_qcow2_writer_free(w);
      if (r < 0)
        unlink(out);
    }
  } else {
    fd = open(out, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
      r = -errno;
    } else {
      r = ftruncate(fd, (off_t)size) < 0 ? -errno : cbt_io_fsync(fd);
      close(fd);
      if (r == 0)
        r = cbt_io_sync_parent_dir(out);
      if (r < 0)
        unlink(out);
    }
  }
  if (r < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", out,
                r == -EEXIST ? "exists (remove it or choose another name)"
                             : why ? why : g_strerror(-r));
    return false;
  }
  return true;
}

/* An existing @out: is @state this restore of backup @b (file @src_ino)? */
static bool
check_resume(const struct instant_opts *o, const repo_backup *b, uint64_t src_ino,
             GError **error)
{
  g_autoptr(cbt_rstate) st = NULL;
  g_autofree char *why = NULL;
  const struct cbt_rstate_info *info;
  struct stat sb;
  int r;

  if (access(o->state, F_OK) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: exists and is not an instant restore in progress (no %s): remove "
                "it or choose another name", o->output, o->state);
    return false;
  }
  r = cbt_rstate_open(o->state, false, &st, &why);
  if (r < 0) {
    g_set_error(error, CLI_ERROR, r == -EBADMSG ? CLI_EXIT_DAMAGED : CLI_EXIT_FAILED,
                "%s", why ? why : g_strerror(-r));
    return false;
  }
  info = cbt_rstate_get_info(st);
  if (stat(o->output, &sb) < 0 || (uint64_t)sb.st_ino != info->output_ino) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: not the file %s was made for (replaced or copied?): remove both "
                "to start again", o->output, o->state);
    return false;
  }
  if (strcmp(info->source_name, b->file) != 0 || info->source_ino != src_ino ||
      info->image_size != b->image_size) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "%s: an instant restore of %s is in progress there, not of %s: run it "
                "with the same --at to go on, or remove %s and %s", o->output,
                info->source_name, b->file, o->output, o->state);
    return false;
  }
  if (cbt_rstate_complete(st))
    cli_note("%s: restore complete already; serving it", o->output);
  else
    cli_note("%s: resuming the instant restore of %s (%.1f%% copied)", o->output,
             b->file, cli_percent(cbt_rstate_count(st), cbt_rstate_nbits(info->image_size,
                                                                         info->granularity)));
  return true;
}

static bool
instant_run(const struct instant_opts *o, GError **error)
{
  g_autoptr(repo) r = NULL;
  g_autoptr(GPtrArray) av = g_ptr_array_new_with_free_func(g_free);
  g_autofree char *filterd = NULL, *src = NULL, *why = NULL;
  g_autofree char *mp = NULL, *mfile = NULL;
  const repo_backup *b = NULL;
  bool s3 = g_str_has_prefix(o->repo_dir, "s3://");
  uint64_t src_ino = 0;
  struct stat sb;
  int lock_fd = -1, life_fd = -1, life = -1, rc;

  filterd = cli_find_filterd();
  if (!filterd) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                "cbt-filterd not found (not next to cbt, not on PATH; set CBT_FILTERD)");
    return false;
  }
  if (!s3 && (!repo_open(o->repo_dir, REPO_LOCK_SHARED, false, &r, error) ||
              !repo_find(r, o->at, &b, error)))
    return false;
  if (!mount_private(o->repo_dir, o->at, r ? r->lock_fd : -1, &mp, &src_ino, &mfile,
                     &life, error))
    return false;
  if (s3 && (!repo_open(o->repo_dir, REPO_LOCK_SHARED, false, &r, error) ||
             !repo_find(r, o->at, &b, error)))
    return false;
  if (strcmp(mfile, b->file) != 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: the repository changed while "
                "starting (%s, then %s): try again", o->repo_dir, mfile, b->file);
    return false;
  }
  src = g_build_filename(mp, "disk.raw", NULL);
  if (stat(src, &sb) < 0) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", src, g_strerror(errno));
    return false;
  }
  if ((uint64_t)sb.st_ino != src_ino)
    cli_debug("%s: inode %" PRIu64 ", the mount said %" PRIu64, src, (uint64_t)sb.st_ino,
              src_ino);

  if (lstat(o->output, &(struct stat){ 0 }) == 0) {
    if (!check_resume(o, b, src_ino, error))
      return false;
  } else if (errno != ENOENT) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: %s", o->output, g_strerror(errno));
    return false;
  } else {
    struct cbt_rstate_info info = {
      .image_size = b->image_size,
      .source_ino = src_ino,
      .granularity = GRANULARITY,
    };
    struct stat ob;

    if (access(o->state, F_OK) == 0) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED,
                  "%s exists but %s does not: remove the state file to start again",
                  o->state, o->output);
      return false;
    }
    if (strlen(b->file) > CBT_RSTATE_NAME_MAX) {
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: backup file name too long",
                  b->file);
      return false;
    }
    strcpy(info.source_name, b->file);
    if (!create_output(o->output, b->image_size, error))
      return false;
    if (stat(o->output, &ob) < 0) {
      rc = -errno;
    } else {
      info.output_ino = (uint64_t)ob.st_ino;
      rc = cbt_rstate_create(o->state, &info, &why);
    }
    if (rc < 0) {
      unlink(o->output);
      g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s", why ? why : g_strerror(-rc));
      return false;
    }
    cli_note("restoring %s (backup %u) into %s while serving it", b->file, b->seq,
             o->output);
  }

  /* The mount's pipe and the lock across the exec, for the daemon to
   * close once it no longer reads the backup. */
  if ((life_fd = fcntl(life, F_DUPFD, 3)) < 0 ||
      (r->lock_fd >= 0 && (lock_fd = fcntl(r->lock_fd, F_DUPFD, 3)) < 0)) {
    g_set_error(error, CLI_ERROR, CLI_EXIT_FAILED, "%s: keeping the mount and the lock "
                "for cbt-filterd: %s", o->repo_dir, g_strerror(errno));
    return false;
  }

  g_ptr_array_add(av, g_strdup(filterd));
  g_ptr_array_add(av, g_strdup("--image"));
  g_ptr_array_add(av, g_strdup(o->output));
  g_ptr_array_add(av, g_strdup(is_qcow2(o->output) ? "--format=qcow2" : "--format=raw"));
  g_ptr_array_add(av, g_strdup("--restore-from"));
  g_ptr_array_add(av, g_strdup(src));
  /* The private mount's disk.raw is a disk, which may begin with
   * anything, a qcow2 magic too: never let the daemon guess. */
  g_ptr_array_add(av, g_strdup("--restore-from-format=raw"));
  g_ptr_array_add(av, g_strdup("--restore-state"));
  g_ptr_array_add(av, g_strdup(o->state));
  g_ptr_array_add(av, g_strdup_printf("--restore-release-fd=%d", life_fd));
  if (lock_fd >= 0)
    g_ptr_array_add(av, g_strdup_printf("--restore-release-fd=%d", lock_fd));
  g_ptr_array_add(av, g_strdup_printf("--description=instant restore of cbt backup %u (%s)",
                                      b->seq, b->file));
  cli_argv_add_opt(av, "--restore-rate", o->rate);
  cli_argv_add_opt(av, "--socket", o->socket);
  cli_argv_add_opt(av, "--listen", o->listen);
  cli_argv_add_opt(av, "--control", o->control);
  cli_argv_add_opt(av, "--bitmap", o->bitmap);
  cli_argv_add_opt(av, "--pid-file", o->pid_file);
  /* The S3 client's connections are of no use to the daemon; the lock's
   * duplicate stays. */
  g_clear_pointer(&r, repo_free);
  return cli_exec(filterd, av, o->extra, error);
}

int
cmd_restore_instant(int argc, char **argv)
{
  g_autofree char *dir = NULL, *at = NULL, *out = NULL, *state = NULL, *socket = NULL;
  g_autofree char *listen = NULL, *ctl = NULL, *bitmap = NULL, *rate = NULL;
  g_autofree char *pid_file = NULL;
  gboolean instant = FALSE;
  GError *error = NULL;
  GOptionEntry entries[] = {
    { "instant", 0, 0, G_OPTION_ARG_NONE, &instant, "serve the disk now, copy it in the background", NULL },
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &dir, "repository: a directory or s3://BUCKET/PREFIX", "DIR" },
    CLI_S3_OPTION,
    { "at", 'a', 0, G_OPTION_ARG_STRING, &at, "the backup to restore: seq number, file name or 'latest' (default)", "BACKUP" },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &out, "FILE.qcow2 or a raw FILE", "OUTPUT" },
    { "state", 0, 0, G_OPTION_ARG_FILENAME, &state, "progress file (default OUTPUT.restore-state)", "FILE" },
    { "socket", 's', 0, G_OPTION_ARG_FILENAME, &socket, "serve on a unix socket", "PATH" },
    { "listen", 'l', 0, G_OPTION_ARG_STRING, &listen, "serve on TCP", "HOST:PORT" },
    { "control", 'c', 0, G_OPTION_ARG_FILENAME, &ctl, "control socket (status shows the progress)", "PATH" },
    { "bitmap", 'b', 0, G_OPTION_ARG_FILENAME, &bitmap, "track guest writes in this bitmap file from the first one", "PATH" },
    { "rate", 0, 0, G_OPTION_ARG_STRING, &rate, "copy at most SIZE bytes per second in the background (at least 1M; default: no limit)", "SIZE" },
    { "pid-file", 'P', 0, G_OPTION_ARG_FILENAME, &pid_file, "write the pid here once serving", "FILE" },
    { NULL }
  };
  g_autoptr(GOptionContext) octx =
    cli_option_context("restore --instant", "[-- CBT-FILTERD-OPTION...]",
                       "Serve the disk as of one backup now, read-write, while it is\n"
                       "copied into OUTPUT in the background.",
                       "Runs cbt-filterd in this process (same pid; SIGTERM stops it).\n"
                       "Reads of what is not copied yet come from the backup; writes go\n"
                       "to OUTPUT and are kept.  When the copy is done OUTPUT is a\n"
                       "standalone image and is still served.  Progress is kept in\n"
                       "OUTPUT.restore-state: after SIGTERM or a crash the same command\n"
                       "goes on where it stopped.  An existing OUTPUT that is not this\n"
                       "restore in progress is refused.  As cbt restore does, every\n"
                       "chunk of the backup is checked against the manifest's checksum\n"
                       "before it is served or copied: damage stops the restore with\n"
                       "exit status 4, the log naming the file and byte range, and\n"
                       "none of it reaches OUTPUT.  Needs FUSE, as cbt mount.  Options\n"
                       "after -- go to cbt-filterd (e.g. --threads, --verbose).\n\n"
                       CLI_EXIT_CODES_HELP,
                       entries);
  struct instant_opts o;
  char **extra = NULL;

  if (!cli_parse(octx, "restore --instant", &argc, &argv))
    return CLI_EXIT_USAGE;
  if (argc > 1) {
    extra = argv + 1;
    if (strcmp(extra[0], "--") == 0)
      extra++;
    else if (extra[0][0] != '-')
      return cli_usage_error("restore --instant", "unexpected argument '%s'", extra[0]);
  }
  if (!dir)
    return cli_usage_error("restore --instant", "--repo is required");
  if (!out)
    return cli_usage_error("restore --instant", "--output is required");
  if (strstr(out, "://"))
    return cli_usage_error("restore --instant", "--output must be a file, not %s", out);
  if (!socket && !listen)
    return cli_usage_error("restore --instant", "--socket or --listen is required");
  if (!state)
    state = g_strconcat(out, STATE_SUFFIX, NULL);
  o = (struct instant_opts){ .repo_dir = dir, .at = at, .output = out, .state = state,
                             .socket = socket, .listen = listen, .control = ctl,
                             .bitmap = bitmap, .rate = rate, .pid_file = pid_file,
                             .extra = extra };
  return instant_run(&o, &error) ? CLI_EXIT_OK : cli_report(error);
}
