#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/).

MySQL seeds are captured from real traffic: a recording proxy on an ephemeral port forwards to a
MariaDB server (MYSQL_HOST/MYSQL_PORT, default 127.0.0.1:3306), and the `mariadb` client (with
and without TLS) and PyMySQL log in and run a query through it. Tunnel control frames are the
messages a relay and an agent exchange, written as they go on the wire (length + JSON).

Usage: python3 fuzz/seeds/capture.py   (from the project root; needs `mariadb` and PyMySQL)
"""
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
HOST = os.environ.get("MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("MYSQL_PORT", "3306"))


def save(target, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def packets(stream):
    """(seq, payload) of each whole packet at the front of stream (single-part packets)."""
    out, at = [], 0
    while at + 4 <= len(stream):
        n = int.from_bytes(stream[at:at + 3], "little")
        if at + 4 + n > len(stream):
            break
        out.append((stream[at + 3], stream[at + 4:at + 4 + n]))
        at += 4 + n
    return out


def record(run):
    """Runs run(port) against a proxy to the server; returns (client bytes, server bytes)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    port = lst.getsockname()[1]
    got = {"c": bytearray(), "s": bytearray()}

    def pump(src, dst, key):
        while True:
            try:
                b = src.recv(65536)
            except OSError:
                b = b""
            if not b:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            got[key] += b
            dst.sendall(b)

    def serve():
        c, _ = lst.accept()
        s = socket.create_connection((HOST, PORT))
        t = threading.Thread(target=pump, args=(s, c, "s"))
        t.start()
        pump(c, s, "c")
        t.join()
        c.close()
        s.close()

    th = threading.Thread(target=serve)
    th.start()
    run(port)
    th.join(timeout=30)
    lst.close()
    return bytes(got["c"]), bytes(got["s"])


def cli(*extra):
    def run(port):
        subprocess.run(["mariadb", "-h", "127.0.0.1", "-P", str(port), "-u", "root", *extra,
                        "-e", "SELECT 1, @@version, REPEAT('x', 300)"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    return run


def pymysql_run(port):
    import pymysql
    c = pymysql.connect(host="127.0.0.1", port=port, user="root", database="mysql",
                        program_name="seed")
    with c.cursor() as cur:
        cur.execute("SELECT user, host FROM user LIMIT 3")
        cur.fetchall()
    c.close()


def mysql_seeds():
    for run, tls in [(cli("--skip-ssl"), False), (cli("--ssl"), True), (pymysql_run, False)]:
        client, server = record(run)
        # The whole server stream, and the client's packets before TLS, for the packet reader.
        save("mysql_packets", bytes([4]) + server)
        save("mysql_packets", bytes([8]) + server[:4096])
        sp = packets(server)
        cp = packets(client)
        if sp:
            save("mysql_handshake", bytes([0]) + sp[0][1])
        if cp:
            first = cp[0][1]
            if tls and len(first) == 32:
                save("mysql_handshake", bytes([1]) + first)
            else:
                save("mysql_handshake", bytes([2]) + first)
                save("mysql_packets", bytes([4]) + client)
                # The SSLRequest this client would send first: the response's fixed 32 bytes
                # with CLIENT_SSL set (the server may have TLS off).
                if len(first) >= 32:
                    caps = int.from_bytes(first[:4], "little") | 0x800
                    save("mysql_handshake", bytes([1]) + caps.to_bytes(4, "little") + first[4:32])


def frame(msg):
    body = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def tunnel_seeds():
    control = [
        {"type": "hello", "versions": [1], "services": ["billing", "orders"],
         "software": "postern-agent 0.1.0", "take_over": False, "features": ["probe", "backends", "users"]},
        {"type": "welcome", "version": 1, "relay_instance": "relay-0", "accepted": ["billing"],
         "rejected": [{"service": "orders", "reason": "not in this relay's configuration"}],
         "heartbeat_ms": 1000, "instance_index": 0, "features": ["probe"]},
        {"type": "refused", "code": "unsupported_version", "message": "no common version"},
        {"type": "heartbeat", "seq": 42},
        {"type": "drain", "reason": "relay relay-0 is shutting down", "grace_ms": 30000},
        {"type": "state", "services": []},
    ]
    opens = [
        {"type": "open", "service": "billing", "client": "postern://client/alice",
         "client_addr": "10.0.0.7:50112", "conn_id": 7},
        {"type": "open", "service": "billing", "conn_id": 8, "pre_auth": True, "node": "db2", "term": 3},
    ]
    answers = [
        {"type": "ok", "backend": "10.0.0.5:3306"},
        {"type": "refused", "code": "backend_unavailable", "message": "no healthy node"},
    ]
    # The target's first byte picks the message type: 0 control, 1 open, 2 answer.
    save("tunnel_frames", bytes([0]) + b"".join(frame(m) for m in control))
    for m in control:
        save("tunnel_frames", bytes([0]) + frame(m))
    for m in opens:
        save("tunnel_frames", bytes([1]) + frame(m))
    for m in answers:
        save("tunnel_frames", bytes([2]) + frame(m))
    save("tunnel_frames", bytes([0]) + frame(control[0])[:10])


def proxy_seeds():
    # Raw bytes: the target takes its fields from them (arbitrary's format), so these only give
    # it the characters proxy settings are made of.
    for text in [b"\x01alice\x08Secr3tPw\x16proxy.internal:3128\x1b.internal,10.0.0.0/8,[::1]:443",
                 b"http://bob:p%40ss@[2001:db8::1]:8080/",
                 b"proxy.example.com:3128\x00*.example.com, localhost"]:
        save("proxy_settings", text)


if __name__ == "__main__":
    tunnel_seeds()
    proxy_seeds()
    mysql_seeds()
    for t in sorted(os.listdir(ROOT)):
        print(t, len(os.listdir(os.path.join(ROOT, t))), "seeds")
