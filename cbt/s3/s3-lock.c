/* A lock object on S3: one writer per repository, across hosts.
 *
 * The lock is an object (a repository's PREFIX/lock) holding JSON:
 *   { "format": "cbt-s3-lock", "version": 1, "owner": TOKEN,
 *     "host": HOST, "pid": PID, "note": NOTE, "ttl": SECONDS,
 *     "written-unix": TIME, "pid-holds": true, "boot-id": BOOT,
 *     "pid-ns": INODE }
 * TOKEN is random per acquisition and is what "ours" means.  HOST, PID,
 * NOTE and written-unix are for the message that names the holder.
 * "pid-holds" (S3_LOCK_PROCESS) says the lock lives only as long as its
 * process; BOOT (the kernel's boot id) and INODE (of its pid namespace)
 * say which process PID is: a pid names a process only within one pid
 * namespace of one boot.  A process-bound lock of this host name is judged
 * by them (holder_state): another boot -> the holder is gone; this boot,
 * our namespace -> gone if no process has PID; another namespace -> we
 * cannot see it, so it holds until its ttl ends or someone removes it.
 * Locks that older cbt wrote have neither field: for those a missing PID
 * still means gone, as it did before.
 *
 * Expiry is judged on the server's clock only, so hosts whose clocks
 * disagree still agree on it: a lock has expired when the Date of the
 * answer that read it is at least ttl seconds after its Last-Modified
 * (both stamped by the server).  The holder refreshes it (rewrites it,
 * which moves Last-Modified) well within ttl.
 *
 * Acquire:
 *   1. PUT the lock with If-None-Match: * (create only if absent).  On
 *      success, GET it back and check it holds our token: a server that
 *      ignored the condition would have let us overwrite a holder.
 *   2. 412 (it exists): GET it.  Our own token means our PUT went through
 *      and only its answer was lost (the retry then saw our lock).  An
 *      expired lock is replaced with If-Match on the ETag we read: of two
 *      hosts that both saw it expired, only the first replacement matches.
 *      A live lock fails with S3_ERROR_LOCKED, naming the holder.
 *   3. The lock vanished between 1 and 2, or another host replaced the
 *      expired one first: start over, a few times at most.
 * Refresh: PUT with If-Match on the ETag of our last write; 412 means the
 * lock was taken over (it had expired): the holder has lost it.
 * Release: GET, and DELETE if the token is ours.  The window between the
 * two is the one race left: if our lock expired in it and another host
 * took it over, we delete theirs.  A holder that refreshes in time never
 * reaches that state, and S3 has no conditional DELETE that RGW 16 knows.
 *
 * What the server must do: RGW (Ceph 16, Debian 12) answers 412 to a
 * conditional PUT whose condition fails, and creates with If-None-Match
 * atomically (an exclusive RADOS create); tests/test-s3-client.sh races
 * eight acquirers and requires exactly one winner.  AWS S3 has honoured
 * If-None-Match on PUT since August 2024.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json-c/json.h>

#include "msg.h"
#include "s3.h"

#define LOCK_FORMAT "cbt-s3-lock"
#define LOCK_MAX_BODY ((size_t)64 << 10)
#define ACQUIRE_ROUNDS 5

struct s3_lock {
  s3_client *c;
  char *bucket;
  char *key;
  char *token;
  char *note;
  char *etag;               /* of our last write */
  guint ttl;
  bool pid_holds;           /* S3_LOCK_PROCESS */
};

/* A lock object as read back. */
struct holder {
  char *token;
  char *host;
  char *note;
  gint64 pid;
  gint64 ttl;
  bool pid_holds;           /* the lock lives only as long as host:pid */
  char *boot_id;            /* NULL: not recorded (older cbt) */
  gint64 pid_ns;            /* 0: not recorded */
};

static void
holder_clear(struct holder *h)
{
  g_free(h->token);
  g_free(h->host);
  g_free(h->note);
  g_free(h->boot_id);
  memset(h, 0, sizeof *h);
}

/* This boot's id (/proc/sys/kernel/random/boot_id, a UUID the kernel
 * draws at boot), or NULL if it cannot be read.  Read once. */
static const char *
our_boot_id(void)
{
  static gsize once;
  static char *id;

  if (g_once_init_enter(&once)) {
    g_autofree char *text = NULL;

    if (g_file_get_contents("/proc/sys/kernel/random/boot_id", &text, NULL, NULL)) {
      g_strstrip(text);
      if (*text && g_utf8_validate(text, -1, NULL))
        id = g_steal_pointer(&text);
    }
    g_once_init_leave(&once, 1);
  }
  return id;
}

/* The inode of our pid namespace (what `readlink /proc/self/ns/pid`
 * shows as pid:[INODE]), or 0 if it cannot be read.  Inodes of live
 * namespaces are distinct within one boot. */
static gint64
our_pid_ns(void)
{
  struct stat st;

  if (stat("/proc/self/ns/pid", &st) < 0 || st.st_ino == 0 || st.st_ino > G_MAXINT64)
    return 0;
  return (gint64)st.st_ino;
}

static char *
lock_body(const s3_lock *l)
{
  g_autoptr(json_object) jo = json_object_new_object();

  json_object_object_add(jo, "format", json_object_new_string(LOCK_FORMAT));
  json_object_object_add(jo, "version", json_object_new_int(1));
  json_object_object_add(jo, "owner", json_object_new_string(l->token));
  json_object_object_add(jo, "host", json_object_new_string(g_get_host_name()));
  json_object_object_add(jo, "pid", json_object_new_int64(getpid()));
  json_object_object_add(jo, "note", json_object_new_string(l->note));
  json_object_object_add(jo, "ttl", json_object_new_int64(l->ttl));
  json_object_object_add(jo, "written-unix", json_object_new_int64(g_get_real_time() / 1000000));
  if (l->pid_holds)
    json_object_object_add(jo, "pid-holds", json_object_new_boolean(true));
  if (our_boot_id())
    json_object_object_add(jo, "boot-id", json_object_new_string(our_boot_id()));
  if (our_pid_ns())
    json_object_object_add(jo, "pid-ns", json_object_new_int64(our_pid_ns()));
  return g_strdup(json_object_to_json_string_ext(jo, JSON_C_TO_STRING_PLAIN));
}

static const char *
jstr(json_object *jo, const char *key)
{
  json_object *v;

  if (!json_object_object_get_ex(jo, key, &v) || !json_object_is_type(v, json_type_string))
    return NULL;
  return json_object_get_string(v);
}

static bool
jint(json_object *jo, const char *key, gint64 *out)
{
  json_object *v;

  if (!json_object_object_get_ex(jo, key, &v) || !json_object_is_type(v, json_type_int))
    return false;
  *out = json_object_get_int64(v);
  return true;
}

/* Parse a lock object's body; false (and *@error) if it is not ours. */
static bool
parse_holder(const char *bucket, const char *key, GBytes *data, struct holder *h,
             GError **error)
{
  g_autoptr(json_object) jo = NULL;
  json_tokener *tok = json_tokener_new();
  gsize len;
  const char *p = g_bytes_get_data(data, &len);
  const char *fmt;

  memset(h, 0, sizeof *h);
  if (len <= INT_MAX)
    jo = json_tokener_parse_ex(tok, p, (int)len);
  if (jo && json_tokener_get_parse_end(tok) != len)
    g_clear_pointer(&jo, json_object_put);
  json_tokener_free(tok);
  fmt = jo && json_object_is_type(jo, json_type_object) ? jstr(jo, "format") : NULL;
  if (!fmt || strcmp(fmt, LOCK_FORMAT) != 0 || !jstr(jo, "owner") ||
      !jint(jo, "ttl", &h->ttl) || h->ttl < 0) {
    g_set_error(error, S3_ERROR, S3_ERROR_PROTOCOL,
                "S3 lock s3://%s/%s: not a cbt lock object (remove it if no cbt uses "
                "this prefix)", bucket, key);
    return false;
  }
  h->token = g_strdup(jstr(jo, "owner"));
  h->host = g_strdup(jstr(jo, "host") ? jstr(jo, "host") : "?");
  h->note = g_strdup(jstr(jo, "note") ? jstr(jo, "note") : "");
  if (!jint(jo, "pid", &h->pid))
    h->pid = -1;
  {
    json_object *v;
    const char *boot = jstr(jo, "boot-id");

    h->pid_holds = json_object_object_get_ex(jo, "pid-holds", &v) &&
                   json_object_is_type(v, json_type_boolean) && json_object_get_boolean(v);
    /* Malformed identity fields count as absent: then the holder is
     * judged as one of an older cbt, or (one field only) not at all. */
    if (boot && *boot)
      h->boot_id = g_strdup(boot);
  }
  if (!jint(jo, "pid-ns", &h->pid_ns) || h->pid_ns <= 0)
    h->pid_ns = 0;
  return true;
}

/* What we can tell of the process that holds a lock. */
enum holder_state {
  HOLDER_UNKNOWN,           /* not ours to judge, or it may run: wait for the ttl */
  HOLDER_OTHER_NS,          /* this host and boot, another pid namespace: unknown */
  HOLDER_GONE,              /* no process has its pid (in its namespace) */
  HOLDER_OLD_BOOT,          /* it ran in an earlier boot of this host */
};

/* Judge the holder of a S3_LOCK_PROCESS lock taken on this host (same
 * host name): a gone one will never refresh the lock, so it can be taken
 * over without waiting for its ttl.  A pid means a process only in one
 * boot and pid namespace, so the pid is looked at only when both are
 * ours; a lock of an older cbt, which records neither, is judged by the
 * pid alone, as that cbt did.  A reused pid only makes us wait for the
 * ttl; so does anything we cannot read. */
static enum holder_state
holder_state(const struct holder *h)
{
  const char *boot = our_boot_id();
  gint64 ns = our_pid_ns();
  bool legacy = !h->boot_id && !h->pid_ns;

  if (!h->pid_holds || h->pid <= 0 || h->pid > INT_MAX ||
      strcmp(h->host, g_get_host_name()) != 0)
    return HOLDER_UNKNOWN;
  if (!legacy) {
    if (!boot || !h->boot_id)
      return HOLDER_UNKNOWN;
    if (strcmp(h->boot_id, boot) != 0)
      return HOLDER_OLD_BOOT;
    if (!ns || !h->pid_ns)
      return HOLDER_UNKNOWN;
    if (h->pid_ns != ns)
      return HOLDER_OTHER_NS;
  }
  if (h->pid != getpid() && kill((pid_t)h->pid, 0) < 0 && errno == ESRCH)
    return HOLDER_GONE;
  return HOLDER_UNKNOWN;
}

/* GET and parse the lock.  *@info gets its ETag and the server times. */
static bool
read_lock(s3_lock *l, struct holder *h, s3_object_info *info, GError **error)
{
  g_autoptr(GBytes) data = NULL;

  if (!s3_get_object(l->c, l->bucket, l->key, LOCK_MAX_BODY, &data, info, error))
    return false;
  if (!parse_holder(l->bucket, l->key, data, h, error)) {
    s3_object_info_clear(info);
    return false;
  }
  return true;
}

static bool
expired(const struct holder *h, const s3_object_info *info)
{
  return info->server_time >= 0 && info->last_modified >= 0 &&
         info->server_time - info->last_modified >= h->ttl;
}

/* S3_ERROR_LOCKED naming the holder: "S3 lock s3://b/k: [WHY: ]held by
 * HOST pid PID (NOTE)[ in another pid namespace ...]; it expires in N s
 * unless refreshed[; how to remove it]". */
static void
set_locked(GError **error, const s3_lock *l, const struct holder *h,
           const s3_object_info *info, const char *why)
{
  g_autofree char *left = NULL;
  g_autofree char *where = NULL;
  g_autofree char *hint = NULL;

  if (info->server_time >= 0 && info->last_modified >= 0)
    left = g_strdup_printf("%" G_GINT64_FORMAT " s",
                           MAX(0, info->last_modified + h->ttl - info->server_time));
  if (!why && holder_state(h) == HOLDER_OTHER_NS) {
    where = g_strdup_printf(" in another pid namespace (pid:[%" G_GINT64_FORMAT "]; ours "
                            "is pid:[%" G_GINT64_FORMAT "]), where this process cannot "
                            "see whether it runs", h->pid_ns, our_pid_ns());
    hint = g_strdup_printf("; if that process is gone, wait for the lock to expire or "
                           "remove it: cbt s3 rm s3://%s/%s", l->bucket, l->key);
  }
  g_set_error(error, S3_ERROR, S3_ERROR_LOCKED,
              "S3 lock s3://%s/%s: %s%sheld by %s pid %" G_GINT64_FORMAT "%s%s%s%s; it "
              "expires in %s unless refreshed%s", l->bucket, l->key, why ? why : "",
              why ? ": " : "", h->host, h->pid, *h->note ? " (" : "", h->note,
              *h->note ? ")" : "", where ? where : "", left ? left : "? s",
              hint ? hint : "");
}

/* GET the lock back after we wrote it: it must hold our token. */
static bool
verify(s3_lock *l, GError **error)
{
  struct holder h;
  s3_object_info info = { 0 };
  bool ours;

  if (!read_lock(l, &h, &info, error))
    return false;
  ours = strcmp(h.token, l->token) == 0;
  if (ours) {
    g_free(l->etag);
    l->etag = g_strdup(info.etag);
  } else {
    set_locked(error, l, &h, &info,
               "lost a race with another writer (does the server honour conditional "
               "PUTs?)");
  }
  holder_clear(&h);
  s3_object_info_clear(&info);
  return ours;
}

static s3_lock *
lock_new(s3_client *c, const char *bucket, const char *key, const char *token, guint ttl,
         const char *note)
{
  s3_lock *l = g_new0(s3_lock, 1);

  l->c = c;
  l->bucket = g_strdup(bucket);
  l->key = g_strdup(key);
  l->token = g_strdup(token);
  l->ttl = ttl;
  l->note = g_strdup(note ? note : "");
  return l;
}

bool
s3_lock_acquire(s3_client *c, const char *bucket, const char *key, guint ttl,
                const char *note, s3_lock **out, GError **error)
{
  return s3_lock_acquire_flags(c, bucket, key, ttl, note, 0, out, error);
}

bool
s3_lock_acquire_flags(s3_client *c, const char *bucket, const char *key, guint ttl,
                      const char *note, unsigned flags, s3_lock **out, GError **error)
{
  g_autofree char *token = g_uuid_string_random();
  g_autoptr(s3_lock) l = lock_new(c, bucket, key, token, ttl, note);
  g_autofree char *body = NULL;
  const s3_put_cond absent = { .if_absent = true };

  l->pid_holds = (flags & S3_LOCK_PROCESS) != 0;
  body = lock_body(l);

  if (ttl == 0) {
    g_set_error(error, S3_ERROR, S3_ERROR_CONFIG, "S3 lock s3://%s/%s: ttl must be > 0",
                bucket, key);
    return false;
  }
  for (guint round = 0; round < ACQUIRE_ROUNDS; round++) {
    struct holder h;
    s3_object_info info = { 0 };
    s3_put_cond replace = { 0 };
    GError *err = NULL;
    enum holder_state state;
    bool ours, stale;

    if (s3_put_object(c, bucket, key, body, strlen(body), &absent, NULL, &err)) {
      if (!verify(l, error))
        return false;
      *out = g_steal_pointer(&l);
      return true;
    }
    if (err->code != S3_ERROR_PRECONDITION) {
      g_propagate_error(error, err);
      return false;
    }
    g_clear_error(&err);
    if (!read_lock(l, &h, &info, &err)) {
      if (err->code == S3_ERROR_NOT_FOUND) {
        g_error_free(err);
        continue;           /* released in between */
      }
      g_propagate_error(error, err);
      return false;
    }
    ours = strcmp(h.token, l->token) == 0;
    state = l->pid_holds ? holder_state(&h) : HOLDER_UNKNOWN;
    stale = expired(&h, &info) || state == HOLDER_GONE || state == HOLDER_OLD_BOOT;
    if (!ours && !stale) {
      set_locked(error, l, &h, &info, NULL);
      holder_clear(&h);
      s3_object_info_clear(&info);
      return false;
    }
    if (ours) {
      holder_clear(&h);
      l->etag = g_steal_pointer(&info.etag);
      *out = g_steal_pointer(&l);
      return true;
    }
    /* Expired: replace exactly the version we judged. */
    replace.if_match = info.etag;
    if (s3_put_object(c, bucket, key, body, strlen(body), &replace, NULL, &err)) {
      bool was_expired = expired(&h, &info);

      holder_clear(&h);
      s3_object_info_clear(&info);
      if (!verify(l, error))
        return false;
      cli_note("S3 lock s3://%s/%s: took over %s", bucket, key,
               was_expired ? "an expired lock"
               : state == HOLDER_OLD_BOOT
                 ? "a lock that a process of an earlier boot of this host left"
                 : "a lock that a dead process on this host left");
      *out = g_steal_pointer(&l);
      return true;
    }
    holder_clear(&h);
    s3_object_info_clear(&info);
    if (err->code != S3_ERROR_PRECONDITION && err->code != S3_ERROR_NOT_FOUND) {
      g_propagate_error(error, err);
      return false;
    }
    g_error_free(err);      /* someone else replaced or removed it first */
  }
  g_set_error(error, S3_ERROR, S3_ERROR_LOCKED,
              "S3 lock s3://%s/%s: still contended after %d rounds", bucket, key,
              ACQUIRE_ROUNDS);
  return false;
}

bool
s3_lock_refresh(s3_lock *l, GError **error)
{
  g_autofree char *body = lock_body(l);
  g_autofree char *etag = NULL;
  s3_put_cond cond = { .if_match = l->etag };
  GError *err = NULL;

  if (!s3_put_object(l->c, l->bucket, l->key, body, strlen(body), &cond, &etag, &err)) {
    if (err->code == S3_ERROR_PRECONDITION || err->code == S3_ERROR_NOT_FOUND) {
      g_set_error(error, S3_ERROR, S3_ERROR_LOCKED,
                  "S3 lock s3://%s/%s: lost (it expired and was taken over or removed)",
                  l->bucket, l->key);
      g_error_free(err);
      return false;
    }
    g_propagate_error(error, err);
    return false;
  }
  g_free(l->etag);
  l->etag = g_steal_pointer(&etag);
  return true;
}

bool
s3_lock_release(s3_lock *l, GError **error)
{
  struct holder h;
  s3_object_info info = { 0 };
  GError *err = NULL;
  bool ours;

  if (!read_lock(l, &h, &info, &err)) {
    if (err->code == S3_ERROR_NOT_FOUND) {
      g_error_free(err);
      return true;
    }
    g_propagate_error(error, err);
    return false;
  }
  ours = strcmp(h.token, l->token) == 0;
  if (!ours)
    set_locked(error, l, &h, &info, "no longer ours");
  holder_clear(&h);
  s3_object_info_clear(&info);
  return ours && s3_delete_object(l->c, l->bucket, l->key, error);
}

const char *
s3_lock_token(const s3_lock *l)
{
  return l->token;
}

bool
s3_lock_resume(s3_client *c, const char *bucket, const char *key, const char *token,
               s3_lock **out, GError **error)
{
  g_autoptr(s3_lock) l = lock_new(c, bucket, key, token, 1, NULL);
  struct holder h;
  s3_object_info info = { 0 };

  if (!read_lock(l, &h, &info, error))
    return false;
  if (strcmp(h.token, token) != 0) {
    set_locked(error, l, &h, &info, NULL);
    holder_clear(&h);
    s3_object_info_clear(&info);
    return false;
  }
  l->ttl = (guint)MIN(h.ttl, (gint64)G_MAXUINT);
  g_free(l->note);
  l->note = g_steal_pointer(&h.note);
  l->etag = g_steal_pointer(&info.etag);
  holder_clear(&h);
  s3_object_info_clear(&info);
  *out = g_steal_pointer(&l);
  return true;
}

void
s3_lock_free(s3_lock *l)
{
  if (!l)
    return;
  g_free(l->bucket);
  g_free(l->key);
  g_free(l->token);
  g_free(l->note);
  g_free(l->etag);
  g_free(l);
}
