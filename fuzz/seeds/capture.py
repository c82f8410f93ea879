#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/).

MySQL seeds are captured from real traffic: a recording proxy on an ephemeral port forwards to a
MariaDB server (MYSQL_HOST/MYSQL_PORT, default 127.0.0.1:3306), and the `mariadb` client (with
and without TLS) and PyMySQL log in and run a query through it. Tunnel control frames are the
messages a relay and an agent exchange, written as they go on the wire (length + JSON).

Certificate seeds are real files from `postern-relay certs` (target/release or debug, built
first); the WebSocket, yamux and CONNECT-answer seeds are encoded here as the protocols define
them, with the answers tinyproxy gives.

Usage: python3 fuzz/seeds/capture.py   (from the project root; needs `mariadb` and PyMySQL)
"""
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import tempfile
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


# The header of the command_watch, websocket_frames and yamux_headers inputs: flags, a, b,
# room (u16 each, little endian), the count of cut offsets, then the offsets.
def header(flags=0, a=0, b=0, room=0, cuts=()):
    return struct.pack("<BHHHB", flags, a, b, room, len(cuts)) + b"".join(
        struct.pack("<H", c) for c in cuts)


def command_seeds():
    """The client's command-phase stream of real sessions (after its handshake response), and
    the commands the watcher holds back: COM_CHANGE_USER, KILL and COM_PROCESS_KILL."""
    for run in [cli("--skip-ssl"), pymysql_run]:
        client, _ = record(run)
        cp = packets(client)
        if len(cp) > 1:
            first = 4 + len(cp[0][1])
            save("command_watch", header(1) + client[first:])
            save("command_watch", header(0, cuts=(1, 5, 9)) + client[first:])
    def pkt(seq, payload):
        return len(payload).to_bytes(3, "little") + bytes([seq]) + payload
    change_user = bytes([0x11]) + b"app\0" + bytes([20]) + b"x" * 20 + b"shop\0" + b"\x21\x00"
    for stream in [pkt(0, b"\x03KILL QUERY 2147483650") + pkt(0, b"\x0e"),
                   pkt(0, b"\x0c" + (2147483651).to_bytes(4, "little")),
                   pkt(0, change_user) + pkt(3, b"\x00" * 20) + pkt(0, b"\x01")]:
        save("command_watch", header(1) + stream)
        save("command_watch", header(3, a=40) + stream)


def auth_seeds():
    """Real logins as the login relay sees them: the client's handshake response, then the
    packets of both sides in the order they were sent (by sequence id) up to the server's OK or
    ERR. The flags byte carries the response's sequence id in its high nibble."""
    def pkt(seq, payload):
        return len(payload).to_bytes(3, "little") + bytes([seq]) + payload
    for run in [cli("--skip-ssl"), pymysql_run]:
        client, server = record(run)
        cp, sp = packets(client), packets(server)
        if not cp or not sp:
            continue
        seq, response = cp[0]
        # Until the command phase: the client's next packets start again at 0.
        cut = next((i for i, p in enumerate(cp[1:]) if p[0] == 0), len(cp) - 1)
        later = cp[1:1 + cut]
        turns = sorted([p for p in sp[1:] if p[0] > seq] + later, key=lambda p: p[0])
        end = next((i + 1 for i, p in enumerate(turns) if p[1][:1] in (b"\x00", b"\xff")), len(turns))
        save("auth_relay", bytes([seq << 4]) + pkt(seq, response)
             + b"".join(pkt(q, p) for q, p in turns[:end]))
        # The handover: the database's own greeting after the response.
        save("auth_relay", bytes([(seq << 4) | 4]) + pkt(seq, response) + pkt(0, sp[0][1])
             + b"".join(pkt(q, p) for q, p in turns[:end]))


def config_seeds():
    """The commented examples in config-examples/, naming the files the config_yaml target
    keeps next to the config (ca.pem, relay.pem, agent.pem and their keys, api-password)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "config-examples")
    names = [("/etc/postern/", ""), ("server-relay", "relay"), ("agent-db-host-1", "agent"),
             ("server-reports", "relay"), ("admin-password", "api-password"),
             ("monitor-password", "api-password")]
    for mode, name in [(0, "relay.yaml"), (1, "agent.yaml")]:
        with open(os.path.join(root, name), "rb") as f:
            text = f.read().decode()
        for old, new in names:
            text = text.replace(old, new)
        save("config_yaml", bytes([mode]) + text.encode())
        if mode == 0:
            api = text.replace("# api:\n#   username: admin\n#   password_file: api-password",
                               "api:\n  username: admin\n  password_file: api-password")
            save("config_yaml", bytes([mode]) + api.encode())


def ws_frame(opcode, payload, mask=None, fin=True):
    """One RFC 6455 frame."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 65536:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        head += mask
    return head + payload


def websocket_seeds():
    mask = b"\x37\xfa\x21\x3d"
    data = os.urandom(300)
    # What a server reads from a client (masked) and a client from a server (not masked).
    for flags, m in [(1, mask), (0, None)]:
        save("websocket_frames", header(flags, room=64) + ws_frame(2, data, m)
             + ws_frame(9, b"ping", m) + ws_frame(10, b"", m)
             + ws_frame(2, data[:10], m, fin=False) + ws_frame(0, data[10:], m)
             + ws_frame(8, struct.pack(">H", 1000) + b"bye", m))
        # The 16- and 64-bit length forms, cut short (what has arrived of a large frame).
        save("websocket_frames", header(flags, cuts=(1, 2, 3, 200)) + ws_frame(2, os.urandom(70000), m)[:600])
        save("websocket_frames", header(flags, room=7) + ws_frame(2, os.urandom(1000), m)[:500])
        save("websocket_frames", header(flags | 2, a=100, b=150) + ws_frame(2, data[:120], m))


def yamux_frame(kind, flags, stream, length, body=b""):
    return struct.pack(">BBHII", 0, kind, flags, stream, length) + body


def yamux_seeds():
    body = os.urandom(100)
    save("yamux_headers", header(cuts=(3, 12, 50)) + yamux_frame(1, 1, 1, 262144)
         + yamux_frame(0, 0, 1, len(body), body) + yamux_frame(2, 1, 0, 7)
         + yamux_frame(0, 8, 1, 0) + yamux_frame(1, 4, 3, 0) + yamux_frame(3, 0, 0, 0))


def answer_seeds():
    for text in [b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n\x16\x03\x01",
                 b"HTTP/1.0 407 Proxy Authentication Required\r\nServer: tinyproxy/1.11.1\r\n"
                 b"Proxy-Authenticate: Basic realm=\"tinyproxy\"\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.0 403 Access violation\r\nServer: tinyproxy/1.11.1\r\nContent-Type: text/html\r\n\r\n<html>",
                 b"HTTP/1.1 200 OK\r\n\r\n"]:
        save("connect_answer", text)


def certificate_seeds():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    relay = next((p for p in (os.path.join(root, "target", b, "postern-relay")
                              for b in ("release", "debug")) if os.path.exists(p)), None)
    if relay is None:
        print("no postern-relay built: no certificate seeds")
        return
    with tempfile.TemporaryDirectory() as d:
        def run(*args):
            subprocess.run([relay, "certs", *args, "--dir", d], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run("init")
        run("issue", "client", "alice")
        run("issue", "agent", "db1")
        run("revoke", os.path.join(d, "client-alice.pem"))
        def read(name):
            with open(os.path.join(d, name), "rb") as f:
                return f.read()
        def der(pem):
            body = b"".join(l for l in pem.splitlines() if l and not l.startswith(b"-----"))
            return base64.b64decode(body)
        ca, alice, alice_key = read("ca.pem"), read("client-alice.pem"), read("client-alice-key.pem")
        save("certificates", b"\x00" + ca + b"\0" + alice + b"\0" + alice_key)
        save("certificates", b"\x01" + ca + b"\0" + read("ca-key.pem") + b"\0" + read("crl.pem"))
        save("certificates", b"\x02" + der(alice))
        save("certificates", b"\x03" + der(read("agent-db1.pem")))
        save("certificates", b"\x02" + der(ca))


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
    command_seeds()
    auth_seeds()
    websocket_seeds()
    yamux_seeds()
    answer_seeds()
    certificate_seeds()
    config_seeds()
    for t in sorted(os.listdir(ROOT)):
        print(t, len(os.listdir(os.path.join(ROOT, t))), "seeds")
