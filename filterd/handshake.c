/* Fixed newstyle negotiation, one thread per new connection.
 *
 * Negotiation is short, rare and strictly sequential, so it is written as
 * plain blocking code in its own thread with a deadline for the whole
 * negotiation (--handshake-timeout, default 10 s) instead of a state machine on the
 * workers' rings.  At most MAX_HANDSHAKES run at once; more are refused,
 * so a flood of idle connections cannot exhaust threads.  When negotiation
 * reaches transmission (EXPORT_NAME or GO) the socket and what was
 * negotiated go to a worker.
 *
 * Every length from the client is checked before use and options are read
 * into a buffer capped at CBT_NBD_MAX_OPTION_LEN; longer options are
 * skipped (NBD_REP_ERR_TOO_BIG) without allocating, up to 16 MiB, beyond
 * which the client is dropped.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "cbt/util.h"
#include "internal.h"

#define MAX_HANDSHAKES   64
#define MAX_OPTIONS      4096         /* options in one negotiation */
#define MAX_SKIP_LEN     (16u * 1024 * 1024)

struct hs {
  int fd;
  bool no_zeroes;
  gint64 deadline;                   /* the whole negotiation's end */
  struct conn_params p;
};

static struct client_threads negotiations = {
  .what = "connections negotiating",
  .max = MAX_HANDSHAKES,
};


/* --handshake-timeout bounds the whole negotiation, not each receive: a
 * client trickling one byte at a time gets no more time than a silent
 * one.  Before each receive or send the socket's timeouts are set to what
 * is left; false when nothing is. */
static bool
arm_deadline(struct hs *h)
{
  gint64 left = h->deadline - g_get_monotonic_time();
  struct timeval tv;

  if (left <= 0)
    return false;
  tv.tv_sec = left / G_USEC_PER_SEC;
  tv.tv_usec = left % G_USEC_PER_SEC;
  return setsockopt(h->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0 &&
         setsockopt(h->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0;
}

static bool
read_full(struct hs *h, void *buf, size_t len)
{
  size_t done = 0;

  while (done < len) {
    ssize_t r;

    if (!arm_deadline(h)) {
      log_error("%s: negotiation timed out", h->p.peer);
      return false;
    }
    r = recv(h->fd, (char *)buf + done, len - done, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      if (r == 0)
        debug("%s: client closed the connection during negotiation", h->p.peer);
      else if (errno == EAGAIN || errno == EWOULDBLOCK)
        log_error("%s: negotiation timed out", h->p.peer);
      else
        debug("%s: negotiation: %s", h->p.peer, g_strerror(errno));
      return false;
    }
    done += (size_t)r;
  }
  return true;
}

static bool
write_full(struct hs *h, const void *buf, size_t len)
{
  size_t done = 0;

  while (done < len) {
    ssize_t r;

    if (!arm_deadline(h)) {
      log_error("%s: negotiation timed out", h->p.peer);
      return false;
    }
    r = send(h->fd, (const char *)buf + done, len - done, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      debug("%s: negotiation: %s", h->p.peer, g_strerror(errno));
      return false;
    }
    done += (size_t)r;
  }
  return true;
}

static bool
skip(struct hs *h, size_t len)
{
  char junk[4096];

  while (len > 0) {
    size_t n = len < sizeof junk ? len : sizeof junk;
    if (!read_full(h, junk, n))
      return false;
    len -= n;
  }
  return true;
}

static bool
reply(struct hs *h, uint32_t option, uint32_t type, const void *data,
      uint32_t len)
{
  uint8_t hdr[NBD_OPT_REPLY_HEADER_SIZE];

  cbt_nbd_opt_reply_encode(hdr, option, type, len);
  return write_full(h, hdr, sizeof hdr) && (len == 0 || write_full(h, data, len));
}

/* An error reply with a human-readable message, as the spec allows. */
static bool
reply_err(struct hs *h, uint32_t option, uint32_t type, const char *fmt, ...)
  G_GNUC_PRINTF(4, 5);

static bool
reply_err(struct hs *h, uint32_t option, uint32_t type, const char *fmt, ...)
{
  g_autofree char *msg = NULL;
  va_list ap;

  va_start(ap, fmt);
  msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  debug("%s: option %" PRIu32 ": %s", h->p.peer, option, msg);
  return reply(h, option, type, msg, (uint32_t)strlen(msg));
}

uint16_t
export_flags(bool structured, bool view)
{
  uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE |
               NBD_FLAG_CAN_MULTI_CONN;

  if (structured)
    f |= NBD_FLAG_SEND_DF;
  if (view)
    /* Reads, and TRIM to release what a backup has stored; WRITE gets
     * EPERM.  Not flagged read-only, which would forbid the TRIM. */
    f |= NBD_FLAG_SEND_TRIM;
  else if (srv.read_only)
    f |= NBD_FLAG_READ_ONLY;
  else
    f |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
         NBD_FLAG_SEND_FAST_ZERO;
  return f;
}

static bool
name_matches(const uint8_t *name, uint32_t len)
{
  return strlen(srv.export_name) == len && memcmp(name, srv.export_name, len) == 0;
}

/* NAME@checkpoint: the point-in-time view of a checkpoint in progress. */
static bool
snapshot_name_matches(const uint8_t *name, uint32_t len)
{
  size_t n = strlen(srv.export_name), k = strlen(SNAPSHOT_SUFFIX);

  return len == n + k && memcmp(name, srv.export_name, n) == 0 &&
         memcmp(name + n, SNAPSHOT_SUFFIX, k) == 0;
}

/* Which export @name is: 0 the main one, 1 the view (a reference to it
 * is put in *snap), -1 none (the reason in *why). */
static int
find_export(const uint8_t *name, uint32_t len, struct snapshot **snap,
            const char **why)
{
  *snap = NULL;
  if (name_matches(name, len))
    return 0;
  if (snapshot_name_matches(name, len)) {
    *snap = snapshot_get();
    if (*snap)
      return 1;
    *why = "no checkpoint with a point-in-time view is in progress";
    return -1;
  }
  *why = "no such export";
  return -1;
}

static bool
send_info(struct hs *h, uint32_t option, uint16_t type, bool snap)
{
  uint8_t buf[2 + CBT_NBD_MAX_NAME_LEN + sizeof SNAPSHOT_SUFFIX];
  size_t len = 2;

  cbt_put_be16(buf, type);
  switch (type) {
  case NBD_INFO_EXPORT:
    cbt_put_be64(buf + 2, srv.image->size);
    cbt_put_be16(buf + 10, export_flags(h->p.structured, snap));
    len = 12;
    break;
  case NBD_INFO_NAME:
    len += strlen(srv.export_name);
    memcpy(buf + 2, srv.export_name, len - 2);
    if (snap) {
      memcpy(buf + len, SNAPSHOT_SUFFIX, strlen(SNAPSHOT_SUFFIX));
      len += strlen(SNAPSHOT_SUFFIX);
    }
    break;
  case NBD_INFO_DESCRIPTION:
    if (!srv.description)
      return true;
    len += MIN(strlen(srv.description), CBT_NBD_MAX_NAME_LEN);
    memcpy(buf + 2, srv.description, len - 2);
    break;
  case NBD_INFO_BLOCK_SIZE:
    cbt_put_be32(buf + 2, CBT_NBD_MIN_BLOCK);
    cbt_put_be32(buf + 6, CBT_NBD_PREF_BLOCK);
    cbt_put_be32(buf + 10, CBT_NBD_MAX_BLOCK);
    len = 14;
    break;
  default:
    return true;                     /* unknown requests are ignored */
  }
  return reply(h, option, NBD_REP_INFO, buf, (uint32_t)len);
}

/* NBD_OPT_INFO / NBD_OPT_GO.  Returns false if the connection broke;
 * *go is set when transmission starts. */
static bool
opt_info(struct hs *h, uint32_t option, const uint8_t *d, uint32_t len, bool *go)
{
  g_autoptr(snapshot) snap = NULL;
  const char *why = NULL;
  uint32_t namelen;
  uint16_t nreq;
  bool sent_name = false;

  if (len < 6 || (namelen = cbt_get_be32(d)) > len - 6) {
    return reply_err(h, option, NBD_REP_ERR_INVALID, "malformed INFO/GO request");
  }
  nreq = cbt_get_be16(d + 4 + namelen);
  if ((uint64_t)4 + namelen + 2 + 2 * (uint64_t)nreq != len)
    return reply_err(h, option, NBD_REP_ERR_INVALID, "malformed INFO/GO request");
  if (find_export(d + 4, namelen, &snap, &why) < 0)
    return reply_err(h, option, NBD_REP_ERR_UNKNOWN, "export '%.*s': %s",
                     (int)namelen, (const char *)d + 4, why);

  if (!send_info(h, option, NBD_INFO_EXPORT, snap))
    return false;
  for (uint16_t i = 0; i < nreq; i++) {
    uint16_t type = cbt_get_be16(d + 6 + namelen + 2 * i);
    if (type == NBD_INFO_EXPORT || type == NBD_INFO_BLOCK_SIZE)
      continue;                      /* always sent */
    if (type == NBD_INFO_NAME) {
      if (sent_name)
        continue;
      sent_name = true;
    }
    if (!send_info(h, option, type, snap))
      return false;
  }
  if (!send_info(h, option, NBD_INFO_BLOCK_SIZE, snap) ||
      !reply(h, option, NBD_REP_ACK, NULL, 0))
    return false;
  *go = option == NBD_OPT_GO;
  if (*go) {
    snapshot_unref(h->p.snap);
    h->p.snap = g_steal_pointer(&snap);
  }
  return true;
}

static bool
send_meta(struct hs *h, uint32_t option, const struct meta_context *m)
{
  uint8_t buf[4 + sizeof m->name];
  size_t n = strlen(m->name);

  cbt_put_be32(buf, m->id);
  memcpy(buf + 4, m->name, n);
  return reply(h, option, NBD_REP_META_CONTEXT, buf, (uint32_t)(4 + n));
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
static bool
opt_meta(struct hs *h, uint32_t option, const uint8_t *d, uint32_t len)
{
  bool list = option == NBD_OPT_LIST_META_CONTEXT;
  struct meta_context avail[MAX_META_SELECTED];
  g_autoptr(snapshot) snap = NULL;
  const char *why = NULL;
  size_t n_avail, pos;
  uint32_t namelen, nq;

  if (!list && !h->p.structured)
    return reply_err(h, option, NBD_REP_ERR_INVALID,
                     "SET_META_CONTEXT needs structured replies first");
  if (len < 8 || (namelen = cbt_get_be32(d)) > len - 8)
    return reply_err(h, option, NBD_REP_ERR_INVALID, "malformed meta context request");
  nq = cbt_get_be32(d + 4 + namelen);
  pos = 8 + (size_t)namelen;
  /* Check the whole query list before acting on any of it. */
  for (uint32_t i = 0, p = (uint32_t)pos; i < nq; i++) {
    uint32_t qlen;
    if (len - p < 4 || (qlen = cbt_get_be32(d + p)) > len - p - 4 ||
        qlen > CBT_NBD_MAX_NAME_LEN)
      return reply_err(h, option, NBD_REP_ERR_INVALID, "malformed meta context query");
    p += 4 + qlen;
    if (i + 1 == nq && p != len)
      return reply_err(h, option, NBD_REP_ERR_INVALID, "trailing bytes after queries");
  }
  if (nq == 0 && pos != len)
    return reply_err(h, option, NBD_REP_ERR_INVALID, "trailing bytes after queries");
  if (find_export(d + 4, namelen, &snap, &why) < 0)
    return reply_err(h, option, NBD_REP_ERR_UNKNOWN, "export '%.*s': %s",
                     (int)namelen, (const char *)d + 4, why);

  n_avail = meta_list(avail, G_N_ELEMENTS(avail), snap != NULL);
  if (!list)
    h->p.n_meta = 0;
  if (list && nq == 0) {
    for (size_t j = 0; j < n_avail; j++)
      if (!send_meta(h, option, &avail[j]))
        return false;
  }
  for (uint32_t i = 0; i < nq; i++) {
    uint32_t qlen = cbt_get_be32(d + pos);
    g_autofree char *q = g_strndup((const char *)d + pos + 4, qlen);

    pos += 4 + qlen;
    for (size_t j = 0; j < n_avail; j++) {
      bool dup = false;
      if (!meta_query_matches(q, avail[j].name, list))
        continue;
      if (!list) {
        for (unsigned k = 0; k < h->p.n_meta; k++)
          dup |= h->p.meta_ids[k] == avail[j].id;
        if (dup || h->p.n_meta == MAX_META_SELECTED)
          continue;
        h->p.meta_ids[h->p.n_meta++] = avail[j].id;
      }
      if (!send_meta(h, option, &avail[j]))
        return false;
    }
  }
  return reply(h, option, NBD_REP_ACK, NULL, 0);
}

static bool
list_one(struct hs *h, const char *name, const char *suffix)
{
  size_t n = strlen(name), k = strlen(suffix);
  g_autofree uint8_t *buf = g_malloc(4 + n + k);

  cbt_put_be32(buf, (uint32_t)(n + k));
  memcpy(buf + 4, name, n);
  memcpy(buf + 4 + n, suffix, k);
  return reply(h, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + n + k));
}

static bool
opt_list(struct hs *h, uint32_t len)
{
  g_autoptr(snapshot) snap = NULL;

  if (len != 0)
    return reply_err(h, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "LIST takes no data");
  snap = snapshot_get();
  return list_one(h, srv.export_name, "") &&
         (!snap || list_one(h, srv.export_name, SNAPSHOT_SUFFIX)) &&
         reply(h, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/* Runs the whole negotiation.  True when the client entered transmission. */
static bool
negotiate(struct hs *h)
{
  uint8_t greet[18];
  uint8_t cflags_b[4];
  uint32_t cflags;

  cbt_put_be64(greet, NBD_MAGIC);
  cbt_put_be64(greet + 8, NBD_IHAVEOPT);
  cbt_put_be16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  if (!write_full(h, greet, sizeof greet) || !read_full(h, cflags_b, 4))
    return false;
  cflags = cbt_get_be32(cflags_b);
  if (cflags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
    log_error("%s: unknown client flags 0x%" PRIx32 "; dropping", h->p.peer, cflags);
    return false;
  }
  if (!(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)) {
    log_error("%s: client does not speak fixed newstyle; dropping", h->p.peer);
    return false;
  }
  h->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;

  for (unsigned count = 0; count < MAX_OPTIONS; count++) {
    uint8_t oh[NBD_OPT_HEADER_SIZE];
    g_autofree uint8_t *data = NULL;
    uint32_t option, len;
    bool go = false;

    if (!read_full(h, oh, sizeof oh))
      return false;
    if (cbt_get_be64(oh) != NBD_IHAVEOPT) {
      log_error("%s: bad option magic; dropping", h->p.peer);
      return false;
    }
    option = cbt_get_be32(oh + 8);
    len = cbt_get_be32(oh + 12);
    if (len > CBT_NBD_MAX_OPTION_LEN) {
      if (len > MAX_SKIP_LEN || option == NBD_OPT_EXPORT_NAME) {
        log_error("%s: option %" PRIu32 " of %" PRIu32 " bytes is too large; dropping",
                  h->p.peer, option, len);
        return false;
      }
      if (!skip(h, len) ||
          !reply_err(h, option, NBD_REP_ERR_TOO_BIG, "option too large"))
        return false;
      continue;
    }
    data = g_malloc(len + 1);
    if (!read_full(h, data, len))
      return false;
    data[len] = 0;

    switch (option) {
    case NBD_OPT_EXPORT_NAME: {
      uint8_t out[10 + 124] = { 0 };
      struct snapshot *snap = NULL;
      const char *why = NULL;

      if (find_export(data, len, &snap, &why) < 0) {
        /* This option has no error reply: all we can do is close. */
        log_error("%s: export '%.*s': %s; dropping", h->p.peer, (int)len,
                  (const char *)data, why);
        return false;
      }
      snapshot_unref(h->p.snap);
      h->p.snap = snap;
      cbt_put_be64(out, srv.image->size);
      cbt_put_be16(out + 8, export_flags(h->p.structured, snap != NULL));
      return write_full(h, out, h->no_zeroes ? 10 : sizeof out);
    }
    case NBD_OPT_ABORT:
      reply(h, option, NBD_REP_ACK, NULL, 0);
      debug("%s: client aborted negotiation", h->p.peer);
      return false;
    case NBD_OPT_LIST:
      if (!opt_list(h, len))
        return false;
      break;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      if (!opt_info(h, option, data, len, &go))
        return false;
      if (go)
        return true;
      break;
    case NBD_OPT_STRUCTURED_REPLY:
      if (len != 0) {
        if (!reply_err(h, option, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data"))
          return false;
        break;
      }
      h->p.structured = true;
      if (!reply(h, option, NBD_REP_ACK, NULL, 0))
        return false;
      break;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      if (!opt_meta(h, option, data, len))
        return false;
      break;
    default:
      if (!reply_err(h, option, NBD_REP_ERR_UNSUP, "option %" PRIu32 " not supported",
                     option))
        return false;
      break;
    }
  }
  log_error("%s: too many options; dropping", h->p.peer);
  return false;
}

static void
set_timeout(int fd, unsigned seconds)
{
  struct timeval tv = { .tv_sec = seconds };

  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Under the thread set's lock: give the negotiated socket to a worker. */
static bool
hand_to_worker(int fd, void *arg)
{
  struct hs *h = arg;

  set_timeout(fd, 0);
  h->p.fd = fd;
  debug("%s: negotiated (%s, structured replies %s, %u meta contexts)",
        h->p.peer, h->p.snap ? "point-in-time view" : "main export",
        h->p.structured ? "on" : "off", h->p.n_meta);
  workers_add_conn(&h->p);
  h->p.snap = NULL;                  /* the connection owns the reference now */
  return true;
}

static void *
hs_thread(void *arg)
{
  g_autofree struct hs *h = arg;
  bool ok = negotiate(h);

  client_threads_done(&negotiations, h->fd, ok ? hand_to_worker : NULL, h);
  snapshot_unref(h->p.snap);         /* not handed over */
  return NULL;
}

void
handshake_start(int fd, const char *peer)
{
  struct hs *h = g_new0(struct hs, 1);

  h->fd = fd;
  h->deadline = g_get_monotonic_time() + (gint64)srv.handshake_timeout * G_USEC_PER_SEC;
  g_strlcpy(h->p.peer, peer, sizeof h->p.peer);
  set_timeout(fd, srv.handshake_timeout);
  if (!client_threads_start(&negotiations, fd, peer, hs_thread, h)) {
    close(fd);
    g_free(h);
  }
}

void
handshake_stop_all(void)
{
  client_threads_stop_all(&negotiations);
}
