//! Where the broker keeps service instances and bindings: a SQL database every relay instance
//! shares (PostgreSQL or MySQL, by URL), or an SQLite file for a single relay.
//!
//! Three tables, created when missing: `postern_broker_instances`, `postern_broker_bindings`
//! (a binding is never deleted: unbinding stamps `revoked_ms`, which every instance then
//! applies, and the row stays as the record of who was bound when), and
//! `postern_broker_generation`, one counter every change increments in the same transaction,
//! which instances poll to learn that something changed without reading every binding. No
//! private key and no password is stored: a binding's credentials are handed to the platform
//! once, in the bind response.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};

/// The SQL dialect of the store (placeholders differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    Mysql,
    Sqlite,
}

/// The broker's store.
#[derive(Clone)]
pub(crate) struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// For logs: the URL's scheme and host, never its password.
    pub(crate) describe: String,
}

/// A provisioned service instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    pub(crate) id: String,
    pub(crate) service_id: String,
    pub(crate) plan_id: String,
    pub(crate) service: String,
    /// The provision request's `parameters`, as JSON text.
    pub(crate) params: String,
}

/// A binding (live or revoked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) id: String,
    pub(crate) instance_id: String,
    pub(crate) service: String,
    /// The client identity name in its certificate.
    pub(crate) identity: String,
    /// The MySQL user of its own, when the plan makes one per binding ("" otherwise).
    pub(crate) username: String,
    pub(crate) per_binding: bool,
    /// The bind request's `parameters`, as JSON text.
    pub(crate) params: String,
    /// The app (or the service key's client) it was made for.
    pub(crate) bound_to: String,
    pub(crate) expires_ms: i64,
    pub(crate) revoked_ms: Option<i64>,
    pub(crate) user_dropped: bool,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no database this relay can use.
    #[error(
        "the broker's store must be a postgres://, postgresql://, mysql:// or sqlite: URL (got {0}:)"
    )]
    Scheme(String),
    /// The database refused or failed.
    #[error("the broker's store ({where_}): {source}")]
    Sql {
        /// Which store.
        where_: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS postern_broker_instances (
        id VARCHAR(255) PRIMARY KEY,
        service_id VARCHAR(64) NOT NULL,
        plan_id VARCHAR(64) NOT NULL,
        service VARCHAR(64) NOT NULL,
        params TEXT NOT NULL,
        created_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS postern_broker_bindings (
        id VARCHAR(255) PRIMARY KEY,
        instance_id VARCHAR(255) NOT NULL,
        service VARCHAR(64) NOT NULL,
        identity VARCHAR(64) NOT NULL,
        username VARCHAR(80) NOT NULL,
        per_binding BIGINT NOT NULL,
        params TEXT NOT NULL,
        bound_to VARCHAR(255) NOT NULL,
        expires_ms BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        revoked_ms BIGINT,
        user_dropped BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS postern_broker_generation (
        id BIGINT PRIMARY KEY,
        n BIGINT NOT NULL)",
];

const BINDING_COLUMNS: &str = "id, instance_id, service, identity, username, per_binding, params, \
     bound_to, expires_ms, revoked_ms, user_dropped";

impl Store {
    /// Connects to `url` and creates the tables when missing.
    pub(crate) async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let scheme = url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let dialect = match scheme.as_str() {
            "postgres" | "postgresql" => Dialect::Postgres,
            "mysql" | "mariadb" => Dialect::Mysql,
            "sqlite" => Dialect::Sqlite,
            other => return Err(StoreError::Scheme(other.to_owned())),
        };
        let describe = describe(url);
        // Cloud Foundry's MySQL brokers add `?reconnect=true` and the like, which the driver
        // refuses: keep only the TLS settings.
        let url = match dialect {
            Dialect::Mysql => keep_query(
                &url.replacen("mariadb://", "mysql://", 1),
                &["ssl-mode", "ssl-ca", "sslmode", "sslca"],
            ),
            _ => url.to_owned(),
        };
        let sql = |source| StoreError::Sql {
            where_: describe.clone(),
            source,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(sql)?;
        let store = Self {
            pool,
            dialect,
            describe: describe.clone(),
        };
        // Two instances starting together may race to create the same table: PostgreSQL can
        // then refuse one `IF NOT EXISTS`; the second try finds the table.
        for attempt in 0..2 {
            match store.migrate().await {
                Ok(()) => break,
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "creating the broker's tables again");
                }
                Err(e) => return Err(sql(e)),
            }
        }
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), sqlx::Error> {
        for statement in SCHEMA {
            sqlx::query(*statement).execute(&self.pool).await?;
        }
        let exists = sqlx::query(self.sql("SELECT n FROM postern_broker_generation WHERE id = ?"))
            .bind(1_i64)
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            // Another instance may insert it first; that is as good.
            let _ = sqlx::query(
                self.sql("INSERT INTO postern_broker_generation (id, n) VALUES (?, ?)"),
            )
            .bind(1_i64)
            .bind(0_i64)
            .execute(&self.pool)
            .await;
        }
        Ok(())
    }

    /// `?` placeholders in this store's dialect. Every statement is built from this module's
    /// constant text (values are always bound), which is what makes it safe.
    fn sql(&self, text: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(self.placeholders(text))
    }

    fn placeholders(&self, text: &str) -> String {
        if self.dialect != Dialect::Postgres {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len() + 8);
        let mut n = 0;
        for c in text.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }

    fn err(&self, source: sqlx::Error) -> StoreError {
        StoreError::Sql {
            where_: self.describe.clone(),
            source,
        }
    }

    /// The change counter.
    pub(crate) async fn generation(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(self.sql("SELECT n FROM postern_broker_generation WHERE id = ?"))
            .bind(1_i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|r| r.try_get::<i64, _>(0).ok()).unwrap_or(0))
    }

    /// The instance `id`.
    pub(crate) async fn instance(&self, id: &str) -> Result<Option<Instance>, StoreError> {
        let row = sqlx::query(self.sql(
            "SELECT id, service_id, plan_id, service, params FROM postern_broker_instances WHERE id = ?",
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| {
            Ok(Instance {
                id: r.try_get(0)?,
                service_id: r.try_get(1)?,
                plan_id: r.try_get(2)?,
                service: r.try_get(3)?,
                params: r.try_get(4)?,
            })
        })
        .transpose()
        .map_err(|e| self.err(e))
    }

    /// Records a new instance. `false` if one with its id exists (the caller compares).
    pub(crate) async fn insert_instance(&self, i: &Instance) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let done = sqlx::query(self.sql(
            "INSERT INTO postern_broker_instances (id, service_id, plan_id, service, params, created_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        ))
        .bind(&i.id)
        .bind(&i.service_id)
        .bind(&i.plan_id)
        .bind(&i.service)
        .bind(&i.params)
        .bind(now_ms())
        .execute(&mut *tx)
        .await;
        match done {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => return Ok(false),
            Err(e) => return Err(self.err(e)),
        }
        self.bump(&mut tx).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Removes an instance. `false` if there was none.
    pub(crate) async fn delete_instance(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let done = sqlx::query(self.sql("DELETE FROM postern_broker_instances WHERE id = ?"))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        self.bump(&mut tx).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// The binding `id`, live or revoked.
    pub(crate) async fn binding(&self, id: &str) -> Result<Option<Binding>, StoreError> {
        let row = sqlx::query(self.sql(&format!(
            "SELECT {BINDING_COLUMNS} FROM postern_broker_bindings WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| binding_of(&r))
            .transpose()
            .map_err(|e| self.err(e))
    }

    /// The bindings of instance `id` that are not fully cleaned up (live, or revoked with their
    /// user still to drop).
    pub(crate) async fn bindings_of(&self, instance: &str) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(self.sql(&format!(
            "SELECT {BINDING_COLUMNS} FROM postern_broker_bindings \
             WHERE instance_id = ? AND (revoked_ms IS NULL OR user_dropped = 0)"
        )))
        .bind(instance)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter()
            .map(binding_of)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// Every live binding.
    pub(crate) async fn live_bindings(&self) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(self.sql(&format!(
            "SELECT {BINDING_COLUMNS} FROM postern_broker_bindings WHERE revoked_ms IS NULL"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter()
            .map(binding_of)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// Records a new binding. `false` if one with its id exists (the caller compares).
    pub(crate) async fn insert_binding(&self, b: &Binding) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let done = sqlx::query(self.sql(
            "INSERT INTO postern_broker_bindings (id, instance_id, service, identity, username, \
             per_binding, params, bound_to, expires_ms, created_ms, revoked_ms, user_dropped) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0)",
        ))
        .bind(&b.id)
        .bind(&b.instance_id)
        .bind(&b.service)
        .bind(&b.identity)
        .bind(&b.username)
        .bind(i64::from(b.per_binding))
        .bind(&b.params)
        .bind(&b.bound_to)
        .bind(b.expires_ms)
        .bind(now_ms())
        .execute(&mut *tx)
        .await;
        match done {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => return Ok(false),
            Err(e) => return Err(self.err(e)),
        }
        self.bump(&mut tx).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Stamps a binding revoked (every instance cuts it at its next poll).
    pub(crate) async fn revoke(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        sqlx::query(self.sql(
            "UPDATE postern_broker_bindings SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
        ))
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        self.bump(&mut tx).await?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Records that a revoked binding's own MySQL user is gone.
    pub(crate) async fn user_dropped(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(self.sql("UPDATE postern_broker_bindings SET user_dropped = 1 WHERE id = ?"))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn bump(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), StoreError> {
        sqlx::query(self.sql("UPDATE postern_broker_generation SET n = n + 1 WHERE id = ?"))
            .bind(1_i64)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn binding_of(r: &AnyRow) -> Result<Binding, sqlx::Error> {
    Ok(Binding {
        id: r.try_get(0)?,
        instance_id: r.try_get(1)?,
        service: r.try_get(2)?,
        identity: r.try_get(3)?,
        username: r.try_get(4)?,
        per_binding: r.try_get::<i64, _>(5)? != 0,
        params: r.try_get(6)?,
        bound_to: r.try_get(7)?,
        expires_ms: r.try_get(8)?,
        revoked_ms: r.try_get(9)?,
        user_dropped: r.try_get::<i64, _>(10)? != 0,
    })
}

fn is_duplicate(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// The URL without its password (for logs and errors).
fn describe(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.split('?').next().unwrap_or_default().to_owned();
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{host}")
}

/// `url` with only the query parameters named in `keep`.
fn keep_query(url: &str, keep: &[&str]) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let k = kv.split('=').next().unwrap_or_default();
            keep.iter().any(|w| w.eq_ignore_ascii_case(k))
        })
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_described_without_their_password_and_trimmed_for_the_driver() {
        assert_eq!(
            describe("postgres://u:secret@db.example.com:5432/postern?sslmode=require"),
            "postgres://db.example.com:5432/postern"
        );
        assert_eq!(
            describe("sqlite:///tmp/b.sqlite?mode=rwc"),
            "sqlite:///tmp/b.sqlite"
        );
        assert_eq!(
            keep_query(
                "mysql://u:p@h/db?reconnect=true&ssl-mode=REQUIRED",
                &["ssl-mode"]
            ),
            "mysql://u:p@h/db?ssl-mode=REQUIRED"
        );
        assert_eq!(
            keep_query("mysql://u:p@h/db?reconnect=true", &["ssl-mode"]),
            "mysql://u:p@h/db"
        );
    }

    #[tokio::test]
    async fn a_url_of_no_known_database_is_refused_by_name() {
        let e = Store::open("redis://127.0.0.1:6379/0").await.err().unwrap();
        assert!(
            e.to_string().contains("postgres://") && e.to_string().contains("redis"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_sqlite_store_keeps_instances_and_bindings_and_counts_changes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/b.sqlite?mode=rwc", dir.path().display());
        let store = Store::open(&url).await.unwrap();
        let g0 = store.generation().await.unwrap();
        let i = Instance {
            id: "i1".into(),
            service_id: "s".into(),
            plan_id: "p".into(),
            service: "orders".into(),
            params: "{}".into(),
        };
        assert!(store.insert_instance(&i).await.unwrap());
        assert!(
            !store.insert_instance(&i).await.unwrap(),
            "a second insert is a duplicate"
        );
        assert_eq!(store.instance("i1").await.unwrap(), Some(i));
        let b = Binding {
            id: "b1".into(),
            instance_id: "i1".into(),
            service: "orders".into(),
            identity: "binding-b1".into(),
            username: String::new(),
            per_binding: false,
            params: "{}".into(),
            bound_to: "app".into(),
            expires_ms: 1,
            revoked_ms: None,
            user_dropped: false,
        };
        assert!(store.insert_binding(&b).await.unwrap());
        assert_eq!(store.live_bindings().await.unwrap(), vec![b.clone()]);
        store.revoke("b1").await.unwrap();
        assert!(store.live_bindings().await.unwrap().is_empty());
        assert!(
            store
                .binding("b1")
                .await
                .unwrap()
                .unwrap()
                .revoked_ms
                .is_some()
        );
        assert!(store.generation().await.unwrap() >= g0 + 3);
        // Reopened (a restart), it still holds them.
        drop(store);
        let again = Store::open(&url).await.unwrap();
        assert!(again.instance("i1").await.unwrap().is_some());
        assert!(again.delete_instance("i1").await.unwrap());
        assert!(!again.delete_instance("i1").await.unwrap());
    }
}
