"""Connects through the relay's MySQL listener with PyMySQL and the SSL context that README.md
documents, logs in as `app`, runs one query and prints its result.

Usage (in a directory holding ca.pem, client-alice.pem, client-alice-key.pem):
    python3 pymysql_connect.py HOST PORT PASSWORD [plain]
`plain` connects without TLS. Exit status 0 with the result on stdout, or 1 with the driver's
error on stderr.
"""
import ssl
import sys

import pymysql

host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plain = sys.argv[4:] == ["plain"]
ctx = ssl.create_default_context(cafile="ca.pem")
ctx.load_cert_chain("client-alice.pem", "client-alice-key.pem")
tls = {} if plain else dict(ssl=ctx)
try:
    conn = pymysql.connect(host=host, port=port, user="app", password=password, database="shop",
                           **tls)
    with conn.cursor() as cur:
        cur.execute("SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), %s * 7)", (6,))
        (result,) = cur.fetchone()
    conn.close()
except Exception as e:  # the driver's own error, for the caller to read
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
print(result)
