#!/usr/bin/env python3
"""moat soak: a mixed load for a bounded time, on loopback only, while the policy is saved
every few seconds and a container's overrides change. Reports failed requests, RSS and open
descriptors over time, and exits non-zero when a request the policy allowed failed or RSS or
descriptors did not come back to their starting level.

    python3 bench/soak.py MOAT_BINARY SECONDS

Load (one thread each, keep-alive, each connection renewed every 200 requests):
  plain      egress to a loopback upstream (allowedHosts)
  https      intercepted HTTPS (CONNECT + TLS with moat's CA), answered by a handler
  kv         a handler that writes and reads env.KV
  websocket  an upgrade relayed to the upstream's echo, a few frames, then closed
"""

import base64
import hashlib
import http.client
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MOAT, SECONDS = sys.argv[1], float(sys.argv[2])
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are written separately: without this, every answer waits for a delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.headers.get("upgrade", "").lower() == "websocket":
            return self.websocket()
        body = b"upstream " + self.path.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1(self.headers["sec-websocket-key"].encode() + WS_GUID).digest())
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        # Echo each (small, masked) frame back unmasked, until a close frame.
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            self.wfile.write(bytes([0x80 | opcode, len(data)]) + data)
            self.wfile.flush()
            if opcode == 8:
                return


def policy(version):
    return f"""-- soak policy, save {version}
interceptHttps = true
allowedHosts = {{ "127.0.0.1", "kv.test", "tls.test" }}
outboundByHost = {{
  ["kv.test"] = function(request, env, ctx)
    local url = URL.new(request.url)
    if request.method == "PUT" then
      env.KV:put(url.pathname, request:text())
      return Response.new("stored")
    end
    return Response.new(env.KV:get(url.pathname) or "missing")
  end,
  ["tls.test"] = function(request) return Response.new("tls {version}") end,
}}
"""


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = {}
        self.failed = {}
        self.examples = []

    def count(self, kind, ok, why=""):
        with self.lock:
            d = self.ok if ok else self.failed
            d[kind] = d.get(kind, 0) + 1
            if not ok and len(self.examples) < 20:
                self.examples.append(f"{kind}: {why}")


def proxy_conn(proxy):
    return http.client.HTTPConnection(*proxy, timeout=30)


def plain(proxy, up, stats, stop):
    while not stop.is_set():
        c = proxy_conn(proxy)
        for i in range(200):
            if stop.is_set():
                break
            try:
                c.request("GET", f"http://127.0.0.1:{up}/p{i}", headers={"proxy-authorization": auth("soak")})
                r = c.getresponse()
                body = r.read()
                stats.count("plain", r.status == 200 and body == f"upstream /p{i}".encode(), f"{r.status} {body[:80]!r}")
            except Exception as e:
                stats.count("plain", False, repr(e))
                break
        c.close()


def auth(container):
    return "Basic " + base64.b64encode(f"{container}:".encode()).decode()


def https(proxy, ca, stats, stop):
    ctx = ssl.create_default_context(cafile=ca)
    while not stop.is_set():
        c = http.client.HTTPSConnection(*proxy, timeout=30, context=ctx)
        c.set_tunnel("tls.test", 443, headers={"proxy-authorization": auth("soak")})
        for i in range(200):
            if stop.is_set():
                break
            try:
                c.request("GET", f"/s{i}")
                r = c.getresponse()
                body = r.read()
                stats.count("https", r.status == 200 and body.startswith(b"tls "), f"{r.status} {body[:80]!r}")
            except Exception as e:
                stats.count("https", False, repr(e))
                break
        c.close()


def kv(proxy, stats, stop):
    n = 0
    while not stop.is_set():
        c = proxy_conn(proxy)
        for _ in range(100):
            if stop.is_set():
                break
            n += 1
            key, value = f"/k{n % 500}", f"value {n}"
            try:
                hdr = {"proxy-authorization": auth("soak")}
                c.request("PUT", f"http://kv.test{key}", body=value, headers=hdr)
                r = c.getresponse()
                r.read()
                c.request("GET", f"http://kv.test{key}", headers=hdr)
                g = c.getresponse()
                body = g.read()
                stats.count("kv", r.status == 200 and g.status == 200 and body == value.encode(), f"{g.status} {body[:80]!r}")
            except Exception as e:
                stats.count("kv", False, repr(e))
                break
        c.close()


def websocket(proxy, up, stats, stop):
    while not stop.is_set():
        try:
            s = socket.create_connection(proxy, timeout=30)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(
                (
                    f"GET http://127.0.0.1:{up}/ws HTTP/1.1\r\nhost: 127.0.0.1:{up}\r\nupgrade: websocket\r\n"
                    f"connection: Upgrade\r\nsec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n"
                    f"proxy-authorization: {auth('soak')}\r\n\r\n"
                ).encode()
            )
            f = s.makefile("rb")
            status = f.readline()
            while f.readline() not in (b"\r\n", b""):
                pass
            good = status.startswith(b"HTTP/1.1 101")
            for i in range(5):
                msg = f"frame {i}".encode()
                mask = os.urandom(4)
                s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(msg)))
                head = f.read(2)
                good = good and len(head) == 2 and f.read(head[1] & 0x7F) == msg
            mask = os.urandom(4)
            s.sendall(bytes([0x88, 0x80]) + mask)
            f.read(2)
            s.close()
            stats.count("websocket", good, status.decode(errors="replace").strip())
        except Exception as e:
            stats.count("websocket", False, repr(e))
        time.sleep(0.05)


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return rss // 1024, len(os.listdir(f"/proc/{pid}/fd"))


def admin(sock_path, method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    data = body.encode() if body else b""
    s.sendall(
        f"{method} {path} HTTP/1.1\r\nhost: moat\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
        + data
    )
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return int(out.split(b" ", 2)[1])


def main():
    work = tempfile.mkdtemp(prefix="moat-soak-")
    up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    up.daemon_threads = True
    threading.Thread(target=up.serve_forever, daemon=True).start()
    up_port = up.server_address[1]
    pol = os.path.join(work, "policy.lua")
    with open(pol, "w") as f:
        f.write(policy(0))
    env = dict(os.environ, RUST_LOG="warn", MOAT_NO_DNS="1")
    moat = subprocess.Popen(
        [MOAT, "serve", "--listen", "127.0.0.1:0", "--policy", pol, "--data-dir", os.path.join(work, "data")],
        stdout=subprocess.PIPE,
        stderr=open(os.path.join(work, "moat.log"), "w"),
        env=env,
        text=True,
    )
    for line in moat.stdout:
        m = re.match(r"moat: listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            proxy = ("127.0.0.1", int(m.group(1)))
            break
    threading.Thread(target=lambda: [None for _ in moat.stdout], daemon=True).start()
    ca = os.path.join(work, "data", "ca.pem")
    sock = os.path.join(work, "data", "admin.sock")

    time.sleep(1)
    idle_rss, idle_fds = proc_sample(moat.pid)
    stats, stop = Stats(), threading.Event()
    loads = [
        threading.Thread(target=plain, args=(proxy, up_port, stats, stop)),
        threading.Thread(target=https, args=(proxy, ca, stats, stop)),
        threading.Thread(target=kv, args=(proxy, stats, stop)),
        threading.Thread(target=websocket, args=(proxy, up_port, stats, stop)),
    ]
    for t in loads:
        t.start()

    began = time.time()
    samples, saves, override_writes, admin_failures = [], 0, 0, 0
    start_level = None
    next_sample = began
    while time.time() - began < SECONDS:
        time.sleep(3)
        saves += 1
        # Alternately rewritten in place and replaced by a rename, as editors save.
        if saves % 2:
            with open(pol, "w") as f:
                f.write(policy(saves))
        else:
            with open(pol + ".tmp", "w") as f:
                f.write(policy(saves))
            os.replace(pol + ".tmp", pol)
        # The load's container: its own allowedHosts (a superset of what it uses), then none.
        hosts = f'["127.0.0.1", "kv.test", "tls.test", "extra-{saves}.test"]'
        code = admin(sock, "PUT", "/v1/containers/soak/allowed-hosts", hosts) if saves % 4 else admin(
            sock, "DELETE", "/v1/containers/soak/overrides"
        )
        override_writes += 1
        admin_failures += code != 200
        if time.time() >= next_sample:
            rss, fds = proc_sample(moat.pid)
            samples.append((int(time.time() - began), rss, fds))
            if start_level is None and time.time() - began >= 30:
                start_level = (rss, fds)
            next_sample += max(10, SECONDS / 30)
    stop.set()
    for t in loads:
        t.join()
    # Idle upstream connections are closed after 90 s (swept every 15 s): then moat holds the
    # descriptors it held before the load.
    settle = time.time()
    while time.time() - settle < 120:
        time.sleep(5)
        rss_end, fds_end = proc_sample(moat.pid)
        if fds_end <= idle_fds:
            break
    settled_after = time.time() - settle
    moat.terminate()
    moat.wait(timeout=60)

    print(f"soak: {SECONDS:.0f} s, {saves} policy saves, {override_writes} override writes ({admin_failures} failed)")
    for kind in ("plain", "https", "kv", "websocket"):
        print(f"  {kind:9} {stats.ok.get(kind, 0):8} ok  {stats.failed.get(kind, 0):4} failed")
    for e in stats.examples:
        print("  failure:", e)
    print("  t(s)  RSS(MiB)  fds")
    for t, rss, fds in samples:
        print(f"  {t:5} {rss:8} {fds:5}")
    start_level = start_level or samples[0][1:]
    print(f"  before the load: RSS {idle_rss} MiB, {idle_fds} fds; under load after 30 s: RSS {start_level[0]} MiB, "
          f"{start_level[1]} fds; {settled_after:.0f} s after the load ended: RSS {rss_end} MiB, {fds_end} fds")
    failed = sum(stats.failed.values()) + admin_failures
    grew = rss_end > start_level[0] * 1.25 + 8
    leaked = fds_end > idle_fds
    print(f"soak: {'FAILED' if failed or grew or leaked else 'ok'}: {failed} failed, "
          f"RSS {'grew' if grew else 'back to its level'}, descriptors {'leaked' if leaked else 'back to their level'}")
    sys.exit(1 if failed or grew or leaked else 0)


main()
