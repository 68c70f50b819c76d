//! The systems under comparison: how each pool is built for a workload, and the three operations
//! the workloads time (acquire + release, `SELECT 1`, the seed's `pg_sleep` request).
//!
//! Every system gets the same treatment:
//! * statements are prepared once per connection and reused (tidepool's own cache, deadpool's
//!   `prepare_cached`, sqlx's default persistent statements, a statement prepared at connect for
//!   bb8 and raw-10), so `SELECT 1` is one round trip everywhere;
//! * `application_name` is unique per pool, so the server log (`log_connections = on`) witnesses
//!   how many connections each pool opened;
//! * waits are bounded (30 s), so a pool that loses a connection shows up as errors, not a hang.

use std::time::Duration;

use tokio_postgres::{Client, NoTls, Statement};

/// Longest any checkout may wait, for every pool.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The query of the seed's load test (W1).
pub const SLEEP_SQL: &str = "SELECT pg_sleep(0.1), 1";
/// The query of W2.
pub const SELECT1_SQL: &str = "SELECT 1";

/// Where the server is.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
}

impl Target {
    /// A tokio-postgres config with this pool's application name.
    pub fn pg_config(&self, app: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name(app)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// `postgresql://user:password@host:port/db?application_name=app`
    pub fn url(&self, app: &str) -> String {
        format!(
            "postgresql://{}:{}@{}:{}/{}?application_name={}",
            pct(&self.user),
            pct(&self.password),
            self.host,
            self.port,
            pct(&self.dbname),
            pct(app)
        )
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
    inner: bb8_postgres::PostgresConnectionManager<NoTls>,
}

pub struct Bb8Conn {
    client: Client,
    select1: Statement,
}

impl bb8::ManageConnection for Bb8Manager {
    type Connection = Bb8Conn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<Bb8Conn, tokio_postgres::Error> {
        let client = self.inner.connect().await?;
        let select1 = client.prepare(SELECT1_SQL).await?;
        Ok(Bb8Conn { client, select1 })
    }

    async fn is_valid(&self, conn: &mut Bb8Conn) -> Result<(), tokio_postgres::Error> {
        self.inner.is_valid(&mut conn.client).await
    }

    fn has_broken(&self, conn: &mut Bb8Conn) -> bool {
        self.inner.has_broken(&mut conn.client)
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
                let mgr = Manager::from_config(
                    target.pg_config(app),
                    NoTls,
                    ManagerConfig {
                        recycling_method: method,
                    },
                );
                let pool = Pool::builder(mgr)
                    .max_size(sizing.max())
                    .wait_timeout(Some(WAIT_TIMEOUT))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(err)?;
                Handle::Deadpool(pool)
            }
            System::Bb8 | System::Bb8Tested => {
                let mgr = Bb8Manager {
                    inner: bb8_postgres::PostgresConnectionManager::new(
                        target.pg_config(app),
                        NoTls,
                    ),
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
                use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
                let opts = PgConnectOptions::new_without_pgpass()
                    .host(&target.host)
                    .port(target.port)
                    .username(&target.user)
                    .password(&target.password)
                    .database(&target.dbname)
                    .application_name(app);
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
                let mut conns = Vec::with_capacity(sizing.max());
                for _ in 0..sizing.max() {
                    let (client, connection) = config.connect(NoTls).await.map_err(err)?;
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
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
