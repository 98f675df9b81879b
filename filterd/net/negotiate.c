/* Fixed newstyle NBD negotiation as a state machine without I/O.
 *
 * The driver (handshake.c on the daemon's negotiation loop, or a fuzz
 * target) asks where the next bytes from the client go and how many it
 * may receive (nego_recv_buf), reports what arrived (nego_received), and
 * sends what the machine queued (nego_output / nego_sent).  The machine
 * never asks for a byte beyond the option it is reading, so nothing the
 * client sends after NBD_OPT_GO or NBD_OPT_EXPORT_NAME (its first
 * transmission requests) is consumed here: the socket goes to a worker
 * with those bytes still queued.
 *
 * Memory per negotiation is the struct, the queued replies and, only
 * while an option's data is being received, a buffer of its declared
 * length, which is at most CBT_NBD_MAX_OPTION_LEN.  Longer options are
 * skipped in 4 KiB steps (NBD_REP_ERR_TOO_BIG) up to MAX_SKIP_LEN, beyond
 * which, and after MAX_OPTIONS options, the client is dropped.  Every
 * length from the client is checked before use.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "cbt/util.h"
#include "internal.h"

#define MAX_OPTIONS      4096         /* options in one negotiation */
#define MAX_SKIP_LEN     (16u * 1024 * 1024)
#define SKIP_STEP        4096u

enum nego_phase {
  PH_CLIENT_FLAGS,                    /* 4 bytes of client flags */
  PH_OPT_HEADER,                      /* 16-byte option header */
  PH_OPT_DATA,                        /* option data, into n->data */
  PH_SKIP,                            /* an option too large to read */
  PH_END,                             /* done or closing; reads nothing */
};

struct nego {
  enum nego_phase phase;
  enum nego_state state;
  bool no_zeroes;
  bool tls;                           /* STARTTLS done */
  unsigned n_options;
  uint8_t small[NBD_OPT_HEADER_SIZE]; /* client flags or option header */
  uint32_t option;
  uint32_t len;                       /* option data length (or to skip) */
  uint32_t have;                      /* bytes of the current unit received */
  uint8_t *data;                      /* option data, len + 1 bytes */
  uint8_t *junk;                      /* SKIP_STEP bytes while skipping */
  GByteArray *out;                    /* replies not yet sent */
  size_t out_pos;                     /* how much of out was sent */
  struct conn_params p;
};

static void
reply(struct nego *n, uint32_t option, uint32_t type, const void *data,
      uint32_t len)
{
  uint8_t hdr[NBD_OPT_REPLY_HEADER_SIZE];

  cbt_nbd_opt_reply_encode(hdr, option, type, len);
  g_byte_array_append(n->out, hdr, sizeof hdr);
  if (len)
    g_byte_array_append(n->out, data, len);
}

/* An error reply with a human-readable message, as the spec allows. */
static void
reply_err(struct nego *n, uint32_t option, uint32_t type, const char *fmt, ...)
  G_GNUC_PRINTF(4, 5);

static void
reply_err(struct nego *n, uint32_t option, uint32_t type, const char *fmt, ...)
{
  g_autofree char *msg = NULL;
  va_list ap;

  va_start(ap, fmt);
  msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  debug("%s: option %" PRIu32 ": %s", n->p.peer, option, msg);
  reply(n, option, type, msg, (uint32_t)strlen(msg));
}

static void
finish(struct nego *n, enum nego_state state)
{
  n->phase = PH_END;
  n->state = state;
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

static void
send_info(struct nego *n, uint32_t option, uint16_t type, bool snap)
{
  uint8_t buf[2 + CBT_NBD_MAX_NAME_LEN + sizeof SNAPSHOT_SUFFIX];
  size_t len = 2;

  cbt_put_be16(buf, type);
  switch (type) {
  case NBD_INFO_EXPORT:
    cbt_put_be64(buf + 2, srv.image->size);
    cbt_put_be16(buf + 10, export_flags(n->p.structured, snap));
    len = 12;
    break;
  case NBD_INFO_NAME:
    len += MIN(strlen(srv.export_name), CBT_NBD_MAX_NAME_LEN);
    memcpy(buf + 2, srv.export_name, len - 2);
    if (snap) {
      memcpy(buf + len, SNAPSHOT_SUFFIX, strlen(SNAPSHOT_SUFFIX));
      len += strlen(SNAPSHOT_SUFFIX);
    }
    break;
  case NBD_INFO_DESCRIPTION:
    if (!srv.description)
      return;
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
    return;                          /* unknown requests are ignored */
  }
  reply(n, option, NBD_REP_INFO, buf, (uint32_t)len);
}

/* NBD_OPT_INFO / NBD_OPT_GO. */
static void
opt_info(struct nego *n, const uint8_t *d, uint32_t len)
{
  g_autoptr(snapshot) snap = NULL;
  uint32_t option = n->option;
  const char *why = NULL;
  uint32_t namelen;
  uint16_t nreq;
  bool sent_name = false;

  if (len < 6 || (namelen = cbt_get_be32(d)) > len - 6) {
    reply_err(n, option, NBD_REP_ERR_INVALID, "malformed INFO/GO request");
    return;
  }
  nreq = cbt_get_be16(d + 4 + namelen);
  if ((uint64_t)4 + namelen + 2 + 2 * (uint64_t)nreq != len) {
    reply_err(n, option, NBD_REP_ERR_INVALID, "malformed INFO/GO request");
    return;
  }
  if (find_export(d + 4, namelen, &snap, &why) < 0) {
    reply_err(n, option, NBD_REP_ERR_UNKNOWN, "export '%.*s': %s",
              (int)namelen, (const char *)d + 4, why);
    return;
  }

  send_info(n, option, NBD_INFO_EXPORT, snap);
  for (uint16_t i = 0; i < nreq; i++) {
    uint16_t type = cbt_get_be16(d + 6 + namelen + 2 * i);
    if (type == NBD_INFO_EXPORT || type == NBD_INFO_BLOCK_SIZE)
      continue;                      /* always sent */
    if (type == NBD_INFO_NAME) {
      if (sent_name)
        continue;
      sent_name = true;
    }
    send_info(n, option, type, snap);
  }
  send_info(n, option, NBD_INFO_BLOCK_SIZE, snap);
  reply(n, option, NBD_REP_ACK, NULL, 0);
  if (option == NBD_OPT_GO) {
    snapshot_unref(n->p.snap);
    n->p.snap = g_steal_pointer(&snap);
    finish(n, NEGO_DONE);
  }
}

static void
send_meta(struct nego *n, uint32_t option, const struct meta_context *m)
{
  uint8_t buf[4 + sizeof m->name];
  size_t len = strnlen(m->name, sizeof m->name);

  cbt_put_be32(buf, m->id);
  memcpy(buf + 4, m->name, len);
  reply(n, option, NBD_REP_META_CONTEXT, buf, (uint32_t)(4 + len));
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
static void
opt_meta(struct nego *n, const uint8_t *d, uint32_t len)
{
  uint32_t option = n->option;
  bool list = option == NBD_OPT_LIST_META_CONTEXT;
  struct meta_context avail[MAX_META_SELECTED];
  g_autoptr(snapshot) snap = NULL;
  const char *why = NULL;
  size_t n_avail, pos;
  uint32_t namelen, nq;

  if (!list && !n->p.structured) {
    reply_err(n, option, NBD_REP_ERR_INVALID,
              "SET_META_CONTEXT needs structured replies first");
    return;
  }
  if (len < 8 || (namelen = cbt_get_be32(d)) > len - 8) {
    reply_err(n, option, NBD_REP_ERR_INVALID, "malformed meta context request");
    return;
  }
  nq = cbt_get_be32(d + 4 + namelen);
  pos = 8 + (size_t)namelen;
  /* Check the whole query list before acting on any of it. */
  for (uint32_t i = 0, p = (uint32_t)pos; i < nq; i++) {
    uint32_t qlen;
    if (len - p < 4 || (qlen = cbt_get_be32(d + p)) > len - p - 4 ||
        qlen > CBT_NBD_MAX_NAME_LEN) {
      reply_err(n, option, NBD_REP_ERR_INVALID, "malformed meta context query");
      return;
    }
    p += 4 + qlen;
    if (i + 1 == nq && p != len) {
      reply_err(n, option, NBD_REP_ERR_INVALID, "trailing bytes after queries");
      return;
    }
  }
  if (nq == 0 && pos != len) {
    reply_err(n, option, NBD_REP_ERR_INVALID, "trailing bytes after queries");
    return;
  }
  if (find_export(d + 4, namelen, &snap, &why) < 0) {
    reply_err(n, option, NBD_REP_ERR_UNKNOWN, "export '%.*s': %s",
              (int)namelen, (const char *)d + 4, why);
    return;
  }

  n_avail = meta_list(avail, G_N_ELEMENTS(avail), snap != NULL);
  if (!list)
    n->p.n_meta = 0;
  if (list && nq == 0) {
    for (size_t j = 0; j < n_avail; j++)
      send_meta(n, option, &avail[j]);
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
        for (unsigned k = 0; k < n->p.n_meta; k++)
          dup |= n->p.meta_ids[k] == avail[j].id;
        if (dup || n->p.n_meta == MAX_META_SELECTED)
          continue;
        n->p.meta_ids[n->p.n_meta++] = avail[j].id;
      }
      send_meta(n, option, &avail[j]);
    }
  }
  reply(n, option, NBD_REP_ACK, NULL, 0);
}

static void
list_one(struct nego *n, const char *name, const char *suffix)
{
  size_t nl = strlen(name), k = strlen(suffix);
  g_autofree uint8_t *buf = g_malloc(4 + nl + k);

  cbt_put_be32(buf, (uint32_t)(nl + k));
  memcpy(buf + 4, name, nl);
  memcpy(buf + 4 + nl, suffix, k);
  reply(n, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + nl + k));
}

static void
opt_list(struct nego *n, uint32_t len)
{
  g_autoptr(snapshot) snap = NULL;

  if (len != 0) {
    reply_err(n, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "LIST takes no data");
    return;
  }
  snap = snapshot_get();
  list_one(n, srv.export_name, "");
  if (snap)
    list_one(n, srv.export_name, SNAPSHOT_SUFFIX);
  reply(n, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

static void
opt_export_name(struct nego *n, const uint8_t *d, uint32_t len)
{
  uint8_t out[10 + 124] = { 0 };
  struct snapshot *snap = NULL;
  const char *why = NULL;

  if (find_export(d, len, &snap, &why) < 0) {
    /* This option has no error reply: all we can do is close. */
    log_error("%s: export '%.*s': %s; dropping", n->p.peer, (int)len,
              (const char *)d, why);
    finish(n, NEGO_CLOSE);
    return;
  }
  snapshot_unref(n->p.snap);
  n->p.snap = snap;
  cbt_put_be64(out, srv.image->size);
  cbt_put_be16(out + 8, export_flags(n->p.structured, snap != NULL));
  g_byte_array_append(n->out, out, n->no_zeroes ? 10 : sizeof out);
  finish(n, NEGO_DONE);
}

/* An option was answered: read the next header, unless there were too
 * many. */
static void
next_option(struct nego *n)
{
  if (++n->n_options >= MAX_OPTIONS) {
    log_error("%s: too many options; dropping", n->p.peer);
    finish(n, NEGO_CLOSE);
    return;
  }
  n->phase = PH_OPT_HEADER;
  n->have = 0;
}

/* NBD_OPT_STARTTLS: acknowledged, then the driver starts TLS.  Nothing
 * negotiated before TLS survives it (the spec's rule). */
static void
opt_starttls(struct nego *n, uint32_t len)
{
  if (srv.tls_mode == TLS_OFF) {
    reply_err(n, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP, "TLS is not enabled on this server");
    return;
  }
  if (n->tls) {
    reply_err(n, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, "TLS is already on");
    return;
  }
  if (len != 0) {
    reply_err(n, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, "STARTTLS takes no data");
    return;
  }
  reply(n, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0);
  n->p.structured = false;
  n->p.n_meta = 0;
  snapshot_unref(g_steal_pointer(&n->p.snap));
  finish(n, NEGO_STARTTLS);
}

/* A whole option (header and data) has arrived. */
static void
do_option(struct nego *n, const uint8_t *d, uint32_t len)
{
  uint32_t option = n->option;

  if (srv.tls_mode == TLS_REQUIRE && !n->tls && option != NBD_OPT_STARTTLS &&
      option != NBD_OPT_ABORT) {
    if (option == NBD_OPT_EXPORT_NAME) {
      /* No error reply exists for this option: close. */
      log_error("%s: export requested without TLS (--tls=require); dropping",
                n->p.peer);
      finish(n, NEGO_CLOSE);
      return;
    }
    reply_err(n, option, NBD_REP_ERR_TLS_REQD,
              "TLS is required: send NBD_OPT_STARTTLS first");
    next_option(n);
    return;
  }
  switch (option) {
  case NBD_OPT_EXPORT_NAME:
    opt_export_name(n, d, len);
    return;
  case NBD_OPT_ABORT:
    reply(n, option, NBD_REP_ACK, NULL, 0);
    debug("%s: client aborted negotiation", n->p.peer);
    finish(n, NEGO_CLOSE);
    return;
  case NBD_OPT_LIST:
    opt_list(n, len);
    break;
  case NBD_OPT_STARTTLS:
    opt_starttls(n, len);
    break;
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    opt_info(n, d, len);
    break;
  case NBD_OPT_STRUCTURED_REPLY:
    if (len != 0) {
      reply_err(n, option, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
      break;
    }
    n->p.structured = true;
    reply(n, option, NBD_REP_ACK, NULL, 0);
    break;
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    opt_meta(n, d, len);
    break;
  default:
    reply_err(n, option, NBD_REP_ERR_UNSUP, "option %" PRIu32 " not supported",
              option);
    break;
  }
  if (n->phase != PH_END)
    next_option(n);
}

static void
client_flags(struct nego *n)
{
  uint32_t cflags = cbt_get_be32(n->small);

  if (cflags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
    log_error("%s: unknown client flags 0x%" PRIx32 "; dropping", n->p.peer, cflags);
    finish(n, NEGO_CLOSE);
    return;
  }
  if (!(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)) {
    log_error("%s: client does not speak fixed newstyle; dropping", n->p.peer);
    finish(n, NEGO_CLOSE);
    return;
  }
  n->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
  n->phase = PH_OPT_HEADER;
  n->have = 0;
}

static void
option_header(struct nego *n)
{
  if (cbt_get_be64(n->small) != NBD_IHAVEOPT) {
    log_error("%s: bad option magic; dropping", n->p.peer);
    finish(n, NEGO_CLOSE);
    return;
  }
  n->option = cbt_get_be32(n->small + 8);
  n->len = cbt_get_be32(n->small + 12);
  n->have = 0;
  if (n->len > CBT_NBD_MAX_OPTION_LEN) {
    if (n->len > MAX_SKIP_LEN || n->option == NBD_OPT_EXPORT_NAME) {
      log_error("%s: option %" PRIu32 " of %" PRIu32 " bytes is too large; dropping",
                n->p.peer, n->option, n->len);
      finish(n, NEGO_CLOSE);
      return;
    }
    n->junk = g_malloc(SKIP_STEP);
    n->phase = PH_SKIP;
    return;
  }
  n->data = g_malloc(n->len + 1);
  n->phase = PH_OPT_DATA;
  if (n->len == 0)
    nego_received(n, 0);
}

struct nego *
nego_new(const char *peer)
{
  struct nego *n = g_new0(struct nego, 1);
  uint8_t greet[18];

  n->phase = PH_CLIENT_FLAGS;
  n->state = NEGO_RUNNING;
  n->out = g_byte_array_new();
  g_strlcpy(n->p.peer, peer, sizeof n->p.peer);
  n->p.fd = -1;
  cbt_put_be64(greet, NBD_MAGIC);
  cbt_put_be64(greet + 8, NBD_IHAVEOPT);
  cbt_put_be16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  g_byte_array_append(n->out, greet, sizeof greet);
  return n;
}

void
nego_free(struct nego *n)
{
  if (!n)
    return;
  snapshot_unref(n->p.snap);
  g_free(n->data);
  g_free(n->junk);
  g_byte_array_free(n->out, TRUE);
  g_free(n);
}

void
nego_tls_started(struct nego *n)
{
  if (n->state != NEGO_STARTTLS)
    return;
  n->tls = true;
  n->state = NEGO_RUNNING;
  next_option(n);
}

enum nego_state
nego_state(const struct nego *n)
{
  return n->state;
}

void *
nego_recv_buf(struct nego *n, size_t *len)
{
  switch (n->phase) {
  case PH_CLIENT_FLAGS:
    *len = 4 - n->have;
    return n->small + n->have;
  case PH_OPT_HEADER:
    *len = NBD_OPT_HEADER_SIZE - n->have;
    return n->small + n->have;
  case PH_OPT_DATA:
    *len = n->len - n->have;
    return n->data + n->have;
  case PH_SKIP:
    *len = MIN(SKIP_STEP, n->len - n->have);
    return n->junk;
  case PH_END:
    break;
  }
  *len = 0;
  return NULL;
}

void
nego_received(struct nego *n, size_t got)
{
  size_t want;

  nego_recv_buf(n, &want);
  if (got > want)                    /* a driver bug; never trust it */
    got = want;
  n->have += (uint32_t)got;
  switch (n->phase) {
  case PH_CLIENT_FLAGS:
    if (n->have == 4)
      client_flags(n);
    break;
  case PH_OPT_HEADER:
    if (n->have == NBD_OPT_HEADER_SIZE)
      option_header(n);
    break;
  case PH_OPT_DATA:
    if (n->have == n->len) {
      g_autofree uint8_t *d = g_steal_pointer(&n->data);
      d[n->len] = 0;
      do_option(n, d, n->len);
    }
    break;
  case PH_SKIP:
    if (n->have == n->len) {
      g_clear_pointer(&n->junk, g_free);
      reply_err(n, n->option, NBD_REP_ERR_TOO_BIG, "option too large");
      next_option(n);
    }
    break;
  case PH_END:
    break;
  }
}

const void *
nego_output(const struct nego *n, size_t *len)
{
  *len = n->out->len - n->out_pos;
  return n->out->data + n->out_pos;
}

void
nego_sent(struct nego *n, size_t len)
{
  n->out_pos += MIN(len, n->out->len - n->out_pos);
  if (n->out_pos == n->out->len) {
    g_byte_array_set_size(n->out, 0);
    n->out_pos = 0;
  }
}

struct conn_params *
nego_params(struct nego *n)
{
  return &n->p;
}
