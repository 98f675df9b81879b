/* Fault injection for tests (built with meson -Dfault_injection=true;
 * hooks in cbt/fault-inject.h).  Two tools, each driven by environment
 * variables read once, at the first hook call.
 *
 * 1. Failing I/O: CBT_FI_FAIL="RULE[,RULE...]", RULE being
 *
 *        TARGET:OP:NTH[+COUNT]:RESULT
 *
 *    TARGET  image     the disk image: every read/write/fsync sqe of the raw
 *                      and qcow2 backends, and the qcow2 metadata thread's
 *                      synchronous I/O on the file (memory: disks have none)
 *            bitmap    the daemon's bitmap file, tagged by tracking.c once
 *                      it is open and marked in use (start-up I/O does not
 *                      count)
 *            scratch   the point-in-time view's scratch file (snapshot.c)
 *            repo      a backup file cbt backup writes (qcow2-writer.c; its
 *                      tag survives the rename, so the checksum pass reads
 *                      are repo reads too)
 *            manifest  the manifest's temp file and the directory fsync
 *                      that makes its rename durable (cbt/repo/repo.c)
 *    OP      read | write (write, write-zeroes, punch, fallocate) | sync
 *            (fsync, fdatasync)
 *    NTH     which operation: 1 is the first OP on TARGET in this process.
 *            One operation is one sqe: a request split into several
 *            transfers counts once per transfer, and the resubmission of
 *            the rest of a short transfer, or after EAGAIN, counts again.
 *    COUNT   how many operations from NTH on fail (default 1); * for all.
 *    RESULT  EIO, ENOSPC, EDQUOT, EFBIG, EROFS, ENOMEM, EAGAIN or EINTR:
 *            the operation is not performed and completes with that
 *            error; or "short": a read or write transfers the first half
 *            of its bytes and completes with that count, as a real short
 *            transfer does (the caller must do the rest).
 *
 *    E.g. CBT_FI_FAIL="image:write:2:EIO,scratch:write:1+*:ENOSPC".  Each
 *    injected fault prints one line on stderr ("cbt fault injection:
 *    image write 2: EIO"), so a test can tell that its fault happened.
 *    CBT_FI_TRACE=1 also prints every operation counted, with its number.
 *    A malformed CBT_FI_FAIL aborts the process at the first hook.
 *
 *    How: an asynchronous operation is decided when its sqe is prepared
 *    (cbt_fi_sqe): a failure turns the sqe into a NOP whose user_data is
 *    a wrapper op, so the ring's owner completes the real op with the
 *    injected error through its normal done() path; "short" halves
 *    sqe->len.  A synchronous operation (uring-io.c) is decided before it
 *    is submitted (cbt_fi_io) on a file found in the tag table (device and
 *    inode, so a renamed file keeps its tag; a new file that reuses a
 *    freed inode number inherits the tag, harmless for tests).  Counters
 *    are atomic and rules never change after parsing, so hooks run on any
 *    thread; the tag table has its own lock.
 *
 * 2. Power cut of one file: CBT_FI_POWERCUT_FILE / CBT_FI_POWERCUT_AT.
 *    A process killed with SIGKILL keeps the page cache, so a missing
 *    fdatasync never shows in a kill -9 test.  Here every write to the
 *    file named by CBT_FI_POWERCUT_FILE first saves the bytes it
 *    overwrites; a completed fdatasync (or fsync) of the file forgets
 *    them, since what it covered is durable.  When the write numbered
 *    CBT_FI_POWERCUT_AT (1 = the first write to the file) is about to
 *    happen, the "power fails": every write since the last completed
 *    fdatasync is undone, newest first, and the process kills itself with
 *    SIGKILL.  That is the worst a power cut may leave of the file -- no
 *    write that was not followed by a completed fdatasync reached the
 *    disk -- while all other files keep what the process wrote (the most a
 *    power cut can leave of data whose bits were lost).  A line on stderr
 *    says where the cut happened.  Writes to the target file are
 *    serialised here (a mutex held from cbt_fi_write_begin to
 *    cbt_fi_write_end) so a cut never races a write.
 *
 * 3. A stalled bitmap marker: CBT_FI_MARK_STALL (section 3 below).
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>
#include <liburing.h>

#include "cbt/fault-inject.h"
#include "cbt/image.h"
#include "cbt/util.h"

/* ---- 1. failing I/O ---- */

#define N_TARGETS (CBT_FI_MANIFEST + 1)
#define N_OPS     (CBT_FI_SYNC + 1)

static const char *const target_names[N_TARGETS] = {
  "image", "bitmap", "scratch", "repo", "manifest",
};
static const char *const op_names[N_OPS] = { "read", "write", "sync" };

static const struct {
  const char *name;
  int err;
} results[] = {
  { "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EDQUOT", EDQUOT }, { "EFBIG", EFBIG },
  { "EROFS", EROFS }, { "ENOMEM", ENOMEM }, { "EAGAIN", EAGAIN }, { "EINTR", EINTR },
  { "short", 0 },
};

struct rule {
  enum cbt_fi_target target;
  enum cbt_fi_op op;
  uint64_t first, last;           /* operation numbers, inclusive */
  int err;                        /* positive errno, 0: short */
  const char *result;             /* its name */
};

struct tag {
  dev_t dev;
  ino_t ino;
  enum cbt_fi_target target;
};

static GOnce fail_once = G_ONCE_INIT;
static struct rule *rules;
static size_t n_rules;
static bool trace;
static bool fail_enabled;         /* any rule, or tracing */
static _Atomic uint64_t counts[N_TARGETS][N_OPS];

static GMutex tag_lock;
static GArray *tags;              /* struct tag */

static void G_GNUC_NORETURN
bad_spec(const char *spec, const char *rule, const char *why)
{
  fprintf(stderr, "cbt fault injection: CBT_FI_FAIL=\"%s\": rule \"%s\": %s\n",
          spec, rule, why);
  fflush(stderr);
  abort();
}

static int
name_index(const char *const *names, size_t n, const char *s)
{
  for (size_t i = 0; i < n; i++)
    if (strcmp(names[i], s) == 0)
      return (int)i;
  return -1;
}

static void
parse_rule(const char *spec, const char *text, struct rule *r)
{
  g_auto(GStrv) f = g_strsplit(text, ":", -1);
  const char *count;
  char *end;
  int t, o;
  size_t i;

  if (g_strv_length(f) != 4)
    bad_spec(spec, text, "expected TARGET:OP:NTH[+COUNT]:RESULT");
  t = name_index(target_names, N_TARGETS, f[0]);
  if (t < 0)
    bad_spec(spec, text, "TARGET is one of image, bitmap, scratch, repo, manifest");
  o = name_index(op_names, N_OPS, f[1]);
  if (o < 0)
    bad_spec(spec, text, "OP is one of read, write, sync");
  r->target = (enum cbt_fi_target)t;
  r->op = (enum cbt_fi_op)o;

  errno = 0;
  r->first = g_ascii_strtoull(f[2], &end, 10);
  if (errno || end == f[2] || r->first == 0 || (*end && *end != '+'))
    bad_spec(spec, text, "NTH is a number from 1");
  count = *end == '+' ? end + 1 : NULL;
  if (!count) {
    r->last = r->first;
  } else if (strcmp(count, "*") == 0) {
    r->last = UINT64_MAX;
  } else {
    uint64_t c = g_ascii_strtoull(count, &end, 10);

    if (end == count || *end || c == 0 || c > UINT64_MAX - r->first)
      bad_spec(spec, text, "COUNT is a number from 1, or *");
    r->last = r->first + c - 1;
  }

  for (i = 0; i < G_N_ELEMENTS(results); i++)
    if (strcmp(results[i].name, f[3]) == 0)
      break;
  if (i == G_N_ELEMENTS(results))
    bad_spec(spec, text, "RESULT is EIO, ENOSPC, EDQUOT, EFBIG, EROFS, ENOMEM, "
             "EAGAIN, EINTR or short");
  r->err = results[i].err;
  r->result = results[i].name;
  if (r->err == 0 && r->op == CBT_FI_SYNC)
    bad_spec(spec, text, "a sync transfers nothing: it cannot be short");
}

static gpointer
fail_init(gpointer unused)
{
  const char *spec = getenv("CBT_FI_FAIL");
  const char *tr = getenv("CBT_FI_TRACE");

  (void)unused;
  trace = tr && *tr && strcmp(tr, "0") != 0;
  if (spec && *spec) {
    g_auto(GStrv) parts = g_strsplit(spec, ",", -1);

    n_rules = g_strv_length(parts);
    rules = g_new0(struct rule, n_rules);
    for (size_t i = 0; i < n_rules; i++)
      parse_rule(spec, parts[i], &rules[i]);
  }
  tags = g_array_new(FALSE, FALSE, sizeof(struct tag));
  fail_enabled = n_rules > 0 || trace;
  return NULL;
}

static bool
fail_on(void)
{
  g_once(&fail_once, fail_init, NULL);
  return fail_enabled;
}

/* Count one @op on @target and apply the first rule that covers it:
 * returns the injected -errno, or 0 (with *@len halved for "short"; @len
 * NULL or *@len < 2: a short rule does nothing).  @offset is for the
 * trace only. */
static int
decide(enum cbt_fi_target t, enum cbt_fi_op op, uint64_t offset, uint64_t *len)
{
  uint64_t n = atomic_fetch_add(&counts[t][op], 1) + 1;

  if (trace && len)
    fprintf(stderr, "cbt fault injection: trace: %s %s %" PRIu64 " (%" PRIu64
            " bytes at %" PRIu64 ")\n", target_names[t], op_names[op], n, *len, offset);
  else if (trace)
    fprintf(stderr, "cbt fault injection: trace: %s %s %" PRIu64 "\n",
            target_names[t], op_names[op], n);
  for (size_t i = 0; i < n_rules; i++) {
    const struct rule *r = &rules[i];

    if (r->target != t || r->op != op || n < r->first || n > r->last)
      continue;
    if (r->err) {
      fprintf(stderr, "cbt fault injection: %s %s %" PRIu64 ": %s\n",
              target_names[t], op_names[op], n, r->result);
      return -r->err;
    }
    if (len && *len >= 2) {
      fprintf(stderr, "cbt fault injection: %s %s %" PRIu64 ": short, %" PRIu64
              " of %" PRIu64 " bytes\n", target_names[t], op_names[op], n,
              *len / 2, *len);
      *len /= 2;
    }
    return 0;
  }
  return 0;
}

/* An injected failure of an asynchronous op: the NOP that replaced its
 * sqe completes here and hands the error on. */
struct injected {
  struct cbt_aio_op op;
  struct cbt_aio_op *orig;
  int res;
};

static void
injected_done(struct cbt_aio_op *op, int res)
{
  struct injected *in = cbt_container_of(op, struct injected, op);
  struct cbt_aio_op *orig = in->orig;
  int r = in->res;

  (void)res;
  g_free(in);
  orig->done(orig, r);
}

void
cbt_fi_sqe(enum cbt_fi_target target, struct io_uring_sqe *sqe)
{
  struct cbt_aio_op *orig = (struct cbt_aio_op *)(uintptr_t)sqe->user_data;
  enum cbt_fi_op op;
  bool transfer;
  uint64_t len;
  int r;

  if (!fail_on() || !orig)
    return;
  switch (sqe->opcode) {
  case IORING_OP_READ:
  case IORING_OP_READV:
  case IORING_OP_READ_FIXED:
    op = CBT_FI_READ;
    break;
  case IORING_OP_WRITE:
  case IORING_OP_WRITEV:
  case IORING_OP_WRITE_FIXED:
  case IORING_OP_FALLOCATE:
    op = CBT_FI_WRITE;
    break;
  case IORING_OP_FSYNC:
    op = CBT_FI_SYNC;
    break;
  default:
    return;                       /* advice, cancels, sockets: not I/O */
  }
  /* sqe->len is a byte count only for plain reads and writes. */
  transfer = sqe->opcode == IORING_OP_READ || sqe->opcode == IORING_OP_WRITE;
  len = transfer ? sqe->len : 0;
  r = decide(target, op, sqe->off, transfer ? &len : NULL);
  if (r < 0) {
    struct injected *in = g_new(struct injected, 1);

    in->op.done = injected_done;
    in->orig = orig;
    in->res = r;
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data(sqe, &in->op);
  } else if (transfer) {
    sqe->len = (uint32_t)len;
  }
}

/* Under tag_lock: the index of the tag of @st's file, or -1. */
static int
tag_find(const struct stat *st)
{
  for (guint i = 0; i < tags->len; i++) {
    const struct tag *t = &g_array_index(tags, struct tag, i);

    if (t->dev == st->st_dev && t->ino == st->st_ino)
      return (int)i;
  }
  return -1;
}

static void
tag_stat(const struct stat *st, enum cbt_fi_target target)
{
  struct tag t = { .dev = st->st_dev, .ino = st->st_ino, .target = target };
  int i;

  g_mutex_lock(&tag_lock);
  i = tag_find(st);
  if (i >= 0)
    g_array_index(tags, struct tag, i).target = target;
  else
    g_array_append_val(tags, t);
  g_mutex_unlock(&tag_lock);
}

void
cbt_fi_tag_fd(int fd, enum cbt_fi_target target)
{
  struct stat st;

  if (fail_on() && fstat(fd, &st) == 0)
    tag_stat(&st, target);
}

void
cbt_fi_tag_path(const char *path, enum cbt_fi_target target)
{
  struct stat st;

  if (fail_on() && stat(path, &st) == 0)
    tag_stat(&st, target);
}

void
cbt_fi_untag_fd(int fd)
{
  struct stat st;
  int i;

  if (!fail_on() || fstat(fd, &st) < 0)
    return;
  g_mutex_lock(&tag_lock);
  i = tag_find(&st);
  if (i >= 0)
    g_array_remove_index_fast(tags, (guint)i);
  g_mutex_unlock(&tag_lock);
}

int
cbt_fi_io(int fd, enum cbt_fi_op op, uint64_t offset, size_t *len)
{
  struct stat st;
  enum cbt_fi_target target;
  uint64_t l = len ? *len : 0;
  int i, r;

  if (!fail_on() || fstat(fd, &st) < 0)
    return 0;
  g_mutex_lock(&tag_lock);
  i = tag_find(&st);
  if (i >= 0)
    target = g_array_index(tags, struct tag, i).target;
  g_mutex_unlock(&tag_lock);
  if (i < 0)
    return 0;
  r = decide(target, op, offset, len ? &l : NULL);
  if (len)
    *len = (size_t)l;
  return r;
}

/* ---- 2. power cut ---- */

struct undo {
  uint64_t offset;
  size_t len;
  uint8_t *old;
};

static GMutex lock;
static bool inited, enabled;
static dev_t target_dev;
static ino_t target_ino;
static uint64_t cut_at, writes;
static GArray *journal;             /* struct undo, oldest first */

static void
init(void)
{
  const char *path = getenv("CBT_FI_POWERCUT_FILE");
  const char *at = getenv("CBT_FI_POWERCUT_AT");
  struct stat st;

  inited = true;
  if (!path || !at || stat(path, &st) < 0)
    return;
  target_dev = st.st_dev;
  target_ino = st.st_ino;
  cut_at = g_ascii_strtoull(at, NULL, 10);
  enabled = cut_at > 0;
  journal = g_array_new(FALSE, FALSE, sizeof(struct undo));
}

/* Is @fd the target file?  Under lock. */
static bool
is_target(int fd)
{
  struct stat st;

  if (!inited)
    init();
  return enabled && fstat(fd, &st) == 0 && st.st_dev == target_dev &&
         st.st_ino == target_ino;
}

static void
forget(void)
{
  for (guint i = 0; i < journal->len; i++)
    g_free(g_array_index(journal, struct undo, i).old);
  g_array_set_size(journal, 0);
}

static void
power_cut(int fd)
{
  guint n = journal->len;

  for (guint i = n; i-- > 0;) {
    struct undo *u = &g_array_index(journal, struct undo, i);
    if (pwrite(fd, u->old, u->len, (off_t)u->offset) != (ssize_t)u->len)
      fprintf(stderr, "cbt fault injection: undoing a write failed: %s\n",
              g_strerror(errno));
  }
  fprintf(stderr, "cbt fault injection: power cut before write %" G_GUINT64_FORMAT
          " of the bitmap file; %u unsynced writes undone\n", writes, n);
  fflush(stderr);
  kill(getpid(), SIGKILL);
  _exit(137);
}

bool
cbt_fi_write_begin(int fd, uint64_t offset, size_t len)
{
  struct undo u;
  ssize_t r;

  g_mutex_lock(&lock);
  if (!is_target(fd)) {
    g_mutex_unlock(&lock);
    return false;
  }
  if (++writes == cut_at)
    power_cut(fd);
  u.offset = offset;
  u.len = len;
  u.old = g_malloc0(len);            /* past the end of the file: zeros */
  r = pread(fd, u.old, len, (off_t)offset);
  (void)r;
  g_array_append_val(journal, u);
  return true;                       /* unlocked in cbt_fi_write_end */
}

void
cbt_fi_write_end(void)
{
  g_mutex_unlock(&lock);
}

void
cbt_fi_synced(int fd, int r)
{
  g_mutex_lock(&lock);
  if (r == 0 && is_target(fd))
    forget();
  g_mutex_unlock(&lock);
}

/* ---- 3. a stalled bitmap marker ----
 *
 * CBT_FI_MARK_STALL="OFFSET:MS": the first cbt_bitmap_set_range (or
 * set_all) in this process that changes the bit of the granule holding
 * image byte OFFSET sleeps MS milliseconds after its words changed and
 * before it marks their page for write-out, once.  It prints "cbt fault
 * injection: bitmap mark of OFFSET stalled" on stderr when the stall
 * begins.  This is the window in which another thread finds the bit
 * already set while its page is not yet marked (the crash-safe commit
 * must not depend on this marker). */

static GOnce stall_once = G_ONCE_INIT;
static uint64_t stall_offset, stall_ms;
static atomic_bool stall_armed;

static void G_GNUC_NORETURN
bad_stall(const char *spec)
{
  fprintf(stderr, "cbt fault injection: CBT_FI_MARK_STALL=\"%s\": expected OFFSET:MS\n",
          spec);
  fflush(stderr);
  abort();
}

static gpointer
stall_init(gpointer unused)
{
  const char *spec = getenv("CBT_FI_MARK_STALL");
  char *end = NULL;

  (void)unused;
  if (!spec)
    return NULL;
  stall_offset = g_ascii_strtoull(spec, &end, 0);
  if (!end || *end != ':')
    bad_stall(spec);
  stall_ms = g_ascii_strtoull(end + 1, &end, 10);
  if (*end)
    bad_stall(spec);
  atomic_store(&stall_armed, true);
  return NULL;
}

void
cbt_fi_mark_stall(uint64_t start, uint64_t end)
{
  bool armed = true;

  g_once(&stall_once, stall_init, NULL);
  if (!atomic_load(&stall_armed) || stall_offset < start || stall_offset >= end)
    return;
  if (!atomic_compare_exchange_strong(&stall_armed, &armed, false))
    return;
  fprintf(stderr, "cbt fault injection: bitmap mark of %" PRIu64 " stalled for %"
          PRIu64 " ms\n", stall_offset, stall_ms);
  fflush(stderr);
  g_usleep((gulong)(stall_ms * 1000));
}
