// Connects through the relay's MySQL listener with mysql2 and the `ssl` options that README.md
// documents, logs in as `app`, runs one query and prints its result.
//
// Usage (in a directory holding ca.pem, client-alice.pem, client-alice-key.pem):
//   node connect.js HOST PORT PASSWORD [plain]
// `plain` connects without TLS. Exit status 0 with the result on stdout, or 1 with the driver's
// error on stderr.
"use strict";
const fs = require("fs");
const mysql = require("mysql2");

const [host, port, password, mode] = process.argv.slice(2);
const tls = {ssl: {ca: fs.readFileSync("ca.pem"), cert: fs.readFileSync("client-alice.pem"), key: fs.readFileSync("client-alice-key.pem"), verifyIdentity: true}};
const options = {host, port: Number(port), user: "app", password, database: "shop", ...(mode === "plain" ? {} : tls)};
const conn = mysql.createConnection(options);
conn.query("SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), 6 * 7) AS result", (err, rows) => {
  if (err) {
    console.error(`${err.code}: ${err.message}`);
    process.exit(1);
  }
  console.log(rows[0].result);
  conn.end();
});
