/* Test helper for tests/test-qcow2-writer-interop.sh: applies a described
 * workload both to a new qcow2 file (through lib/qcow2/qcow2-writer.c) and to a
 * raw reference file, so qemu-img can compare the two.
 *
 *   qcow2-writer-tool [-c CLUSTER] [-b BACKING -F FORMAT] [-j THREADS]
 *                     OUT.qcow2 REF.raw SIZE OP...
 *
 * REF.raw is opened (created if missing) without truncation and sized to
 * SIZE, so an incremental's reference starts as a copy of its backing
 * file's reference; "-" means no reference (for sizes a test file system
 * cannot hold).  The data of "w:OFF:LEN:SEED" depends only on LEN and SEED,
 * so a small reference written at offset 0 checks a piece of a big image.  Numbers take K/M/G/T suffixes (powers of 1024).
 * OP is one of
 *   w:OFF:LEN:SEED   write pseudo-random data (some clusters all zero)
 *   0:OFF:LEN        write a buffer of zeros
 *   z:OFF:LEN        cbt_qcow2_writer_zero
 *   r:SEED:COUNT     COUNT random w/0/z operations of 1..8 clusters
 *   p:SEED:COUNT     COUNT random one-cluster operations spread over
 *                    THREADS threads, each owning every THREADS-th cluster
 * On success prints "data=N zero=N" (cbt_qcow2_writer_*_bytes).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <glib.h>

#include "cbt/qcow2-writer.h"

struct ctx {
  cbt_qcow2_writer *w;
  int ref;
  uint64_t size;
  uint64_t cs;
};

static void G_GNUC_PRINTF(1, 2) G_GNUC_NORETURN
die(const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  fputs("qcow2-writer-tool: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static uint64_t
parse_num(const char *s)
{
  char *end = NULL;
  uint64_t v;

  errno = 0;
  v = g_ascii_strtoull(s, &end, 0);
  if (errno || end == s)
    die("bad number \"%s\"", s);
  if (*end && strchr("KMGT", *end)) {
    v <<= 10 * (1 + (strchr("KMGT", *end) - "KMGT"));
    end++;
  }
  if (*end)
    die("bad number \"%s\"", s);
  return v;
}

/* xorshift64*: reproducible data and workloads from a seed. */
static uint64_t
rnd(uint64_t *s)
{
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C(2685821657736338717);
}

static void
fill(uint8_t *buf, uint64_t len, uint64_t cs, uint64_t seed)
{
  uint64_t s = seed * 2 + 1;

  for (uint64_t i = 0; i < len; i += 8) {
    uint64_t v = rnd(&s);
    memcpy(buf + i, &v, MIN(8, len - i));
  }
  /* Every fourth cluster all zero, to exercise zero detection. */
  for (uint64_t c = 0; c * cs < len; c++)
    if (rnd(&s) % 4 == 0)
      memset(buf + c * cs, 0, MIN(cs, len - c * cs));
}

static void
ref_write(struct ctx *c, const void *buf, uint64_t off, uint64_t len)
{
  if (c->ref >= 0 && pwrite(c->ref, buf, len, (off_t)off) != (ssize_t)len)
    die("reference write: %s", g_strerror(errno));
}

static void
do_op(struct ctx *c, char kind, uint64_t off, uint64_t len, uint64_t seed)
{
  g_autofree uint8_t *buf = g_malloc0(MAX(len, 1));
  int r;

  if (kind == 'w')
    fill(buf, len, c->cs, seed);
  if (kind == 'z')
    r = cbt_qcow2_writer_zero(c->w, off, len);
  else
    r = cbt_qcow2_writer_write(c->w, off, buf, len);
  if (r < 0)
    die("%c %" PRIu64 "+%" PRIu64 ": %s", kind, off, len, g_strerror(-r));
  ref_write(c, buf, off, len);
}

/* A random range of 1..@max_clusters clusters, clamped to the size. */
static void
rnd_range(struct ctx *c, uint64_t *s, uint64_t max_clusters, uint64_t *off,
          uint64_t *len)
{
  uint64_t nclusters = (c->size + c->cs - 1) / c->cs;
  uint64_t ci = rnd(s) % nclusters;
  uint64_t want = (1 + rnd(s) % max_clusters) * c->cs;   /* MIN evaluates twice */

  *off = ci * c->cs;
  *len = MIN(want, c->size - *off);
}

static char
rnd_kind(uint64_t *s)
{
  static const char kinds[] = "wwwww0zz";

  return kinds[rnd(s) % (sizeof kinds - 1)];
}

struct pjob {
  struct ctx *c;
  uint64_t seed, count;
  unsigned t, nthreads;
};

static void *
pworker(void *opaque)
{
  struct pjob *j = opaque;
  uint64_t s = j->seed * 7919 + j->t + 1;
  uint64_t nclusters = (j->c->size + j->c->cs - 1) / j->c->cs;

  for (uint64_t i = 0; i < j->count; i++) {
    uint64_t ci = rnd(&s) % nclusters;

    ci -= ci % j->nthreads;
    ci += j->t;
    if (ci >= nclusters)
      continue;
    do_op(j->c, rnd_kind(&s), ci * j->c->cs,
          MIN(j->c->cs, j->c->size - ci * j->c->cs), rnd(&s));
  }
  return NULL;
}

static void
run_op(struct ctx *c, const char *spec, unsigned nthreads)
{
  g_auto(GStrv) f = g_strsplit(spec, ":", -1);
  guint n = g_strv_length(f);

  if (n < 3 || strlen(f[0]) != 1)
    die("bad operation \"%s\"", spec);
  switch (f[0][0]) {
  case 'w':
    if (n != 4)
      die("bad operation \"%s\"", spec);
    do_op(c, 'w', parse_num(f[1]), parse_num(f[2]), parse_num(f[3]));
    break;
  case '0':
  case 'z':
    if (n != 3)
      die("bad operation \"%s\"", spec);
    do_op(c, f[0][0], parse_num(f[1]), parse_num(f[2]), 0);
    break;
  case 'r': {
    uint64_t s = parse_num(f[1]) * 31 + 17, count = parse_num(f[2]);

    for (uint64_t i = 0; i < count; i++) {
      uint64_t off, len;

      rnd_range(c, &s, 8, &off, &len);
      do_op(c, rnd_kind(&s), off, len, rnd(&s));
    }
    break;
  }
  case 'p': {
    g_autofree pthread_t *tids = g_new0(pthread_t, nthreads);
    g_autofree struct pjob *jobs = g_new0(struct pjob, nthreads);

    for (unsigned t = 0; t < nthreads; t++) {
      jobs[t] = (struct pjob){ c, parse_num(f[1]), parse_num(f[2]) / nthreads,
                               t, nthreads };
      if (pthread_create(&tids[t], NULL, pworker, &jobs[t]) != 0)
        die("pthread_create failed");
    }
    for (unsigned t = 0; t < nthreads; t++)
      pthread_join(tids[t], NULL);
    break;
  }
  default:
    die("bad operation \"%s\"", spec);
  }
}

int
main(int argc, char **argv)
{
  struct cbt_qcow2_writer_opts o = { 0 };
  g_autoptr(cbt_qcow2_writer) w = NULL;
  g_autofree char *why = NULL;
  struct ctx c = { 0 };
  unsigned nthreads = 4;
  int opt, r;

  while ((opt = getopt(argc, argv, "c:b:F:j:")) != -1) {
    switch (opt) {
    case 'c': o.cluster_size = (uint32_t)parse_num(optarg); break;
    case 'b': o.backing_file = optarg; break;
    case 'F': o.backing_format = optarg; break;
    case 'j': nthreads = (unsigned)parse_num(optarg); break;
    default: die("usage: see the comment at the top of qcow2-writer-tool.c");
    }
  }
  if (argc - optind < 3 || nthreads == 0)
    die("usage: see the comment at the top of qcow2-writer-tool.c");
  o.size = parse_num(argv[optind + 2]);

  r = cbt_qcow2_writer_create(argv[optind], &o, &w, &why);
  if (r < 0)
    die("%s: %s", argv[optind], why);
  c.w = w;
  c.size = o.size;
  c.cs = cbt_qcow2_writer_cluster_size(w);
  c.ref = -1;
  if (strcmp(argv[optind + 1], "-") != 0) {
    c.ref = open(argv[optind + 1], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (c.ref < 0 || ftruncate(c.ref, (off_t)o.size) < 0)
      die("%s: %s", argv[optind + 1], g_strerror(errno));
  }

  for (int i = optind + 3; i < argc; i++)
    run_op(&c, argv[i], nthreads);

  r = cbt_qcow2_writer_finish(w, &why);
  if (r < 0)
    die("%s: finish: %s", argv[optind], why);
  printf("data=%" PRIu64 " zero=%" PRIu64 "\n", cbt_qcow2_writer_data_bytes(w),
         cbt_qcow2_writer_zero_bytes(w));
  if (c.ref >= 0 && close(c.ref) < 0)
    die("%s: %s", argv[optind + 1], g_strerror(errno));
  return 0;
}
