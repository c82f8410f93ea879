"""Connects through the relay's MySQL listener with mysqlclient (MySQLdb) 1.4, as Debian 12
ships it, and the settings that README.md documents for it: the `ssl` dictionary, and an option
file that turns on the server certificate's name check (1.4 has no `ssl_mode`). Logs in as
`app`, runs one query and prints its result.

Usage (in a directory holding ca.pem, client-alice.pem, client-alice-key.pem and postern.cnf):
    python3 mysqlclient_connect.py HOST PORT PASSWORD [plain]
`plain` connects without TLS. Exit status 0 with the result on stdout, or 1 with the driver's
error on stderr.
"""
import sys

import MySQLdb

host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plain = sys.argv[4:] == ["plain"]
tls = {} if plain else dict(
    ssl={"ca": "ca.pem", "cert": "client-alice.pem", "key": "client-alice-key.pem"},
    read_default_file="postern.cnf",
)
try:
    conn = MySQLdb.connect(host=host, port=port, user="app", passwd=password, db="shop", **tls)
    cur = conn.cursor()
    cur.execute("SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), %s * 7)", (6,))
    (result,) = cur.fetchone()
    conn.close()
except Exception as e:  # the driver's own error, for the caller to read
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
print(result)
