#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of an S3 server, for the tests.

    s3-fault-proxy.py UPSTREAM_PORT PORT_FILE CONTROL_FILE

Listens on a free port of 127.0.0.1 (written to PORT_FILE) and passes
every request through to 127.0.0.1:UPSTREAM_PORT unchanged, Host header
included (so AWS SigV4 signatures made for the proxy's address still
verify upstream).  CONTROL_FILE, read at each request, holds one rule:

    pass                   pass everything (also when the file is absent)
    fail-parts CODE NAME   answer every upload-part request (partNumber=
                           in the query) with HTTP CODE and S3 error NAME
    fail-parts-once CODE NAME
                           the same for the first such request only, then
                           pass
    stall-parts            read every upload-part request and answer
                           nothing while the rule is a stall (a stalled
                           store), then close the connection
    stall                  the same for every request
    inject KEY[=UPLOADID]...
                           pass, but add each KEY to every ListObjectsV2
                           answer (as a 1-byte object) and to every
                           ListMultipartUploads answer (with UPLOADID, or
                           a made-up id): a server, or someone between,
                           that answers with keys outside the prefix asked

Each injected failure is logged on stderr, and so is every DELETE that
reaches the server ("s3-fault-proxy: DELETE PATH -> STATUS"), so a test
can tell what a run deleted.  Runs until killed.
"""
import http.client
import http.server
import os
import socketserver
import sys
import threading
import time
import urllib.parse
from xml.sax.saxutils import escape

upstream_port = int(sys.argv[1])
port_file, control_file = sys.argv[2], sys.argv[3]
once_done = threading.Event()


def injected(r, command, path, status, data, headers):
    """The listing @data with the keys of rule @r added, or @data itself
    when the rule or the request is not of that kind."""
    if r[0] != "inject" or command != "GET" or status != 200:
        return data
    if any(k.lower() == "content-encoding" for k, _ in headers):
        return data
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query,
                                  keep_blank_values=True)
    keys = [a.split("=", 1) if "=" in a else [a, "cbt-test-proxy-made-up"] for a in r[1:]]
    if "list-type" in query:
        end = b"</ListBucketResult>"
        add = "".join("<Contents><Key>%s</Key><LastModified>2025-01-01T00:00:00.000Z"
                      "</LastModified><ETag>&quot;00000000000000000000000000000000"
                      "&quot;</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass>"
                      "</Contents>" % escape(urllib.parse.quote(k, safe="/"))
                      for k, _ in keys)
    elif "uploads" in query and "uploadId" not in query:
        end = b"</ListMultipartUploadsResult>"
        add = "".join("<Upload><Key>%s</Key><UploadId>%s</UploadId>"
                      "<StorageClass>STANDARD</StorageClass>"
                      "<Initiated>2025-01-01T00:00:00.000Z</Initiated></Upload>"
                      % (escape(urllib.parse.quote(k, safe="/")), escape(u))
                      for k, u in keys)
    else:
        return data
    at = data.rfind(end)
    if at < 0:
        return data
    print("s3-fault-proxy: %s %s -> injected %s" % (command, path, " ".join(r[1:])),
          file=sys.stderr, flush=True)
    return data[:at] + add.encode() + data[at:]


def rule():
    try:
        with open(control_file) as f:
            return f.read().split()
    except OSError:
        return ["pass"]


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def handle_one(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        r = rule()
        if r[0] == "stall" or (r[0] == "stall-parts" and "partNumber=" in self.path):
            print("s3-fault-proxy: %s %s -> stalled" % (self.command, self.path),
                  file=sys.stderr, flush=True)
            while rule()[0] in ("stall", "stall-parts"):
                time.sleep(0.2)
            self.close_connection = True
            return
        if "partNumber=" in self.path and r[0] in ("fail-parts", "fail-parts-once"):
            if r[0] == "fail-parts" or not once_done.is_set():
                once_done.set()
                code, name = int(r[1]), r[2]
                msg = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>%s</Code>"
                       "<Message>injected by the test proxy</Message></Error>" % name).encode()
                print("s3-fault-proxy: %s %s -> %d %s" % (self.command, self.path, code, name),
                      file=sys.stderr, flush=True)
                self.send_response(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
        conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("expect", "connection")}
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = injected(r, self.command, self.path, resp.status, resp.read(),
                        resp.getheaders())
        if self.command == "DELETE":
            print("s3-fault-proxy: DELETE %s -> %d" % (self.path, resp.status),
                  file=sys.stderr, flush=True)
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        if self.command != "HEAD" or data:
            self.send_header("Content-Length", str(len(data)))
        else:
            cl = resp.getheader("Content-Length")
            if cl is not None:
                self.send_header("Content-Length", cl)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


srv = Server(("127.0.0.1", 0), Proxy)
tmp = port_file + ".tmp"
with open(tmp, "w") as f:
    f.write("%d\n" % srv.server_address[1])
os.rename(tmp, port_file)
srv.serve_forever()
