//! Per-binding database users: the relay asks the agent (which holds the admin credential) to
//! create a MySQL user for a binding, with the grants of the agent's own config, and to drop
//! it; a real `mariadbd`, a real relay and agent, and logins both straight to the database and
//! through the relay's MySQL listener with a client certificate.

use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};
use postern_common::pki::Kind;
use postern_common::protocol::{Code, binding_username};
use postern_tests::client::driver_opts;
use postern_tests::config::AgentUsers;
use postern_tests::*;

/// The admin user the agent logs in as.
const ADMIN: &str = "postern_admin";
/// A binding id as a platform sends it.
const BINDING: &str = "6d9e4a30-0f5e-4d7c-9b1e-2a8f7c3d1e00";

/// MySQL's "access denied for user" (a wrong password, or no such user).
const ER_ACCESS_DENIED: u16 = 1045;
/// "access denied for user to database".
const ER_DBACCESS_DENIED: u16 = 1044;
/// "command denied to user for table".
const ER_TABLEACCESS_DENIED: u16 = 1142;

/// A MariaDB with the admin user (password in a file next to its data) and the databases the
/// grants name; the password file's path.
fn prepare(db: &MariaDb) -> std::path::PathBuf {
    db.sql(&format!(
        "CREATE DATABASE appdb; CREATE DATABASE app_db; CREATE DATABASE appxdb; \
         CREATE TABLE appdb.t (id INT PRIMARY KEY, v VARCHAR(20)); \
         CREATE TABLE appxdb.t (id INT PRIMARY KEY); \
         CREATE USER {ADMIN}@'%' IDENTIFIED BY 'admin-pw'; \
         GRANT ALL ON *.* TO {ADMIN}@'%' WITH GRANT OPTION;"
    ));
    let file = db.dir().join("admin-password");
    std::fs::write(&file, "admin-pw\n").expect("write the admin password");
    file
}

/// Options for `user` straight at the database.
fn direct(db: &MariaDb, user: &str, password: &str) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(db.addr.port())
        .user(Some(user))
        .pass(Some(password))
        .db_name(Some("appdb"))
        .prefer_socket(false)
}

/// The MySQL error number of a failed call.
fn errno<T: std::fmt::Debug>(r: Result<T, mysql_async::Error>) -> u16 {
    match r {
        Err(mysql_async::Error::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// `SHOW GRANTS` of the session, without the `USAGE` line (which carries the password hash),
/// sorted.
async fn grants(conn: &mut Conn) -> Vec<String> {
    let mut g: Vec<String> = conn.query("SHOW GRANTS").await.expect("show grants");
    g.retain(|l| !l.starts_with("GRANT USAGE ON *.*"));
    g.sort();
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_binding_user_gets_exactly_the_configured_grants_and_is_gone_after_unbind() {
    let db = MariaDb::start().await;
    let password_file = prepare(&db);
    let s = Stack::builder()
        .with_mariadb(db)
        .service("orders")
        .service("billing")
        .agent(move |a| {
            a.service_mut("orders").users = Some(AgentUsers {
                admin: ADMIN.into(),
                password_file: Some(password_file),
                grants: vec![
                    "SELECT, INSERT, UPDATE, DELETE ON appdb.*".into(),
                    "select on app_db.*".into(),
                ],
                ..AgentUsers::default()
            });
        })
        .start()
        .await;
    let relay = s.relay().handle().clone();
    let db = s.db();

    let user = relay
        .create_binding_user("orders", BINDING)
        .await
        .expect("bind creates the user");
    assert_eq!(user.username, binding_username(BINDING));
    assert!(user.password.len() >= 24, "a long password");
    assert!(!format!("{user:?}").contains(&user.password));

    // Straight at the database: the grants are the config's, and no more.
    let mut conn = Conn::new(direct(db, &user.username, &user.password))
        .await
        .expect("the binding user logs in");
    let want = |u: &str| {
        vec![
            format!("GRANT SELECT ON `app\\_db`.* TO `{u}`@`%`"),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON `appdb`.* TO `{u}`@`%`"),
        ]
    };
    assert_eq!(grants(&mut conn).await, want(&user.username));
    conn.query_drop("INSERT INTO appdb.t VALUES (1, 'bound')")
        .await
        .expect("the user writes its database");
    // `app_db.*` means that one database: `_` is no wildcard for `appxdb`.
    assert_eq!(
        errno(conn.query_drop("SELECT * FROM appxdb.t").await),
        ER_TABLEACCESS_DENIED
    );
    assert_eq!(
        errno(conn.query_drop("CREATE TABLE appdb.u (id INT)").await),
        ER_TABLEACCESS_DENIED
    );
    assert_eq!(
        errno(conn.query_drop("USE mysql").await),
        ER_DBACCESS_DENIED
    );

    // Through the relay's MySQL listener, with a client certificate.
    let cert = s.pki.issue(Kind::Client, "alice");
    let via_relay = |password: &str| {
        driver_opts(&s.pki, s.port(), &cert, &user.username, password).db_name(Some("appdb"))
    };
    let mut tunneled = Conn::new(via_relay(&user.password))
        .await
        .expect("the binding user logs in through the relay");
    let v: Option<String> = tunneled
        .query_first("SELECT v FROM appdb.t WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("bound"));

    // A retried bind: the same user, a new password, the same grants.
    let again = relay
        .create_binding_user("orders", BINDING)
        .await
        .expect("a second bind succeeds");
    assert_eq!(again.username, user.username);
    assert_ne!(again.password, user.password);
    assert_eq!(
        errno(Conn::new(direct(db, &user.username, &user.password)).await),
        ER_ACCESS_DENIED,
        "the old password no longer works"
    );
    let mut renewed = Conn::new(direct(db, &again.username, &again.password))
        .await
        .expect("the new password works");
    assert_eq!(grants(&mut renewed).await, want(&user.username));
    renewed.disconnect().await.unwrap();

    // Unbind: the user is gone, its open sessions end, it cannot log in again.
    relay
        .drop_binding_user("orders", BINDING)
        .await
        .expect("unbind drops the user");
    assert!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the open direct session was ended"
    );
    assert!(
        tunneled.query_drop("SELECT 1").await.is_err(),
        "the open session through the relay was ended"
    );
    assert_eq!(
        errno(Conn::new(direct(db, &again.username, &again.password)).await),
        ER_ACCESS_DENIED
    );
    assert_eq!(
        errno(Conn::new(via_relay(&again.password)).await),
        ER_ACCESS_DENIED
    );
    let left = db.sql(&format!(
        "SELECT COUNT(*) FROM mysql.user WHERE User = '{}'",
        user.username
    ));
    assert_eq!(left.trim(), "0");
    relay
        .drop_binding_user("orders", BINDING)
        .await
        .expect("a retried unbind succeeds");

    // A service whose agent makes no users is refused by the agent, saying what to configure.
    let refused = relay
        .create_binding_user("billing", BINDING)
        .await
        .expect_err("billing makes no users");
    assert_eq!(refused.code, Code::NotAuthorized, "{refused}");
    assert!(
        refused.message.contains("services.billing.users"),
        "{refused}"
    );
    let unknown = relay
        .create_binding_user("nope", BINDING)
        .await
        .expect_err("no such service");
    assert_eq!(unknown.code, Code::UnknownService, "{unknown}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_refusing_the_admin_is_a_clear_refusal() {
    let db = MariaDb::start().await;
    let password_file = prepare(&db);
    std::fs::write(&password_file, "not-the-password\n").unwrap();
    let s = Stack::builder()
        .with_mariadb(db)
        .agent(move |a| {
            a.service_mut("orders").users = Some(AgentUsers {
                admin: ADMIN.into(),
                password_file: Some(password_file),
                grants: vec!["SELECT ON appdb.*".into()],
                ..AgentUsers::default()
            });
        })
        .start()
        .await;
    let refused = s
        .relay()
        .handle()
        .create_binding_user("orders", BINDING)
        .await
        .expect_err("the admin cannot log in");
    assert_eq!(refused.code, Code::BackendUnavailable, "{refused}");
    assert!(
        refused.message.contains("cannot log in to")
            && refused.message.contains(ADMIN)
            && refused.message.contains("Access denied"),
        "{refused}"
    );
    assert!(!refused.message.contains("not-the-password"), "{refused}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_agent_that_makes_users_the_relay_refuses_at_once() {
    let s = Stack::builder().start().await;
    let refused = s
        .relay()
        .handle()
        .create_binding_user("orders", BINDING)
        .await
        .expect_err("no agent makes users");
    assert_eq!(refused.code, Code::NoAgent, "{refused}");
    assert!(
        refused.message.contains("makes database users")
            && refused.message.contains("services.orders.users"),
        "{refused}"
    );
    s.stop().await;
}
