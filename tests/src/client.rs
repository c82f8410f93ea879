//! Clients as tests run them: the stock `mariadb` and `mysqldump` programs, the mysql_async
//! driver with a client identity, a raw TLS-first client, a raw QUIC session, and a first-packet
//! probe.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;

use mysql_async::{ClientIdentity, OptsBuilder, SslOpts};
use tokio::io::AsyncReadExt;

use crate::TestPki;
use crate::mariadb::find;

/// A MariaDB client program aimed at `127.0.0.1:PORT` over TCP (`--no-defaults`), as root
/// without TLS unless told otherwise.
#[derive(Debug, Clone)]
pub struct Cli {
    program: String,
    port: u16,
    user: String,
    args: Vec<String>,
}

impl Cli {
    /// `mariadb` at `port` as root.
    pub fn at(port: u16) -> Self {
        Self {
            program: "mariadb".into(),
            port,
            user: "root".into(),
            args: Vec::new(),
        }
    }

    /// Another MariaDB program (e.g. `mysqldump`) with the same options.
    pub fn program(mut self, program: &str) -> Self {
        self.program = program.into();
        self
    }

    /// Logs in as `user`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = user.into();
        self
    }

    /// With `--password=PASSWORD`.
    pub fn password(self, password: &str) -> Self {
        self.arg(&format!("--password={password}"))
    }

    /// With TLS that verifies the relay by name against the CA of `pki`, presenting certificate
    /// `cert` (a base name such as `client-alice`) if given.
    pub fn tls(mut self, pki: &TestPki, cert: Option<&str>) -> Self {
        self.args.extend(ssl_args(pki, cert));
        self
    }

    /// With one more option.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The command line, to add arguments or standard input.
    pub fn command(&self) -> Command {
        let mut c = Command::new(find(&self.program));
        c.args(["--no-defaults", "-h", "127.0.0.1", "--protocol=TCP"])
            .arg(format!("-P{}", self.port))
            .arg(format!("-u{}", self.user))
            .args(&self.args);
        c
    }

    /// Runs `sql` in batch mode (tab-separated, no column names).
    pub fn sql(&self, sql: &str) -> Output {
        self.command()
            .args(["--batch", "--skip-column-names", "-e", sql])
            .output()
            .expect("run the mariadb client")
    }

    /// Runs `sql` and returns its output, or the client's error text.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let out = self.sql(sql);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// [`query`](Self::query) off the async runtime's threads.
    pub async fn query_async(&self, sql: &str) -> Result<String, String> {
        let (cli, sql) = (self.clone(), sql.to_owned());
        tokio::task::spawn_blocking(move || cli.query(&sql))
            .await
            .map_err(|e| e.to_string())?
    }

    /// The output of `sql`, which must succeed.
    pub fn ok(&self, sql: &str) -> String {
        ok(&self.sql(sql))
    }

    /// The error text of `sql`, which must fail.
    pub fn fails(&self, sql: &str) -> String {
        failed(&self.sql(sql))
    }
}

/// `--ssl-*` options that verify the relay by name and present certificate `cert`, if any.
pub fn ssl_args(pki: &TestPki, cert: Option<&str>) -> Vec<String> {
    let mut args = vec![
        format!("--ssl-ca={}", pki.ca().display()),
        "--ssl-verify-server-cert".to_owned(),
    ];
    if let Some(base) = cert {
        let (cert, key) = pki.files(base);
        args.push(format!("--ssl-cert={}", cert.display()));
        args.push(format!("--ssl-key={}", key.display()));
    }
    args
}

/// The standard output of a run that must have succeeded.
pub fn ok(out: &Output) -> String {
    String::from_utf8_lossy(&ok_bytes(out)).into_owned()
}

/// The standard output of a run that must have succeeded, as bytes.
pub fn ok_bytes(out: &Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout.clone()
}

/// The standard error of a run that must have failed.
pub fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "client succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// mysql_async options for `user` at `127.0.0.1:port`, verifying the relay's certificate
/// against the CA of `pki` and presenting certificate `cert` (a base name). With
/// `prefer_socket` off: mysql_async would otherwise ask the (local) database for its Unix socket
/// and move the connection there, out of the tunnel.
pub fn driver_opts(pki: &TestPki, port: u16, cert: &str, user: &str, pass: &str) -> OptsBuilder {
    let (cert, key) = pki.files(cert);
    let ssl = SslOpts::default()
        .with_root_certs(vec![pki.ca().into()])
        .with_disable_built_in_roots(true)
        .with_client_identity(Some(ClientIdentity::new(cert.into(), key.into())));
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(pass))
        .db_name(Some("mysql"))
        .prefer_socket(false)
        .ssl_opts(ssl)
}

/// `COM_CHANGE_USER` to `user` with `password`.
pub async fn change_user(
    conn: &mut mysql_async::Conn,
    user: &str,
    password: &str,
) -> Result<(), mysql_async::Error> {
    conn.change_user(
        mysql_async::ChangeUserOpts::default()
            .with_user(Some(user.into()))
            .with_pass(Some(password.into())),
    )
    .await
}

/// `COM_CHANGE_USER` to `user`, which the policy of `service` must refuse with a 1045 that
/// names the service and the user.
pub async fn change_user_refused(
    conn: &mut mysql_async::Conn,
    service: &str,
    user: &str,
    password: &str,
) {
    let err = change_user(conn, user, password)
        .await
        .expect_err("change to a user outside the policy");
    let text = err.to_string();
    assert!(
        text.contains("1045")
            && text.contains(&format!(
                "may not log in to service \"{service}\" as MySQL user \"{user}\""
            )),
        "{text}"
    );
}

/// What the database shows as connection attribute `postern_client` of this session.
pub async fn postern_client_attribute(conn: &mut mysql_async::Conn) -> Option<String> {
    use mysql_async::prelude::Queryable;
    conn.query_first(POSTERN_CLIENT_ATTRIBUTE)
        .await
        .expect("read session_connect_attrs")
}

/// SQL that reads connection attribute `postern_client` of the current session.
pub const POSTERN_CLIENT_ATTRIBUTE: &str = "SELECT ATTR_VALUE FROM performance_schema.session_connect_attrs \
     WHERE PROCESSLIST_ID = CONNECTION_ID() AND ATTR_NAME = 'postern_client'";

/// Connects to `addr` and returns the server's first MySQL packet, or the error a client sees.
pub async fn first_packet(addr: SocketAddr) -> Result<Vec<u8>, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    read_packet(&mut s).await
}

/// Whether `p` is a MySQL greeting (protocol 10).
pub fn is_greeting(p: &Result<Vec<u8>, String>) -> bool {
    matches!(p, Ok(b) if b.first() == Some(&10))
}

/// The message of an ERR packet.
pub fn err_text(p: &Result<Vec<u8>, String>) -> Option<String> {
    match p {
        Ok(b) if b.first() == Some(&0xff) && b.len() > 9 => {
            Some(String::from_utf8_lossy(&b[9..]).into_owned())
        }
        _ => None,
    }
}

/// A TLS connection to a TLS-first listener at `addr`, verifying the relay as `localhost`
/// against the CA of `pki`, presenting `material` (or no client certificate).
pub async fn tls_first(
    pki: &TestPki,
    addr: SocketAddr,
    material: Option<postern_common::tls::Material>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let cfg = match material {
        Some(m) => postern_common::tls::listener_client(&m).map_err(|e| e.to_string())?,
        None => rustls::ClientConfig::builder_with_provider(postern_common::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(pki.material("server-relay").roots)
            .with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    connector
        .connect("localhost".try_into().expect("server name"), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// The first MySQL packet through a TLS-first listener (see [`tls_first`]), or the error.
pub async fn tls_first_packet(
    pki: &TestPki,
    addr: SocketAddr,
    material: Option<postern_common::tls::Material>,
) -> Result<Vec<u8>, String> {
    let mut conn = tls_first(pki, addr, material).await?;
    read_packet(&mut conn).await
}

/// A raw QUIC session with the relay at `relay` using certificate `base` of `pki`, for tests
/// that play a misbehaving peer or need a stream without `connect`.
pub async fn raw_session(pki: &TestPki, base: &str, relay: SocketAddr) -> quinn::Connection {
    let material = pki.material(base);
    let ep = postern_common::transport::quic::client(
        relay,
        &material,
        postern_common::transport::Liveness::AGENT,
    )
    .unwrap();
    ep.endpoint()
        .connect(relay, "localhost")
        .unwrap()
        .await
        .expect("tls handshake with the relay")
}

/// Opens a stream on a raw QUIC session with `open` and returns the peer's answer, with the
/// stream (after an `Ok`, what follows is the service's).
pub async fn open_raw(
    conn: &quinn::Connection,
    open: &postern_common::protocol::Open,
) -> (
    postern_common::protocol::Answer,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
    postern_common::wire::write_first(&mut send, open)
        .await
        .expect("send the open");
    let answer = postern_common::wire::read_first(&mut recv)
        .await
        .expect("an answer");
    (answer, send, recv)
}

/// Reads one MySQL packet (header and payload).
/// Reads one MySQL packet (its payload), or the error a client would see.
pub async fn read_packet<R: tokio::io::AsyncRead + Unpin>(io: &mut R) -> Result<Vec<u8>, String> {
    let mut head = [0u8; 4];
    io.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(body)
}
