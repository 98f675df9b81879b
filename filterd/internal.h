/* cbt-filterd internals: one header, one section per file that defines
 * the symbols (in the spirit of nbdkit's server/internal.h).
 *
 * Threads:
 *   main thread   main-loop.c: accepts connections, signals, timers, the
 *                 control socket; never touches the data path.
 *   negotiation   handshake.c: one thread and io_uring running every
 *                 option negotiation (negotiate.c's state machine) with a
 *                 deadline each, then handing the socket to a worker.
 *   workers       worker.c: N threads, each owning one io_uring that carries
 *                 socket receives and sends and all image I/O of the
 *                 connections assigned to it.  A connection lives on one
 *                 worker for its whole life, so its state needs no lock.
 */
#ifndef CBT_FILTERD_INTERNAL_H
#define CBT_FILTERD_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <glib.h>
#include <liburing.h>

#include "cbt/image.h"
#include "cbt/nbd-proto.h"
#include "layer.h"

/* ---- log.c ---- */
extern bool log_verbose;
extern bool log_quiet;                 /* fuzz targets: format, print nothing */
void log_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
void log_info(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
void log_debug(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
#define debug(...) do { if (log_verbose) log_debug(__VA_ARGS__); } while (0)

/* ---- main.c ---- */
enum cache_mode { CACHE_WRITEBACK, CACHE_NONE };

struct server {
  /* Configuration, read-only once the workers run. */
  const char *image_path;
  const char *format;
  const char *socket_path;       /* unix listener, or NULL */
  const char *listen_addr;       /* HOST:PORT, or NULL */
  const char *export_name;
  const char *description;
  const char *pid_file;
  const char *control_path;      /* control socket, or NULL */
  bool read_only;
  enum cache_mode cache;
  unsigned n_workers;
  unsigned handshake_timeout;    /* seconds */
  unsigned max_clients;          /* NBD clients at once (--max-clients) */
  uint64_t max_memory;           /* request buffers, daemon-wide (--max-memory) */
  enum tls_mode { TLS_OFF, TLS_ON, TLS_REQUIRE } tls_mode;   /* --tls */
  const char *tls_certificates;  /* --tls-certificates DIR */
  const char *tls_psk;           /* --tls-psk FILE */
  bool tls_verify_peer;          /* --tls-verify-peer */

  const char *scratch_dir;       /* --scratch, default: the bitmap's directory */
  uint64_t scratch_limit;        /* --scratch-limit, 0: default */

  struct cbt_image *image;
  struct tracking *tracking;     /* dirty tracking, or NULL */
  bool restoring;                /* --restore-from: an instant restore (restore.c) */

  atomic_bool stopping;
};
extern struct server srv;

/* ---- listen.c ---- */
/* A listening unix socket at @path with file mode @mode and group @gid
 * ((gid_t)-1: the daemon's), both set before anyone can connect. */
int listen_unix(const char *path, mode_t mode, gid_t gid, GError **error);
int listen_tcp(const char *hostport, GError **error);
/* "unix:PATH", "HOST:PORT" or "[HOST]:PORT" of listening socket @fd
 * (g_free), for messages. */
char *listen_describe(int fd);
/* Is @fd a TCP socket? */
bool listen_is_tcp(int fd);

/* ---- main-loop.c ---- */
#define MAX_LISTEN 4             /* NBD listening sockets, at most */
/* Run until SIGTERM/SIGINT.  @listen_fds take NBD clients, @control_fd
 * (or -1) control clients; the caller closes them afterwards. */
bool main_loop_run(const int *listen_fds, size_t n_listen, int control_fd,
                   GError **error);

/* ---- sd-activation.c ---- */
/* Sockets inherited from a service manager (LISTEN_FDS). */
struct activation {
  int nbd[MAX_LISTEN];           /* NBD listeners */
  size_t n_nbd;
  int control;                   /* the control socket, or -1 */
};
/* Take the inherited sockets meant for this process (none when not
 * socket-activated) and unset LISTEN_*; false if they are unusable. */
bool activation_take(struct activation *a, GError **error);

/* ---- sd-notify.c ---- */
/* Read (and unset) NOTIFY_SOCKET; all below do nothing without it. */
void notify_init(void);
void notify_send(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
/* READY=1 with the first STATUS line. */
void notify_ready(void);
/* Once a second: send STATUS again if it changed. */
void notify_tick(void);

/* ---- handshake.c ---- */
#define MAX_META_SELECTED 8

struct snapshot;

/* What a connection negotiated; handed from the handshake to a worker. */
struct conn_params {
  int fd;
  struct snapshot *snap;         /* the @checkpoint export (a reference), or NULL */
  bool structured;
  unsigned n_meta;
  uint32_t meta_ids[MAX_META_SELECTED];
  char peer[64];
};
/* Start the negotiation loop's thread (before any handshake_start). */
bool handshake_init(GError **error);
/* Negotiate on @fd (takes ownership); called by the main thread. */
void handshake_start(int fd, const char *peer);
/* Connections negotiating now. */
unsigned handshake_count(void);
/* Cut every negotiation still running and stop the loop. */
void handshake_stop_all(void);

/* ---- tls.c ---- */
/* Load the credentials --tls asks for (nothing when TLS is off). */
bool tls_init(GError **error);
void tls_deinit(void);
/* STARTTLS was acknowledged on @net (taken over): run the handshake
 * within @deadline and the record layer from now on; returns the
 * plaintext socket the daemon goes on with, or -1. */
int tls_start(int net, const char *peer, gint64 deadline);
/* Shut every TLS client down and wait for their threads. */
void tls_stop_all(void);

/* ---- negotiate.c ---- */
/* The negotiation state machine, without I/O (see the file's comment). */
struct nego;
enum nego_state {
  NEGO_RUNNING,
  NEGO_DONE,                     /* send the output, then transmission */
  NEGO_CLOSE,                    /* send the output, then close */
  NEGO_STARTTLS,                 /* send the output, start TLS, then
                                  * nego_tls_started() */
};
/* A negotiation with @peer (for messages); the greeting is queued. */
struct nego *nego_new(const char *peer);
void nego_free(struct nego *n);
enum nego_state nego_state(const struct nego *n);
/* Where the next client bytes go, and at most how many (0: none wanted). */
void *nego_recv_buf(struct nego *n, size_t *len);
/* @got bytes (at most what nego_recv_buf allowed) were received there. */
void nego_received(struct nego *n, size_t got);
/* Replies queued for sending, and how many of them were sent. */
const void *nego_output(const struct nego *n, size_t *len);
void nego_sent(struct nego *n, size_t len);
/* TLS is up: negotiation goes on (over the TLS session). */
void nego_tls_started(struct nego *n);
/* What was negotiated (fd is -1; the driver sets it). */
struct conn_params *nego_params(struct nego *n);
uint16_t export_flags(bool structured, bool view);

/* ---- client-threads.c ---- */
/* A set of threads each serving one socket; static zero-initialised
 * storage is ready to use (GMutex/GCond need no init when static). */
struct client_threads {
  const char *what;              /* for messages: "control connections" */
  unsigned max;
  GMutex lock;
  GCond cond;
  unsigned count;
  GArray *fds;
};
/* Run @fn(@arg) in a detached thread serving @fd.  False if refused (too
 * many, stopping, no thread): the caller still owns @fd and @arg. */
bool client_threads_start(struct client_threads *ct, int fd, const char *peer,
                          void *(*fn)(void *), void *arg);
/* The thread's last call: forgets and closes @fd. */
void client_threads_done(struct client_threads *ct, int fd);
/* Shut every socket of the set down and wait for all its threads. */
void client_threads_stop_all(struct client_threads *ct);

/* ---- control.c ---- */
/* Serve a control client on @fd in a new thread (takes ownership). */
void control_start(int fd);
/* Close every control connection and wait for their threads. */
void control_stop_all(void);
/* The reply to one request line: @line holds @len bytes and a NUL where
 * its '\n' was (a trailing '\r' is dropped in place).  Returns the reply
 * line with its '\n' (g_free), or NULL for a blank line, which gets none.
 * Runs the command, as a control client's thread does (also the entry
 * point of fuzz/fuzz-control.c). */
char *control_reply(char *line, size_t len);

/* ---- meta.c ---- */
#define META_ID_BASE_ALLOCATION 1
#define META_ID_DIRTY_FIRST     2

struct meta_context {
  uint32_t id;
  char name[256];
};
/* Contexts the server offers now on the main export, or on the
 * @checkpoint export when @view; returns how many were written. */
size_t meta_list(struct meta_context *out, size_t max, bool view);
/* Does @query (a full name or a "namespace:" prefix for LIST) match? */
bool meta_query_matches(const char *query, const char *name, bool list);
/* Extents of context @id over [offset, offset+len): at least one, all
 * within len; at most one with @req_one.  Returns count or -errno. */
int meta_extents(struct snapshot *snap, uint32_t id, uint64_t offset,
                 uint32_t len, bool req_one, struct cbt_extent *ext, size_t max);

/* ---- bufpool.c ---- */
/* Page-aligned buffers recycled per worker; sizes round up to a power of
 * two.  Not thread-safe: each worker has its own pool. */
struct bufpool;
struct bufpool *bufpool_new(void);
void bufpool_free(struct bufpool *p);
void *bufpool_get(struct bufpool *p, size_t len);
void bufpool_put(struct bufpool *p, void *buf, size_t len);
/* Free the buffers that stayed idle since the last trim; bytes freed. */
size_t bufpool_trim(struct bufpool *p);

/* ---- memcap.c ---- */
/* The daemon-wide budget of request buffers (--max-memory). */
/* Take @len bytes if the budget allows; false if not (nothing taken). */
bool memcap_take(size_t len);
/* Take @len bytes even past the budget (small, bounded buffers). */
void memcap_charge(size_t len);
/* Give back what was taken or charged.  True if connections wait for
 * memory: the caller wakes their workers. */
bool memcap_give(size_t len);
/* A connection starts / stops waiting for memory. */
void memcap_wait(void);
void memcap_unwait(void);
/* Does any connection wait for memory? */
bool memcap_pressure(void);
uint64_t memcap_used(void);

/* ---- worker.c (the request path itself is in worker.h) ---- */
bool workers_start(unsigned n, GError **error);
/* Give a negotiated connection to a worker (any thread). */
void workers_add_conn(const struct conn_params *p);
/* Ask every worker to finish its requests and close; waits for them. */
void workers_stop(void);
unsigned workers_conn_count(void);
/* From the main loop about once a second: return idle pooled memory;
 * under memory pressure, close clients that stopped reading replies. */
void workers_tick(void);

/* ---- tracking.c ---- */
struct tracking;
struct tracking_config {
  const char *path;
  const char *name;
  uint32_t granularity;          /* 0: default, only used when creating */
  bool read_only;
  bool crash_safe;               /* --tracking crash-safe (the default) */
};
/* Open (or create) the bitmap file and make "not clean" durable. */
struct tracking *tracking_open(const struct tracking_config *cfg, GError **error);
/* Stop the syncer; with @mark_clean write every bit out and set the clean
 * flag, else leave the file not clean.  Frees @t. */
bool tracking_close(struct tracking *t, bool mark_clean, GError **error);
bool tracking_is_trusted(struct tracking *t);
#define TRACKING_NAME_MAX 48           /* leaves room for "-checkpoint" */

/* What the control socket's "status" reports. */
struct tracking_status {
  const char *path;
  const char *name;
  uint32_t granularity;
  bool trusted;
  bool found_clean;
  bool found_crash_safe;               /* not clean at start, but crash-safe */
  bool crash_safe;                     /* this run's --tracking */
  uint64_t dirty_bytes;
  uint64_t checkpoint;                 /* id that began the active interval */
  uint8_t uuid[16];
  char context[256];
  bool cp_in_progress;
  uint64_t cp_previous;                /* id that began the frozen interval */
  bool cp_trusted;
  uint64_t cp_dirty_bytes;
  char cp_context[256];
};
void tracking_get_status(struct tracking *t, struct tracking_status *st);

/* Control errors (class names in control.c). */
#define CTL_ERROR ctl_error_quark()
GQuark ctl_error_quark(void);
enum {
  CTL_ERR_GENERIC,
  CTL_ERR_IN_PROGRESS,
  CTL_ERR_NO_CHECKPOINT,
  CTL_ERR_MISMATCH,
  CTL_ERR_NO_BITMAP,
  CTL_ERR_READ_ONLY,
  CTL_ERR_BAD_REQUEST,
};
/* Freeze the active bits into a checkpoint and start a new interval;
 * @out (may be NULL) gets the status afterwards. */
enum snapshot_mode { SNAP_OFF, SNAP_FULL, SNAP_INCREMENTAL };
/* With @mode other than SNAP_OFF the checkpoint also opens a point-in-time
 * view (snapshot.c) that protects what that kind of backup reads. */
bool tracking_checkpoint_begin(struct tracking *t, enum snapshot_mode mode,
                               struct tracking_status *out, GError **error);
bool tracking_checkpoint_commit(struct tracking *t, uint64_t id, GError **error);
/* @id NULL: abort whichever checkpoint is in progress. */
bool tracking_checkpoint_abort(struct tracking *t, const uint64_t *id, GError **error);
/* Call done(arg, 0 or -errno) on @ex once every bit set before this
 * call is durable. */
void tracking_flush(struct tracking *t, struct exec *ex,
                    void (*done)(void *arg, int res), void *arg);
/* Dirty-bitmap meta contexts offered now (ids >= META_ID_DIRTY_FIRST);
 * with @frozen_only just the checkpoint's (the @checkpoint export). */
size_t tracking_meta_list(struct tracking *t, struct meta_context *out, size_t max,
                          bool frozen_only);
/* Extents of bitmap context @id; count or -errno (-ENOENT: no such id). */
int tracking_extents(struct tracking *t, uint32_t id, uint64_t offset,
                     uint32_t len, struct cbt_extent *ext, size_t max);
/* Record that [offset, offset+len) is about to change.  Called on the
 * worker thread before a WRITE/WRITE_ZEROES/TRIM is submitted. */
void tracking_mark(struct tracking *t, uint64_t offset, uint64_t len);
/* Crash-safe mode: are the bits of [offset, offset+len) on disk already?
 * (Always true in lazy mode.)  Lock-free. */
bool tracking_is_durable(struct tracking *t, uint64_t offset, uint64_t len);
/* Crash-safe mode: make the (already marked) bits of [offset, offset+len)
 * durable, sharing one bitmap write + fdatasync with every commit waiting
 * at that moment; then done(arg, 0 or -errno) runs on @ex. */
void tracking_commit(struct tracking *t, struct exec *ex, uint64_t offset,
                     uint64_t len, void (*done)(void *arg, int res), void *arg);
/* Periodic work from the main loop (about once a second). */
void tracking_tick(struct tracking *t);

/* ---- quiesce.c ---- */
/* A data-changing request enters before it is marked: true to go on;
 * false if a checkpoint is being taken, then @cont(@arg, 0) runs on @ex once
 * it is over (and must enter again). */
bool quiesce_enter(struct exec *ex, layer_cont *cont, void *arg);
/* ... and leaves once its image I/O completed (or it was refused). */
void quiesce_exit(void);
/* Hold new changes and wait until none is in flight (at most @timeout_s
 * seconds; on timeout the gate opens again and false is returned). */
bool quiesce_begin(unsigned timeout_s);
void quiesce_end(void);

/* ---- snapshot.c ---- */
#define SNAPSHOT_SUFFIX "@checkpoint"  /* export name of the view: NAME@checkpoint */

struct snapshot_status {
  enum snapshot_mode mode;
  char dir[4096];
  uint64_t limit, used, peak;
  uint64_t copied_bytes, copies, released_bytes;
  uint64_t copying;                    /* copies running or queued */
  char failed[512];                    /* why the view failed, or "" */
};
struct cbt_bitmap;
/* A view of an image of @size bytes in granules of @granularity, with an
 * unlinked scratch file in @dir holding at most @limit bytes.  Protects
 * nothing until snapshot_protect(); serves nothing until published. */
struct snapshot *snapshot_new(enum snapshot_mode mode, uint64_t size,
                              uint32_t granularity, const char *dir,
                              uint64_t limit, GError **error);
/* Protect the granules set in @needed (same geometry), or all if NULL. */
void snapshot_protect(struct snapshot *s, const struct cbt_bitmap *needed);
/* Make @s the current view (takes over the caller's reference). */
void snapshot_publish(struct snapshot *s);
/* A reference to the current view, or NULL. */
struct snapshot *snapshot_get(void);
void snapshot_unref(struct snapshot *s);
/* Unpublish and end the current view (commit, abort, shutdown): nothing
 * is protected any more and its export answers ESHUTDOWN. */
void snapshot_end(void);
/* Before a guest change of [offset, offset+len) is submitted: false to go
 * on now, true if it must wait for copies; then @cont(@arg, 0) runs on @ex. */
bool snapshot_before_write(struct exec *ex, uint64_t offset, uint64_t len,
                           layer_cont *cont, void *arg);
/* Read the view: @done(@arg, 0 or -errno) is called on this thread. */
void snapshot_read(struct snapshot *s, struct exec *ex, uint64_t offset,
                   uint32_t len, void *buf, void (*done)(void *arg, int res),
                   void *arg);
/* The backup is done with [offset, offset+len): stop protecting the whole
 * granules inside it and free their scratch space.  0 or -errno. */
int snapshot_release(struct snapshot *s, uint64_t offset, uint64_t len);
/* base:allocation of the view; as meta_extents. */
int snapshot_block_status(struct snapshot *s, uint64_t offset, uint32_t len,
                          struct cbt_extent *ext, size_t max);
/* Fill @st from the current view; false if there is none. */
bool snapshot_get_status(struct snapshot_status *st);
const char *snapshot_mode_name(enum snapshot_mode m);
typedef struct snapshot snapshot;
G_DEFINE_AUTOPTR_CLEANUP_FUNC(snapshot, snapshot_unref)

/* ---- restore.c ---- */
/* Instant restore: srv.image is the output, filled from a backup point
 * while it is served (see the top of restore.c). */
#define RESTORE_RELEASE_MAX 4
struct restore_config {
  const char *source;            /* --restore-from: the backup point's image */
  const char *source_format;     /* --restore-from-format, or NULL: detect */
  const char *state;             /* --restore-state: the progress file */
  uint64_t rate;                 /* --restore-rate, bytes/s, 0: unlimited */
  int release_fd[RESTORE_RELEASE_MAX];  /* --restore-release-fd, each given */
  unsigned n_release_fd;
  int sync_interval;             /* --restore-sync-interval, seconds */
};
/* After the output is open: load the state file (it must be the output's)
 * and open the source unless the restore is complete already. */
bool restore_open(const struct restore_config *cfg, GError **error);
/* After the workers run: start the copier and the syncer. */
bool restore_start(GError **error);
/* After the workers stopped: stop copying, record the progress (output
 * flushed first), close everything.  Safe after a failed restore_open. */
bool restore_stop(GError **error);
/* Is a restore going on (not complete)?  Lock-free; when false, nothing
 * below needs calling. */
bool restore_active(void);
/* Did a read of the source find it damaged (-EBADMSG)?  The restore then
 * stopped the daemon (SIGTERM to itself), which exits with status
 * RESTORE_EXIT_DAMAGED, cbt's "damage found".  Stays true after
 * restore_stop. */
#define RESTORE_EXIT_DAMAGED 4
bool restore_damaged(void);
/* Read [offset, offset+len) of the disk into @buf: copied granules from
 * the output, the rest from the backup; @done(@arg, 0 or -errno) runs on
 * @ex's thread, never inside this call. */
void restore_read(struct exec *ex, uint64_t offset, uint32_t len, void *buf,
                  void (*done)(void *arg, int res), void *arg);
/* Before a guest change of [offset, offset+len) is submitted: false to go
 * on now; true if granules must be copied first, then @cont(@arg, 0 or
 * -EIO) runs on @ex, and must call this again (it may have more to copy). */
bool restore_before_write(struct exec *ex, uint64_t offset, uint64_t len,
                          void (*cont)(void *arg, int res), void *arg);
/* base:allocation during a restore; as meta_extents. */
int restore_block_status(uint64_t offset, uint32_t len, struct cbt_extent *ext,
                         size_t max);
/* Are the copied bits of [offset, offset+len) in the state file already? */
bool restore_is_durable(uint64_t offset, uint64_t len);
/* Make every copied bit durable (output flushed first); then @done(@arg,
 * 0 or -errno) runs on @ex.  For FLUSH and FUA, before the reply. */
void restore_flush(struct exec *ex, void (*done)(void *arg, int res), void *arg);

struct restore_status {
  char source[4096], state[4096];
  uint64_t size, restored_bytes, durable_bytes;
  uint32_t granularity;
  bool complete, source_open;
  const char *copier;            /* starting, copying, done, failed, stopped */
  char failed[512];
  uint64_t rate, guest_copy_bytes, copier_bytes, source_read_bytes;
};
/* False if the daemon runs without --restore-from. */
bool restore_get_status(struct restore_status *st);

#endif
