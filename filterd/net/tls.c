/* TLS for NBD clients (--tls, --tls-certificates, --tls-psk), with GnuTLS.
 *
 * A client that sends NBD_OPT_STARTTLS during negotiation gets a TLS
 * session; everything after it (the rest of the negotiation and the
 * whole transmission phase) goes through that session.  Rather than
 * teach the negotiation loop and the workers' io_uring receive and send
 * paths about TLS records, each TLS client gets a pump: a socketpair
 * whose one end replaces the client's socket for the daemon (so the
 * negotiation and the workers carry on unchanged, in plaintext), and two
 * threads that move bytes between the other end and the TLS session on
 * the real socket, one per direction (GnuTLS allows one thread sending
 * and one receiving on a session).  Blocking I/O in each direction, so a
 * full socket in one direction never stalls the other.
 *
 * Cost: two threads, two copies and a context switch per message for TLS
 * clients only; plain clients never see any of this.  The number of TLS
 * clients is bounded by --max-clients.  kTLS (the kernel doing the
 * records, the workers' rings talking to the socket directly) would
 * remove the pump; it is not enabled everywhere, so this is the portable
 * path.
 *
 * The handshake runs in the pump's first thread within what is left of
 * the client's negotiation deadline.  Ending: when the client goes, the
 * receiving thread passes the end of file on to the daemon's end; when
 * the daemon closes its end (connection finished, negotiation cut,
 * shutdown), the sending thread says goodbye to the client and shuts the
 * socket down, which ends the receiving thread too.  The last thread out
 * frees the session.  tls_stop_all() shuts every client socket down and
 * waits for every pump, after the workers have stopped.
 *
 * Credentials, as nbdkit lays them out so existing setups carry over:
 * --tls-certificates DIR holds ca-cert.pem (needed for
 * --tls-verify-peer; client certificates are then required and verified
 * against it), server-cert.pem, server-key.pem and optionally
 * ca-crl.pem; --tls-psk FILE is psktool's "username:hexkey" file.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "internal.h"

#define PUMP_BUF      (64 * 1024)
#define PUMP_STACK    (256 * 1024)

static gnutls_certificate_credentials_t x509_cred;
static gnutls_psk_server_credentials_t psk_cred;
static gnutls_priority_t priority;

struct pump {
  int net;                           /* the client's socket */
  int local;                         /* our end of the socketpair */
  gnutls_session_t session;
  gint64 deadline;                   /* for the handshake */
  char peer[64];
  atomic_int threads;                /* threads still using the pump */
  GList link;                        /* in pumps.list */
};

static struct {
  GMutex lock;
  GCond cond;
  GQueue list;                       /* struct pump, under lock */
  bool stopping;
} pumps;

bool
tls_init(GError **error)
{
  const char *prio;
  int r;

  if (srv.tls_mode == TLS_OFF)
    return true;
  if (srv.tls_psk) {
    r = gnutls_psk_allocate_server_credentials(&psk_cred);
    if (r == 0)
      r = gnutls_psk_set_server_credentials_file(psk_cred, srv.tls_psk);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                  "--tls-psk %s: %s", srv.tls_psk, gnutls_strerror(r));
      return false;
    }
    prio = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";
  } else {
    g_autofree char *ca = g_build_filename(srv.tls_certificates, "ca-cert.pem", NULL);
    g_autofree char *crl = g_build_filename(srv.tls_certificates, "ca-crl.pem", NULL);
    g_autofree char *cert = g_build_filename(srv.tls_certificates, "server-cert.pem", NULL);
    g_autofree char *key = g_build_filename(srv.tls_certificates, "server-key.pem", NULL);

    r = gnutls_certificate_allocate_credentials(&x509_cred);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "TLS: %s", gnutls_strerror(r));
      return false;
    }
    if (g_file_test(ca, G_FILE_TEST_EXISTS)) {
      r = gnutls_certificate_set_x509_trust_file(x509_cred, ca, GNUTLS_X509_FMT_PEM);
      if (r < 0) {
        g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s: %s", ca,
                    gnutls_strerror(r));
        return false;
      }
    } else if (srv.tls_verify_peer) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                  "--tls-verify-peer needs %s", ca);
      return false;
    }
    if (g_file_test(crl, G_FILE_TEST_EXISTS)) {
      r = gnutls_certificate_set_x509_crl_file(x509_cred, crl, GNUTLS_X509_FMT_PEM);
      if (r < 0) {
        g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "%s: %s", crl,
                    gnutls_strerror(r));
        return false;
      }
    }
    r = gnutls_certificate_set_x509_key_file(x509_cred, cert, key, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
      g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_FAILED,
                  "--tls-certificates %s: %s / %s: %s", srv.tls_certificates,
                  cert, key, gnutls_strerror(r));
      return false;
    }
    prio = "NORMAL";
  }
  r = gnutls_priority_init(&priority, prio, NULL);
  if (r < 0) {
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "TLS priority %s: %s",
                prio, gnutls_strerror(r));
    return false;
  }
  return true;
}

void
tls_deinit(void)
{
  if (priority)
    gnutls_priority_deinit(priority);
  if (x509_cred)
    gnutls_certificate_free_credentials(x509_cred);
  if (psk_cred)
    gnutls_psk_free_server_credentials(psk_cred);
  priority = NULL;
  x509_cred = NULL;
  psk_cred = NULL;
}

static void
pump_unref(struct pump *p)
{
  if (atomic_fetch_sub(&p->threads, 1) != 1)
    return;
  /* Off the list before the descriptors close: tls_stop_all shuts down
   * what is on it. */
  g_mutex_lock(&pumps.lock);
  g_queue_unlink(&pumps.list, &p->link);
  g_cond_broadcast(&pumps.cond);
  g_mutex_unlock(&pumps.lock);
  gnutls_deinit(p->session);
  close(p->net);
  close(p->local);
  g_free(p);
}

static bool
write_all(int fd, const void *buf, size_t len)
{
  while (len > 0) {
    ssize_t r = send(fd, buf, len, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    buf = (const char *)buf + r;
    len -= (size_t)r;
  }
  return true;
}

/* Daemon -> client. */
static void *
pump_send(void *arg)
{
  struct pump *p = arg;
  g_autofree char *buf = g_malloc(PUMP_BUF);

  for (;;) {
    ssize_t n = recv(p->local, buf, PUMP_BUF, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    for (ssize_t done = 0; done < n; ) {
      ssize_t r = gnutls_record_send(p->session, buf + done, (size_t)(n - done));
      if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
        continue;
      if (r < 0) {
        debug("%s: TLS send: %s", p->peer, gnutls_strerror((int)r));
        goto out;
      }
      done += r;
    }
  }
  gnutls_bye(p->session, GNUTLS_SHUT_WR);
out:
  shutdown(p->net, SHUT_RDWR);
  shutdown(p->local, SHUT_RDWR);
  pump_unref(p);
  return NULL;
}

/* Client -> daemon, after the handshake. */
static void
pump_receive(struct pump *p)
{
  g_autofree char *buf = g_malloc(PUMP_BUF);

  for (;;) {
    ssize_t n = gnutls_record_recv(p->session, buf, PUMP_BUF);
    if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
      continue;
    if (n < 0) {
      debug("%s: TLS receive: %s", p->peer, gnutls_strerror((int)n));
      break;
    }
    if (n == 0 || !write_all(p->local, buf, (size_t)n))
      break;
  }
  /* The daemon sees the end of the client's requests; the sending side
   * ends when the daemon closes its end. */
  shutdown(p->local, SHUT_WR);
}

static void
set_timeouts(int fd, gint64 usec)
{
  struct timeval tv = { .tv_sec = usec / G_USEC_PER_SEC, .tv_usec = usec % G_USEC_PER_SEC };

  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static bool
handshake(struct pump *p)
{
  int r;

  do {
    gint64 left = p->deadline - g_get_monotonic_time();
    if (left <= 0) {
      log_error("%s: TLS handshake timed out", p->peer);
      return false;
    }
    set_timeouts(p->net, left);
    r = gnutls_handshake(p->session);
  } while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED ||
           (r < 0 && !gnutls_error_is_fatal(r)));
  if (r < 0) {
    log_error("%s: TLS handshake failed: %s", p->peer, gnutls_strerror(r));
    return false;
  }
  if (srv.tls_verify_peer && !srv.tls_psk) {
    unsigned status = 0;
    r = gnutls_certificate_verify_peers2(p->session, &status);
    if (r < 0 || status != 0) {
      gnutls_datum_t why = { NULL, 0 };
      if (r >= 0)
        gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &why, 0);
      log_error("%s: client certificate refused: %s", p->peer,
                r < 0 ? gnutls_strerror(r) : (const char *)why.data);
      gnutls_free(why.data);
      return false;
    }
  }
  set_timeouts(p->net, 0);
  if (log_verbose) {
    g_autofree char *desc = gnutls_session_get_desc(p->session);
    debug("%s: TLS: %s", p->peer, desc);
  }
  return true;
}

static void *
pump_main(void *arg)
{
  struct pump *p = arg;
  pthread_attr_t attr;
  pthread_t t;

  if (!handshake(p)) {
    shutdown(p->local, SHUT_RDWR);
    pump_unref(p);
    return NULL;
  }
  atomic_fetch_add(&p->threads, 1);
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, PUMP_STACK);
  if (pthread_create(&t, &attr, pump_send, p) != 0) {
    log_error("%s: cannot start a TLS thread", p->peer);
    atomic_fetch_sub(&p->threads, 1);
    shutdown(p->local, SHUT_RDWR);
    pthread_attr_destroy(&attr);
    pump_unref(p);
    return NULL;
  }
  pthread_attr_destroy(&attr);
  pump_receive(p);
  pump_unref(p);
  return NULL;
}

int
tls_start(int net, const char *peer, gint64 deadline)
{
  struct pump *p;
  pthread_attr_t attr;
  pthread_t t;
  int sv[2], r;

  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
    log_error("%s: TLS: socketpair: %s", peer, g_strerror(errno));
    close(net);
    return -1;
  }
  p = g_new0(struct pump, 1);
  p->net = net;
  p->local = sv[1];
  p->deadline = deadline;
  g_strlcpy(p->peer, peer, sizeof p->peer);
  atomic_init(&p->threads, 1);
  r = gnutls_init(&p->session, GNUTLS_SERVER);
  if (r == 0)
    r = gnutls_priority_set(p->session, priority);
  if (r == 0)
    r = psk_cred ? gnutls_credentials_set(p->session, GNUTLS_CRD_PSK, psk_cred)
                 : gnutls_credentials_set(p->session, GNUTLS_CRD_CERTIFICATE, x509_cred);
  if (r < 0) {
    log_error("%s: TLS: %s", peer, gnutls_strerror(r));
    goto fail;
  }
  if (srv.tls_verify_peer && !psk_cred)
    gnutls_certificate_server_set_request(p->session, GNUTLS_CERT_REQUIRE);
  gnutls_transport_set_int(p->session, net);

  g_mutex_lock(&pumps.lock);
  if (pumps.stopping) {
    g_mutex_unlock(&pumps.lock);
    goto fail;
  }
  p->link.data = p;
  g_queue_push_tail_link(&pumps.list, &p->link);
  g_mutex_unlock(&pumps.lock);

  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, PUMP_STACK);
  r = pthread_create(&t, &attr, pump_main, p);
  pthread_attr_destroy(&attr);
  if (r != 0) {
    log_error("%s: cannot start a TLS thread: %s", peer, g_strerror(r));
    g_mutex_lock(&pumps.lock);
    g_queue_unlink(&pumps.list, &p->link);
    g_mutex_unlock(&pumps.lock);
    goto fail;
  }
  return sv[0];

fail:
  if (p->session)
    gnutls_deinit(p->session);
  close(net);
  close(sv[0]);
  close(sv[1]);
  g_free(p);
  return -1;
}

void
tls_stop_all(void)
{
  g_mutex_lock(&pumps.lock);
  pumps.stopping = true;
  for (GList *l = pumps.list.head; l; l = l->next) {
    struct pump *p = l->data;
    shutdown(p->net, SHUT_RDWR);
    shutdown(p->local, SHUT_RDWR);
  }
  while (!g_queue_is_empty(&pumps.list))
    g_cond_wait(&pumps.cond, &pumps.lock);
  g_mutex_unlock(&pumps.lock);
}
