//! The systems under comparison: how each pool is built for a workload, and the three operations
//! the workloads time (acquire + release, `SELECT 1`, the seed's `pg_sleep` request).
//!
//! Every system gets the same treatment:
//! * statements are prepared once per connection and reused (tidepool's own cache, deadpool's
//!   `prepare_cached`, sqlx's default persistent statements, a statement prepared at connect for
//!   bb8 and raw-10), so `SELECT 1` is one round trip everywhere;
//! * `application_name` is unique per pool, so the server log (`log_connections = on`) witnesses
//!   how many connections each pool opened;
//! * waits are bounded (30 s), so a pool that loses a connection shows up as errors, not a hang;
//! * with `--tls`, every system connects over verified TLS against the same CA (tidepool:
//!   `sslmode=verify-full`; tokio-postgres, deadpool and bb8: tokio-postgres-rustls; sqlx:
//!   `PgSslMode::VerifyFull`), all rustls over ring, one rustls `ClientConfig` per pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Longest any checkout may wait, for every pool.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The query of the seed's load test (W1).
pub const SLEEP_SQL: &str = "SELECT pg_sleep(0.1), 1";
/// The query of W2.
pub const SELECT1_SQL: &str = "SELECT 1";

/// Where the server is.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    /// `--tls`: every connection is TLS, the server's certificate verified against this CA
    /// (chain and host name, libpq's `verify-full`).
    pub tls: Option<Arc<TargetTls>>,
}

/// The root store of a TLS run: the CA certificate file and its certificates, read once.
pub struct TargetTls {
    pub ca_path: PathBuf,
    roots: rustls::RootCertStore,
}

impl TargetTls {
    /// Reads the CA certificates (PEM) that every system trusts.
    pub fn load(ca_path: &Path) -> Result<TargetTls, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca_path)
            .map_err(|e| format!("cannot read {}: {e}", ca_path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", ca_path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate in {}: {e}", ca_path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("no certificate in {}", ca_path.display()));
        }
        Ok(TargetTls {
            ca_path: ca_path.to_owned(),
            roots,
        })
    }

    /// A tokio-postgres TLS connector trusting only the CA: rustls over ring (installed
    /// explicitly, as tidepool does), the webpki verifier (chain + host name in the SANs), no
    /// client certificate. Each call builds its own `ClientConfig`, as each tidepool pool has
    /// its own.
    pub fn connector(&self) -> MakeRustlsConnect {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        MakeRustlsConnect::new(config)
    }
}

/// How tokio-postgres connections of one pool (or opener) reach the server.
#[derive(Clone)]
pub enum Connector {
    Plain,
    Tls(MakeRustlsConnect),
}

impl Connector {
    /// Opens one connection with `config` and spawns its connection task.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<Client, tokio_postgres::Error> {
        match self {
            Connector::Plain => {
                let (client, conn) = config.connect(NoTls).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(client)
            }
            Connector::Tls(tls) => {
                let (client, conn) = config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(client)
            }
        }
    }
}

impl Target {
    /// A tokio-postgres config with this pool's application name (`--tls`: `sslmode=require`,
    /// so a connection can never fall back to plaintext; the connector verifies the server).
    pub fn pg_config(&self, app: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name(app)
            .connect_timeout(Duration::from_secs(10));
        if self.tls.is_some() {
            c.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        c
    }

    /// The tokio-postgres connector for one pool: plaintext, or TLS with its own `ClientConfig`.
    pub fn connector(&self) -> Connector {
        match &self.tls {
            None => Connector::Plain,
            Some(t) => Connector::Tls(t.connector()),
        }
    }

    /// `postgresql://user:password@host:port/db?application_name=app`, plus
    /// `&sslmode=verify-full&sslrootcert=CA` with `--tls`.
    pub fn url(&self, app: &str) -> String {
        let mut url = format!(
            "postgresql://{}:{}@{}:{}/{}?application_name={}",
            pct(&self.user),
            pct(&self.password),
            self.host,
            self.port,
            pct(&self.dbname),
            pct(app)
        );
        if let Some(t) = &self.tls {
            url.push_str("&sslmode=verify-full&sslrootcert=");
            url.push_str(&pct(&t.ca_path.display().to_string()));
        }
        url
    }
}

fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The systems, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum System {
    Tidepool,
    /// Pre-ping on with its default window: no round trip for a connection the server answered
    /// on within the last 0.5 s.
    TidepoolPreping,
    /// Pre-ping on every checkout (`DB_POOL_PRE_PING_WINDOW=0`): SQLAlchemy's exact behaviour.
    TidepoolPrepingEvery,
    /// Statements run on the pool itself (`Pool::query_one`), pipelined on busy connections
    /// when the pool is saturated; pre-ping on (default window). No checkout (W1, W2 only).
    TidepoolPipelined,
    Deadpool,
    DeadpoolVerified,
    Bb8,
    Bb8Tested,
    Sqlx,
    SqlxTested,
    Raw10,
    /// Ten dedicated connections, one task each: one query at a time per connection, as a pool
    /// uses them (no pipelining). The ceiling for exclusive checkout on this machine.
    Raw10Serial,
    /// Not a pool: every operation succeeds at once. Profiles the harness itself (the driver
    /// loop, timing and histogram), to subtract from the other systems' figures.
    Noop,
}

impl System {
    pub const ALL: [System; 12] = [
        System::Tidepool,
        System::TidepoolPreping,
        System::TidepoolPrepingEvery,
        System::TidepoolPipelined,
        System::Deadpool,
        System::DeadpoolVerified,
        System::Bb8,
        System::Bb8Tested,
        System::Sqlx,
        System::SqlxTested,
        System::Raw10,
        System::Raw10Serial,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Tidepool => "tidepool",
            System::TidepoolPreping => "tidepool-preping",
            System::TidepoolPrepingEvery => "tidepool-preping-every",
            System::TidepoolPipelined => "tidepool-pipelined",
            System::Deadpool => "deadpool",
            System::DeadpoolVerified => "deadpool-verified",
            System::Bb8 => "bb8",
            System::Bb8Tested => "bb8-tested",
            System::Sqlx => "sqlx",
            System::SqlxTested => "sqlx-tested",
            System::Raw10 => "raw-10",
            System::Raw10Serial => "raw-10-serial",
            System::Noop => "noop",
        }
    }

    pub fn parse(s: &str) -> Option<System> {
        System::ALL
            .into_iter()
            .chain([System::Noop])
            .find(|x| x.name() == s)
    }

    /// Not a pool: ten dedicated connections (W2 only).
    pub fn is_raw(self) -> bool {
        matches!(self, System::Raw10 | System::Raw10Serial)
    }

    /// Runs statements without a checkout, so it has no W3.
    pub fn no_checkout(self) -> bool {
        self.is_raw() || self == System::TidepoolPipelined
    }

    /// Whether this system checks the connection with a round trip at checkout.
    pub fn pings(self) -> bool {
        matches!(
            self,
            System::TidepoolPreping
                | System::TidepoolPrepingEvery
                | System::DeadpoolVerified
                | System::Bb8Tested
                | System::SqlxTested
        )
    }
}

/// Pool sizing for one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    /// Connections kept (tidepool's `pool_size`).
    pub size: usize,
    /// Extra burst connections (tidepool's `max_overflow`); peers without the concept get
    /// `max = size + overflow`.
    pub overflow: usize,
}

impl Sizing {
    pub fn max(self) -> usize {
        self.size + self.overflow
    }
}

/// bb8 manager: bb8-postgres' connect, health check and broken test, plus `SELECT 1` prepared
/// at connect (bb8 has no statement cache; this is what a bb8 user does to get one round trip).
pub struct Bb8Manager {
    inner: Bb8Inner,
}

/// bb8-postgres' manager, plaintext or over TLS (`--tls`).
enum Bb8Inner {
    Plain(bb8_postgres::PostgresConnectionManager<NoTls>),
    Tls(bb8_postgres::PostgresConnectionManager<MakeRustlsConnect>),
}

pub struct Bb8Conn {
    client: Client,
    select1: Statement,
}

impl bb8::ManageConnection for Bb8Manager {
    type Connection = Bb8Conn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<Bb8Conn, tokio_postgres::Error> {
        let client = match &self.inner {
            Bb8Inner::Plain(m) => m.connect().await?,
            Bb8Inner::Tls(m) => m.connect().await?,
        };
        let select1 = client.prepare(SELECT1_SQL).await?;
        Ok(Bb8Conn { client, select1 })
    }

    async fn is_valid(&self, conn: &mut Bb8Conn) -> Result<(), tokio_postgres::Error> {
        match &self.inner {
            Bb8Inner::Plain(m) => m.is_valid(&mut conn.client).await,
            Bb8Inner::Tls(m) => m.is_valid(&mut conn.client).await,
        }
    }

    fn has_broken(&self, conn: &mut Bb8Conn) -> bool {
        match &self.inner {
            Bb8Inner::Plain(m) => m.has_broken(&mut conn.client),
            Bb8Inner::Tls(m) => m.has_broken(&mut conn.client),
        }
    }
}

/// One built pool (or, for raw-10, the dedicated connections).
pub enum Handle {
    Tidepool(tidepool::Pool),
    /// The same pool, used through its statement API (`Pool::query_one`).
    TidepoolPipelined(tidepool::Pool),
    Deadpool(deadpool_postgres::Pool),
    Bb8(bb8::Pool<Bb8Manager>),
    Sqlx(sqlx::PgPool),
    Raw(Vec<(Client, Statement)>),
    Noop,
}

pub type OpResult = Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// `DB_POOL_LEAK_THRESHOLD` from the environment, read as tidepool reads it: tidepool's pools
/// run with leak detection on when it is set (to measure what that costs).
fn leak_threshold() -> Result<Option<Duration>, String> {
    const VAR: &str = "DB_POOL_LEAK_THRESHOLD";
    let settings =
        tidepool::Settings::from_lookup(|name| (name == VAR).then(|| std::env::var(VAR).ok())?)
            .map_err(err)?;
    Ok(settings.leak_threshold)
}

impl Handle {
    /// Builds `system`'s pool. Lazy: no connection is opened here, except for raw-10 which opens
    /// its `sizing.max()` connections (and prepares `SELECT 1` on each) before returning.
    pub async fn build(
        system: System,
        target: &Target,
        app: &str,
        sizing: Sizing,
    ) -> Result<Handle, String> {
        Ok(match system {
            System::Tidepool
            | System::TidepoolPreping
            | System::TidepoolPrepingEvery
            | System::TidepoolPipelined => {
                let settings = tidepool::Settings {
                    database_url: Some(
                        tidepool::DatabaseUrl::parse(&target.url(app)).map_err(err)?,
                    ),
                    pool_size: sizing.size,
                    max_overflow: Some(sizing.overflow),
                    pre_ping: system != System::Tidepool,
                    pre_ping_window: if system == System::TidepoolPrepingEvery {
                        Duration::ZERO
                    } else {
                        tidepool::Settings::default().pre_ping_window
                    },
                    pool_timeout: WAIT_TIMEOUT,
                    application_name: Some(app.to_owned()),
                    leak_threshold: leak_threshold()?,
                    ..tidepool::Settings::default()
                };
                let pool = tidepool::Pool::new(settings).map_err(err)?;
                if system == System::TidepoolPipelined {
                    Handle::TidepoolPipelined(pool)
                } else {
                    Handle::Tidepool(pool)
                }
            }
            System::Deadpool | System::DeadpoolVerified => {
                use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
                let method = if system == System::Deadpool {
                    RecyclingMethod::Fast
                } else {
                    RecyclingMethod::Verified
                };
                let config = ManagerConfig {
                    recycling_method: method,
                };
                let mgr = match target.connector() {
                    Connector::Plain => Manager::from_config(target.pg_config(app), NoTls, config),
                    Connector::Tls(tls) => Manager::from_config(target.pg_config(app), tls, config),
                };
                let pool = Pool::builder(mgr)
                    .max_size(sizing.max())
                    .wait_timeout(Some(WAIT_TIMEOUT))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(err)?;
                Handle::Deadpool(pool)
            }
            System::Bb8 | System::Bb8Tested => {
                let config = target.pg_config(app);
                let mgr = Bb8Manager {
                    inner: match target.connector() {
                        Connector::Plain => Bb8Inner::Plain(
                            bb8_postgres::PostgresConnectionManager::new(config, NoTls),
                        ),
                        Connector::Tls(tls) => {
                            Bb8Inner::Tls(bb8_postgres::PostgresConnectionManager::new(config, tls))
                        }
                    },
                };
                let pool = bb8::Pool::builder()
                    .max_size(sizing.max() as u32)
                    .min_idle(None)
                    // bb8's default is `true`; plain `bb8` is the variant without the check.
                    .test_on_check_out(system == System::Bb8Tested)
                    .connection_timeout(WAIT_TIMEOUT)
                    .build_unchecked(mgr);
                Handle::Bb8(pool)
            }
            System::Sqlx | System::SqlxTested => {
                use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
                let opts = PgConnectOptions::new_without_pgpass()
                    .host(&target.host)
                    .port(target.port)
                    .username(&target.user)
                    .password(&target.password)
                    .database(&target.dbname)
                    .application_name(app);
                // sqlx is built with TLS (rustls over ring); its default `prefer` would then send
                // an SSLRequest on every plaintext connect, so plaintext runs disable TLS.
                let opts = match &target.tls {
                    None => opts.ssl_mode(PgSslMode::Disable),
                    Some(t) => opts
                        .ssl_mode(PgSslMode::VerifyFull)
                        .ssl_root_cert(&t.ca_path),
                };
                let pool = PgPoolOptions::new()
                    .max_connections(sizing.max() as u32)
                    .min_connections(0)
                    // sqlx's default is `true`; plain `sqlx` is the variant without the ping.
                    .test_before_acquire(system == System::SqlxTested)
                    .acquire_timeout(WAIT_TIMEOUT)
                    .connect_lazy_with(opts);
                Handle::Sqlx(pool)
            }
            System::Raw10 | System::Raw10Serial => {
                let config = target.pg_config(app);
                let connector = target.connector();
                let mut conns = Vec::with_capacity(sizing.max());
                for _ in 0..sizing.max() {
                    let client = connector.connect(&config).await.map_err(err)?;
                    let st = client.prepare(SELECT1_SQL).await.map_err(err)?;
                    conns.push((client, st));
                }
                Handle::Raw(conns)
            }
            System::Noop => Handle::Noop,
        })
    }

    /// Closes the pool and waits until its connections are gone from the client side.
    pub async fn close(self) {
        match self {
            Handle::Tidepool(p) | Handle::TidepoolPipelined(p) => p.close(),
            Handle::Deadpool(p) => p.close(),
            Handle::Bb8(p) => drop(p),
            Handle::Sqlx(p) => p.close().await,
            Handle::Raw(c) => drop(c),
            Handle::Noop => {}
        }
    }

    /// W3: check a connection out and give it back, without a query. With `hold`, the task
    /// yields once while holding it, as a request handler holds a connection across an await:
    /// that is what makes 64 tasks contend for 10 connections on 2 worker threads.
    #[inline(always)]
    pub async fn checkout(&self, hold: bool) -> OpResult {
        match self {
            Handle::Tidepool(p) => {
                let c = p.get().await.map_err(err)?;
                if hold {
                    tokio::task::yield_now().await;
                }
                drop(c);
            }
            Handle::Deadpool(p) => {
                let c = p.get().await.map_err(err)?;
                if hold {
                    tokio::task::yield_now().await;
                }
                drop(c);
            }
            Handle::Bb8(p) => {
                let c = p.get().await.map_err(|e| format!("{e:?}"))?;
                if hold {
                    tokio::task::yield_now().await;
                }
                drop(c);
            }
            Handle::Sqlx(p) => {
                let c = p.acquire().await.map_err(err)?;
                if hold {
                    tokio::task::yield_now().await;
                }
                drop(c);
            }
            Handle::Raw(_) | Handle::TidepoolPipelined(_) => {
                return Err("no checkout for this system".into())
            }
            Handle::Noop => {
                if hold {
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(())
    }

    /// W2: `SELECT 1` on a checked-out connection (raw-10: on dedicated connection
    /// `task % 10`, pipelined with the other tasks sharing it).
    #[inline(always)]
    pub async fn select1(&self, task: usize) -> OpResult {
        let v: i32 = match self {
            Handle::Tidepool(p) => {
                let c = p.get().await.map_err(err)?;
                let row = c.query_one(SELECT1_SQL, &[]).await.map_err(err)?;
                row.get(0)
            }
            Handle::TidepoolPipelined(p) => {
                let row = p.query_one(SELECT1_SQL, &[]).await.map_err(err)?;
                row.get(0)
            }
            Handle::Deadpool(p) => {
                let c = p.get().await.map_err(err)?;
                let st = c.prepare_cached(SELECT1_SQL).await.map_err(err)?;
                let row = c.query_one(&st, &[]).await.map_err(err)?;
                row.get(0)
            }
            Handle::Bb8(p) => {
                let c = p.get().await.map_err(|e| format!("{e:?}"))?;
                let row = c.client.query_one(&c.select1, &[]).await.map_err(err)?;
                row.get(0)
            }
            Handle::Sqlx(p) => {
                let mut c = p.acquire().await.map_err(err)?;
                sqlx::query_scalar::<_, i32>(SELECT1_SQL)
                    .fetch_one(&mut *c)
                    .await
                    .map_err(err)?
            }
            Handle::Raw(conns) => {
                let (client, st) = &conns[task % conns.len()];
                let row = client.query_one(st, &[]).await.map_err(err)?;
                row.get(0)
            }
            Handle::Noop => 1,
        };
        if v != 1 {
            return Err(format!("SELECT 1 returned {v}"));
        }
        Ok(())
    }

    /// W1: the seed's request, `SELECT pg_sleep(0.1), 1`, prepared once per connection.
    pub async fn sleep_request(&self) -> OpResult {
        let v: i32 = match self {
            Handle::Tidepool(p) => {
                let c = p.get().await.map_err(err)?;
                c.query_one(SLEEP_SQL, &[]).await.map_err(err)?.get(1)
            }
            Handle::TidepoolPipelined(p) => p.query_one(SLEEP_SQL, &[]).await.map_err(err)?.get(1),
            Handle::Deadpool(p) => {
                let c = p.get().await.map_err(err)?;
                let st = c.prepare_cached(SLEEP_SQL).await.map_err(err)?;
                c.query_one(&st, &[]).await.map_err(err)?.get(1)
            }
            Handle::Bb8(p) => {
                let c = p.get().await.map_err(|e| format!("{e:?}"))?;
                // Every W1 connection is new, so preparing here costs what a cache miss costs.
                c.client
                    .query_one(SLEEP_SQL, &[])
                    .await
                    .map_err(err)?
                    .get(1)
            }
            Handle::Sqlx(p) => {
                use sqlx::Row;
                let mut c = p.acquire().await.map_err(err)?;
                let row = sqlx::query(SLEEP_SQL)
                    .fetch_one(&mut *c)
                    .await
                    .map_err(err)?;
                row.try_get::<i32, _>(1).map_err(err)?
            }
            Handle::Raw(_) | Handle::Noop => return Err("no W1 for this system".into()),
        };
        if v != 1 {
            return Err(format!("W1 query returned {v}"));
        }
        Ok(())
    }
}
