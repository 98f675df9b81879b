/* cbt-filterd: serve a disk image over NBD and record every write.
 *
 * Start-up order matters: the image (and bitmap) are opened and validated,
 * the listening sockets bound and the workers started before the pid file
 * is written and READY=1 sent (sd-notify.c), so a supervisor that waits
 * for either knows the daemon is ready.  Listening sockets are the
 * daemon's own (--socket, --listen, --control) or inherited from a
 * service manager (sd-activation.c); those stay the manager's and are
 * never unlinked.  Shutdown (SIGTERM/SIGINT) stops accepting, ends negotiations,
 * lets the workers finish every request already read and send its reply,
 * flushes the image, and only then removes the socket and pid file.
 */
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cbt/util.h"
#include "internal.h"

#define DEFAULT_MAX_CLIENTS 1024
#define NOFILE_RESERVE      64   /* descriptors for images, rings, logs */
#define DEFAULT_MAX_MEMORY  (UINT64_C(512) << 20)
/* Two of the largest requests, so one client can always make progress. */
#define MIN_MAX_MEMORY      (UINT64_C(64) << 20)

struct server srv;

static char *opt_cache;
static char *opt_bitmap;
static char *opt_bitmap_name;
static char *opt_granularity;
static int opt_threads;
static int opt_timeout = 10;
static int opt_max_clients = DEFAULT_MAX_CLIENTS;
static char *opt_max_memory;
static char *opt_tls;
static char *opt_scratch_limit;
static char *opt_tracking;
static char *opt_socket_mode;
static char *opt_socket_group;
static mode_t socket_mode = 0600;       /* --socket-mode: the daemon's user only */
static gid_t socket_gid = (gid_t)-1;    /* --socket-group: unchanged */
static char *opt_restore_rate;
static struct restore_config restore_cfg = { .sync_interval = 1 };

/* --restore-release-fd FD, repeatable (cbt restore --instant hands over
 * the repository lock and the private mount it reads through). */
static gboolean
parse_release_fd(const gchar *name, const gchar *value, gpointer data, GError **error)
{
  char *end = NULL;
  long fd;

  (void)data;
  errno = 0;
  fd = strtol(value, &end, 10);
  if (errno || end == value || *end || fd <= 2 || fd > INT_MAX) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "%s %s: expected an inherited descriptor above 2", name, value);
    return FALSE;
  }
  if (restore_cfg.n_release_fd == RESTORE_RELEASE_MAX) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "%s: at most %d", name, RESTORE_RELEASE_MAX);
    return FALSE;
  }
  restore_cfg.release_fd[restore_cfg.n_release_fd++] = (int)fd;
  return TRUE;
}

static GOptionEntry entries[] = {
  { "image", 'i', 0, G_OPTION_ARG_FILENAME, &srv.image_path, "Disk image to serve, or memory:SIZE (an empty disk in RAM, e.g. memory:64M)", "PATH" },
  { "format", 'f', 0, G_OPTION_ARG_STRING, &srv.format, "Image format: raw, qcow2 or auto (default auto)", "FMT" },
  { "socket", 's', 0, G_OPTION_ARG_FILENAME, &srv.socket_path, "Listen on a unix socket", "PATH" },
  { "listen", 'l', 0, G_OPTION_ARG_STRING, &srv.listen_addr, "Listen on TCP", "HOST:PORT" },
  { "export-name", 'e', 0, G_OPTION_ARG_STRING, &srv.export_name, "Export name (default \"\")", "NAME" },
  { "description", 0, 0, G_OPTION_ARG_STRING, &srv.description, "Export description", "TEXT" },
  { "read-only", 'r', 0, G_OPTION_ARG_NONE, &srv.read_only, "Serve read-only", NULL },
  { "cache", 0, 0, G_OPTION_ARG_STRING, &opt_cache, "writeback (default) or none (O_DIRECT)", "MODE" },
  { "threads", 't', 0, G_OPTION_ARG_INT, &opt_threads, "Worker threads (default: online CPUs)", "N" },
  { "handshake-timeout", 0, 0, G_OPTION_ARG_INT, &opt_timeout, "Seconds a client may take to negotiate (default 10)", "S" },
  { "max-clients", 0, 0, G_OPTION_ARG_INT, &opt_max_clients, "Most NBD clients connected at once, negotiating or not (default 1024); more are refused and logged", "N" },
  { "max-memory", 0, 0, G_OPTION_ARG_STRING, &opt_max_memory, "Most memory for request buffers of all clients together (default 512M, at least 64M); past it clients wait", "SIZE" },
  { "tls", 0, 0, G_OPTION_ARG_STRING, &opt_tls, "off (default), on (clients may use TLS) or require (clients must)", "MODE" },
  { "tls-certificates", 0, 0, G_OPTION_ARG_FILENAME, &srv.tls_certificates, "X.509 files: ca-cert.pem, server-cert.pem, server-key.pem (as nbdkit)", "DIR" },
  { "tls-psk", 0, 0, G_OPTION_ARG_FILENAME, &srv.tls_psk, "TLS with pre-shared keys from a psktool file instead of certificates", "FILE" },
  { "tls-verify-peer", 0, 0, G_OPTION_ARG_NONE, &srv.tls_verify_peer, "Require client certificates signed by the CA in --tls-certificates", NULL },
  { "bitmap", 'b', 0, G_OPTION_ARG_FILENAME, &opt_bitmap, "Dirty bitmap file (created if missing)", "PATH" },
  { "bitmap-name", 0, 0, G_OPTION_ARG_STRING, &opt_bitmap_name, "Name of the active bitmap (default cbt)", "NAME" },
  { "granularity", 'g', 0, G_OPTION_ARG_STRING, &opt_granularity, "Bitmap granularity when creating (default 64K)", "SIZE" },
  { "tracking", 0, 0, G_OPTION_ARG_STRING, &opt_tracking, "crash-safe (default): a bit is on disk before its write, so a crash keeps incremental backups; lazy: written every few seconds, a crash forces a full backup", "MODE" },
  { "scratch", 0, 0, G_OPTION_ARG_FILENAME, &srv.scratch_dir, "Directory for the point-in-time view's copies (default: the bitmap's)", "DIR" },
  { "scratch-limit", 0, 0, G_OPTION_ARG_STRING, &opt_scratch_limit, "Most scratch space one backup may use (default: a quarter of the disk, at least 1G)", "SIZE" },
  { "control", 'c', 0, G_OPTION_ARG_FILENAME, &srv.control_path, "Control socket (JSON, one request per line)", "PATH" },
  { "socket-mode", 0, 0, G_OPTION_ARG_STRING, &opt_socket_mode, "Permissions of the unix sockets the daemon creates, --socket and --control (octal, default 0600)", "MODE" },
  { "socket-group", 0, 0, G_OPTION_ARG_STRING, &opt_socket_group, "Group of the unix sockets the daemon creates (name or number)", "GROUP" },
  { "pid-file", 'P', 0, G_OPTION_ARG_FILENAME, &srv.pid_file, "Write the pid here once ready", "FILE" },
  { "restore-from", 0, 0, G_OPTION_ARG_FILENAME, &restore_cfg.source, "Instant restore: serve --image while this backup image (qcow2 with its chain) is copied into it (cbt restore --instant runs this)", "IMAGE" },
  { "restore-state", 0, 0, G_OPTION_ARG_FILENAME, &restore_cfg.state, "Instant restore: its progress file (restore-state-format.md)", "FILE" },
  { "restore-rate", 0, 0, G_OPTION_ARG_STRING, &opt_restore_rate, "Instant restore: copy at most SIZE bytes per second in the background (default: no limit)", "SIZE" },
  { "restore-sync-interval", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT, &restore_cfg.sync_interval, "Instant restore: record the progress every S seconds (default 1; FLUSH always does)", "S" },
  { "restore-from-format", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_STRING, &restore_cfg.source_format, "Instant restore: the format of --restore-from, raw or qcow2 (default: detect; cbt restore --instant gives raw for an S3 point, a disk that may begin with anything)", "FORMAT" },
  { "restore-release-fd", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_CALLBACK, parse_release_fd, "Instant restore: close this inherited descriptor once the backup is no longer read (may be given up to 4 times)", "FD" },
  { "verbose", 'v', 0, G_OPTION_ARG_NONE, &log_verbose, "Log every connection and failed request", NULL },
  { NULL }
};

static uint32_t granularity;

/* "65536", "64K", "1M": a power of two from 512 bytes to 1 GiB. */
static bool
parse_granularity(const char *s, uint32_t *out, GError **error)
{
  uint64_t v;

  if (cbt_parse_size(s, &v) < 0 || v < 512 || v > (1u << 30) || (v & (v - 1)) != 0) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--granularity %s: expected a power of two from 512 to 1G", s);
    return false;
  }
  *out = (uint32_t)v;
  return true;
}

/* "1073741824", "512M", "10G", "1T": bytes, at least 1 MiB. */
static bool
parse_size(const char *opt, const char *s, uint64_t *out, GError **error)
{
  if (cbt_parse_size(s, out) < 0 || *out < (1u << 20)) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "%s %s: expected a size of at least 1M (e.g. 512M, 20G)", opt, s);
    return false;
  }
  return true;
}

static bool
parse_tls(GError **error)
{
  if (!opt_tls || strcmp(opt_tls, "off") == 0)
    srv.tls_mode = TLS_OFF;
  else if (strcmp(opt_tls, "on") == 0)
    srv.tls_mode = TLS_ON;
  else if (strcmp(opt_tls, "require") == 0)
    srv.tls_mode = TLS_REQUIRE;
  else {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--tls %s: expected off, on or require", opt_tls);
    return false;
  }
  if (srv.tls_mode == TLS_OFF) {
    if (srv.tls_certificates || srv.tls_psk || srv.tls_verify_peer) {
      g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                  "--tls-certificates, --tls-psk and --tls-verify-peer need --tls on or require");
      return false;
    }
    return true;
  }
  if (!srv.tls_certificates == !srv.tls_psk) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--tls %s needs exactly one of --tls-certificates DIR and --tls-psk FILE",
                opt_tls);
    return false;
  }
  if (srv.tls_verify_peer && srv.tls_psk) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--tls-verify-peer is for certificates; with --tls-psk the key is the proof");
    return false;
  }
  return true;
}

/* --socket-mode: permission bits in octal, "0660" or "660". */
static bool
parse_socket_mode(const char *s, GError **error)
{
  unsigned long v;

  if (!*s || strspn(s, "01234567") != strlen(s) || strlen(s) > 4 ||
      (v = strtoul(s, NULL, 8)) > 0777) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--socket-mode %s: expected permission bits in octal, e.g. 0660", s);
    return false;
  }
  socket_mode = (mode_t)v;
  return true;
}

/* --socket-group: a group name, or a number. */
static bool
parse_socket_group(const char *s, GError **error)
{
  const struct group *gr;

  if (*s && strspn(s, "0123456789") == strlen(s) && strlen(s) < 10) {
    socket_gid = (gid_t)strtoul(s, NULL, 10);
    return true;
  }
  gr = getgrnam(s);              /* before any thread starts */
  if (!gr) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--socket-group %s: no such group", s);
    return false;
  }
  socket_gid = gr->gr_gid;
  return true;
}

/* The --restore-* options: all or nothing, and a writable image. */
static bool
parse_restore(GError **error)
{
  if (!restore_cfg.source != !restore_cfg.state) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--restore-from and --restore-state go together");
    return false;
  }
  if (!restore_cfg.source) {
    if (opt_restore_rate || restore_cfg.n_release_fd > 0) {
      g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                  "--restore-rate and --restore-release-fd need --restore-from");
      return false;
    }
    return true;
  }
  if (srv.read_only) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--restore-from writes the restored data into --image: not with --read-only");
    return false;
  }
  if (opt_restore_rate &&
      !parse_size("--restore-rate", opt_restore_rate, &restore_cfg.rate, error))
    return false;
  if (restore_cfg.sync_interval < 1 || restore_cfg.sync_interval > 86400) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--restore-sync-interval %d: expected 1 to 86400", restore_cfg.sync_interval);
    return false;
  }
  srv.restoring = true;
  return true;
}

static bool
parse_args(int argc, char **argv, GError **error)
{
  g_autoptr(GOptionContext) ctx = g_option_context_new("- serve a disk image over NBD with dirty tracking");

  g_option_context_add_main_entries(ctx, entries, NULL);
  if (!g_option_context_parse(ctx, &argc, &argv, error))
    return false;
  if (argc > 1) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "unexpected argument '%s'", argv[1]);
    return false;
  }
  if (!srv.image_path || !*srv.image_path) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED, "--image is required");
    return false;
  }
  if ((opt_socket_mode || opt_socket_group) && !srv.socket_path && !srv.control_path) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--socket-mode and --socket-group need --socket or --control (for "
                "sockets from a service manager, set SocketMode= and SocketGroup= "
                "in the .socket unit)");
    return false;
  }
  if (opt_socket_mode && !parse_socket_mode(opt_socket_mode, error))
    return false;
  if (opt_socket_group && !parse_socket_group(opt_socket_group, error))
    return false;
  if (!opt_cache || strcmp(opt_cache, "writeback") == 0)
    srv.cache = CACHE_WRITEBACK;
  else if (strcmp(opt_cache, "none") == 0)
    srv.cache = CACHE_NONE;
  else {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--cache %s: expected writeback or none", opt_cache);
    return false;
  }
  if (opt_threads < 0 || opt_threads > 64) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--threads %d: expected 1 to 64", opt_threads);
    return false;
  }
  srv.n_workers = opt_threads ? (unsigned)opt_threads : (unsigned)MAX(1, g_get_num_processors());
  if (opt_timeout < 1 || opt_timeout > 3600) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--handshake-timeout %d: expected 1 to 3600", opt_timeout);
    return false;
  }
  srv.handshake_timeout = (unsigned)opt_timeout;
  if (opt_max_clients < 1 || opt_max_clients > 1000000) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--max-clients %d: expected 1 to 1000000", opt_max_clients);
    return false;
  }
  srv.max_clients = (unsigned)opt_max_clients;
  if (!parse_tls(error))
    return false;
  srv.max_memory = DEFAULT_MAX_MEMORY;
  if (opt_max_memory &&
      (cbt_parse_size(opt_max_memory, &srv.max_memory) < 0 ||
       srv.max_memory < MIN_MAX_MEMORY)) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--max-memory %s: expected a size of at least 64M", opt_max_memory);
    return false;
  }
  if ((opt_bitmap_name || opt_granularity) && !opt_bitmap) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--bitmap-name and --granularity need --bitmap");
    return false;
  }
  if (opt_granularity && !parse_granularity(opt_granularity, &granularity, error))
    return false;
  if (opt_tracking && strcmp(opt_tracking, "crash-safe") != 0 &&
      strcmp(opt_tracking, "lazy") != 0) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--tracking %s: expected crash-safe or lazy", opt_tracking);
    return false;
  }
  if (opt_tracking && !opt_bitmap) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED, "--tracking needs --bitmap");
    return false;
  }
  if ((srv.scratch_dir || opt_scratch_limit) && !opt_bitmap) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--scratch and --scratch-limit need --bitmap (point-in-time views "
                "belong to checkpoints)");
    return false;
  }
  if (opt_scratch_limit &&
      !parse_size("--scratch-limit", opt_scratch_limit, &srv.scratch_limit, error))
    return false;
  if (!parse_restore(error))
    return false;
  if (!srv.export_name)
    srv.export_name = "";
  if (strlen(srv.export_name) > CBT_NBD_MAX_NAME_LEN) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "--export-name: longer than %u bytes", CBT_NBD_MAX_NAME_LEN);
    return false;
  }
  return true;
}

static bool
open_image(GError **error)
{
  g_autofree char *why = NULL;
  int r = cbt_image_open(srv.image_path, srv.format, srv.read_only,
                         srv.cache == CACHE_NONE, &srv.image, &why);

  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r), "%s",
                why ? why : g_strerror(-r));
    return false;
  }
  return true;
}

static bool
write_pid_file(GError **error)
{
  g_autofree char *s = NULL;

  if (!srv.pid_file)
    return true;
  s = g_strdup_printf("%ld\n", (long)getpid());
  /* Written to a temporary and renamed: readers never see half a pid. */
  return g_file_set_contents(srv.pid_file, s, -1, error);
}

/* After socket activation (@act): is there an NBD listener, and does each
 * socket come from one place only? */
static bool
check_listeners(const struct activation *act, GError **error)
{
  if (srv.socket_path && act->n_nbd > 0) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--socket %s: the NBD socket is inherited from the service manager "
                "(socket activation); leave --socket out", srv.socket_path);
    return false;
  }
  if (srv.control_path && act->control >= 0) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "--control %s: the control socket is inherited from the service "
                "manager (socket activation); leave --control out", srv.control_path);
    return false;
  }
  if (!srv.socket_path && !srv.listen_addr && act->n_nbd == 0) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "one of --socket or --listen is required (or an NBD socket from "
                "the service manager: LISTEN_FDS, named nbd)");
    return false;
  }
  if (act->n_nbd + (srv.socket_path != NULL) + (srv.listen_addr != NULL) > MAX_LISTEN) {
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                "more than %d NBD listening sockets", MAX_LISTEN);
    return false;
  }
  return true;
}

/* NBD over TCP reaches whoever reaches the port: unless TLS is required
 * and authenticates the clients (a PSK, or certificates checked with
 * --tls-verify-peer), say so at every start, for every TCP listener. */
static void
warn_plaintext_tcp(const int *fds, size_t n)
{
  const char *why;

  if (srv.tls_mode == TLS_OFF)
    why = "NBD over TCP without TLS is neither encrypted nor authenticated";
  else if (srv.tls_mode == TLS_ON)
    why = "with --tls on, clients that do not ask for TLS are served unencrypted "
          "and unauthenticated (--tls require refuses them)";
  else if (srv.tls_certificates && !srv.tls_verify_peer)
    why = "TLS without --tls-verify-peer encrypts but does not authenticate clients";
  else
    return;
  for (size_t i = 0; i < n; i++) {
    if (listen_is_tcp(fds[i])) {
      g_autofree char *where = listen_describe(fds[i]);
      log_info("warning: %s: %s: anyone who can reach it can read and write the "
               "disk; use it on trusted networks only", where, why);
    }
  }
}

/* "unix:/run/vm.sock and 127.0.0.1:10809" (g_free). */
static char *
describe_listeners(const int *fds, size_t n)
{
  GString *s = g_string_new(NULL);

  for (size_t i = 0; i < n; i++) {
    g_autofree char *d = listen_describe(fds[i]);
    g_string_append_printf(s, "%s%s", i == 0 ? "" : " and ", d);
  }
  return g_string_free(s, false);
}

/* Every client holds a descriptor: raise the soft limit on open files to
 * the hard one (systemd's default soft limit is 1024), and say so when
 * --max-clients cannot be reached even then. */
static void
raise_nofile_limit(void)
{
  struct rlimit rl;

  if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rlim_t old = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
      rl.rlim_cur = old;
  }
  if (rl.rlim_cur != RLIM_INFINITY &&
      (uint64_t)srv.max_clients + NOFILE_RESERVE > rl.rlim_cur)
    log_error("warning: the limit of %llu open files leaves room for about %llu "
              "clients, fewer than --max-clients %u",
              (unsigned long long)rl.rlim_cur,
              (unsigned long long)(rl.rlim_cur > NOFILE_RESERVE ?
                                   rl.rlim_cur - NOFILE_RESERVE : 0),
              srv.max_clients);
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *where = NULL;
  struct activation act;
  int listen_fds[MAX_LISTEN];
  size_t n_listen = 0;
  int control_fd = -1;
  bool workers_started = false;
  sigset_t mask;
  int status = EXIT_SUCCESS;
  int r;

  if (!parse_args(argc, argv, &error)) {
    fprintf(stderr, "cbt-filterd: %s (see --help)\n", error->message);
    return 2;
  }
  notify_init();
  if (!activation_take(&act, &error))
    goto fail;
  if (!check_listeners(&act, &error)) {
    fprintf(stderr, "cbt-filterd: %s (see --help)\n", error->message);
    notify_send("STATUS=failed: %s", error->message);
    return 2;
  }

  /* Signals are taken from a signalfd by the main loop: block them before
   * any thread starts so every thread inherits the mask. */
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &mask, NULL);
  signal(SIGPIPE, SIG_IGN);
  raise_nofile_limit();

  if (!tls_init(&error))
    goto fail;
  if (!open_image(&error))
    goto fail;
  if (opt_bitmap) {
    struct tracking_config tc = {
      .path = opt_bitmap,
      .name = opt_bitmap_name ? opt_bitmap_name : "cbt",
      .granularity = granularity,
      .read_only = srv.read_only,
      .crash_safe = !opt_tracking || strcmp(opt_tracking, "crash-safe") == 0,
    };
    srv.tracking = tracking_open(&tc, &error);
    if (!srv.tracking)
      goto fail;
  }
  if (srv.restoring && !restore_open(&restore_cfg, &error))
    goto fail;
  for (size_t i = 0; i < act.n_nbd; i++)
    listen_fds[n_listen++] = act.nbd[i];
  if (srv.socket_path) {
    r = listen_unix(srv.socket_path, socket_mode, socket_gid, &error);
    if (r < 0)
      goto fail;
    listen_fds[n_listen++] = r;
  }
  if (srv.listen_addr) {
    r = listen_tcp(srv.listen_addr, &error);
    if (r < 0)
      goto fail;
    listen_fds[n_listen++] = r;
  }
  control_fd = act.control;
  if (srv.control_path) {
    control_fd = listen_unix(srv.control_path, socket_mode, socket_gid, &error);
    if (control_fd < 0)
      goto fail;
  }
  if (!workers_start(srv.n_workers, &error))
    goto fail;
  workers_started = true;
  if (!restore_start(&error))
    goto fail;
  if (!handshake_init(&error))
    goto fail;
  if (!write_pid_file(&error))
    goto fail;

  where = describe_listeners(listen_fds, n_listen);
  log_info("serving %s (%s, %" PRIu64 " bytes%s) on %s%s",
           srv.image_path, srv.image->format, srv.image->size,
           srv.read_only ? ", read-only" : "", where,
           act.n_nbd || act.control >= 0 ? " (sockets from the service manager)" : "");
  warn_plaintext_tcp(listen_fds, n_listen);
  notify_ready();

  if (!main_loop_run(listen_fds, n_listen, control_fd, &error)) {
    log_error("%s", error->message);
    g_clear_error(&error);
    status = EXIT_FAILURE;
  }

  /* Orderly stop: no new connections, no new negotiations, finish what
   * the workers hold, then make it durable. */
  notify_send("STOPPING=1\nSTATUS=stopping: finishing requests, flushing %s",
              srv.image_path);
  atomic_store(&srv.stopping, true);
  for (size_t i = 0; i < n_listen; i++)
    close(listen_fds[i]);
  if (srv.socket_path)
    unlink(srv.socket_path);
  if (control_fd >= 0)
    close(control_fd);
  if (srv.control_path)
    unlink(srv.control_path);
  /* Control clients may be in the middle of a checkpoint operation: they
   * finish it before their thread sees the closed socket. */
  control_stop_all();
  handshake_stop_all();
  workers_stop();
  tls_stop_all();
  tls_deinit();
  /* The restore's progress is recorded after the image is flushed. */
  if (!restore_stop(&error)) {
    log_error("%s", error->message);
    g_clear_error(&error);
    status = EXIT_FAILURE;
  }
  if (!srv.read_only) {
    r = cbt_image_run_sync(srv.image, CBT_IO_FLUSH, 0, 0, 0, NULL);
    if (r < 0) {
      log_error("%s: flush at shutdown failed: %s", srv.image_path, g_strerror(-r));
      status = EXIT_FAILURE;
    }
  }
  /* The clean flag is set only after the image data is durable: a bitmap
   * marked clean must describe everything on disk. */
  if (status != EXIT_SUCCESS && srv.tracking)
    log_error("%s: left not clean because the image could not be flushed", opt_bitmap);
  if (!tracking_close(srv.tracking, status == EXIT_SUCCESS, &error)) {
    log_error("%s", error->message);
    g_clear_error(&error);
    status = EXIT_FAILURE;
  }
  srv.tracking = NULL;
  cbt_image_close(srv.image);
  if (srv.pid_file)
    unlink(srv.pid_file);
  log_info("stopped");
  /* Last, so that a clean shutdown still marked the bitmap clean. */
  if (status == EXIT_SUCCESS && restore_damaged())
    return RESTORE_EXIT_DAMAGED;
  return status;

fail:
  fprintf(stderr, "cbt-filterd: %s\n", error->message);
  notify_send("STATUS=failed: %s", error->message);
  handshake_stop_all();
  if (workers_started)
    workers_stop();
  restore_stop(NULL);
  tls_deinit();
  if (srv.tracking) {
    /* Nothing was served: no write can be missing from the bitmap. */
    tracking_close(srv.tracking, true, NULL);
    srv.tracking = NULL;
  }
  cbt_image_close(srv.image);
  srv.image = NULL;
  for (size_t i = 0; i < n_listen; i++)
    close(listen_fds[i]);
  if (srv.socket_path && n_listen > 0)
    unlink(srv.socket_path);
  if (control_fd >= 0) {
    close(control_fd);
    if (srv.control_path)
      unlink(srv.control_path);
  }
  return EXIT_FAILURE;
}
