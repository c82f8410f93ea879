//! Real HTTP middleboxes from Debian's packages, started per test on ephemeral ports: nginx as
//! the TLS-terminating router in front of relays (as Cloud Foundry's router is), and tinyproxy as
//! a corporate forward proxy that only allows HTTP CONNECT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::mariadb::free_port;

/// How nginx picks a relay for a request.
pub struct Upstreams {
    /// Relays' plain-HTTP addresses, by instance index.
    pub relays: Vec<SocketAddr>,
    /// The app GUID that `X-Cf-App-Instance: GUID:INDEX` pins to (as the platform router does).
    pub app_guid: Option<String>,
}

/// A running nginx. Killed on drop.
pub struct Nginx {
    /// The HTTPS port.
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
    conf: PathBuf,
}

impl Nginx {
    /// Starts nginx terminating TLS with `cert`/`key` and proxying WebSocket upgrades to the relays.
    pub async fn start(cert: &Path, key: &Path, up: Upstreams) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-nginx")
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join("nginx.conf");
        let port = free_port();
        std::fs::write(&conf, config(dir.path(), port, cert, key, &up)).expect("write nginx.conf");
        let mut me = Self {
            addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            child: None,
            dir,
            conf,
        };
        me.spawn().await;
        me
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("stderr.log")).expect("log");
        let child = Command::new(find_nginx())
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nginx (install nginx-light)");
        self.child = Some(child);
        wait_listening(self.addr, "nginx", &self.dir.path().join("error.log")).await;
    }

    /// Stops nginx abruptly and starts it again on the same port (cutting every connection).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// The process id (`master_process off`: the one process that serves).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills nginx at once, cutting every connection through it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_nginx() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("nginx not found: install nginx-light")
}

fn config(dir: &Path, port: u16, cert: &Path, key: &Path, up: &Upstreams) -> String {
    let d = dir.display();
    let servers: String = up
        .relays
        .iter()
        .map(|a| format!("        server {a};\n"))
        .collect();
    // Requests pinned with X-Cf-App-Instance go to that instance (400 for an unknown index,
    // as the platform router answers); others are balanced at random.
    let mut pins = String::new();
    if let Some(guid) = &up.app_guid {
        for (i, a) in up.relays.iter().enumerate() {
            pins.push_str(&format!("        \"{guid}:{i}\" {a};\n"));
        }
        pins.push_str(&format!(
            "        \"~^{guid}:\" unknown;\n        \"~.\" invalid;\n"
        ));
    }
    format!(
        r#"master_process off;
worker_processes 1;
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
    map $http_x_cf_app_instance $pinned {{
        default "";
{pins}    }}
    upstream relays {{
        random;
{servers}    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            if ($pinned = unknown) {{ add_header X-Cf-Routererror unknown_route always; return 400; }}
            if ($pinned = invalid) {{ add_header X-Cf-Routererror invalid_cf_app_instance_header always; return 400; }}
            set $target relays;
            if ($pinned != "") {{ set $target $pinned; }}
            proxy_pass http://$target;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

/// A running tinyproxy that allows only CONNECT. Killed on drop.
pub struct Tinyproxy {
    /// Where clients send CONNECT.
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy, requiring basic auth when `auth` is given.
    pub async fn start(auth: Option<(&str, &str)>) -> Self {
        Self::start_with(auth, "").await
    }

    /// [`start`](Self::start) with more lines for its config, e.g. `ConnectPort 443` (CONNECT
    /// to other ports is then refused with 403).
    pub async fn start_with(auth: Option<(&str, &str)>, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-tinyproxy")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let d = dir.path().display();
        let mut conf = format!(
            "User root\nGroup root\nPort {port}\nListen 127.0.0.1\nTimeout 3600\nLogFile \"{d}/tinyproxy.log\"\nLogLevel Info\nPidFile \"{d}/tinyproxy.pid\"\nMaxClients 200\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
        );
        if let Some((user, pass)) = auth {
            conf.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        conf.push_str(extra);
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf).expect("write tinyproxy.conf");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("log"))
            .spawn()
            .expect("spawn tinyproxy (install tinyproxy)");
        let addr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_listening(addr, "tinyproxy", &dir.path().join("tinyproxy.log")).await;
        Self { addr, child, dir }
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_listening(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
