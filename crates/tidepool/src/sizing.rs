//! The connection budget: the seed's sizing rules checked against the live server (DESIGN §6
//! `doctor`, §7 "connection budget across instances").
//!
//! The seed sizes a deployment as
//!
//! ```text
//! total = instances × (pool_size + max_overflow) × services + buffer
//! ```
//!
//! and asks that it fit the server's `max_connections`. This module makes that precise:
//!
//! * The slots an ordinary application may use are `max_connections −
//!   superuser_reserved_connections − reserved_connections` (the last from PostgreSQL 16). A
//!   budget never counts on the reserved slots, even when the role is a superuser and could use
//!   them: they are what lets an administrator in when the applications have filled the server.
//! * Connections other applications hold now (every client backend except this check's own and
//!   except those of this application, see [`ServerLimits::is_this_application`]) are taken off.
//! * A role connection limit (`ALTER ROLE ... CONNECTION LIMIT n`) caps the role's connections,
//!   minus those other applications hold under the same role. PostgreSQL does not enforce it for
//!   superusers, so neither does the budget.
//!
//! The budget fits when `total ≤ available`. The recommendation is the largest per-instance
//! capacity that fits, split 1 : 2 between `DB_POOL_SIZE` and `DB_MAX_OVERFLOW` as the seed
//! does ("for 4 workers: `DB_POOL_SIZE=3`, `DB_MAX_OVERFLOW=7`").
//!
//! [`ServerLimits::read`] runs the queries; [`Budget::compute`] is pure arithmetic, so it can be
//! tested without a server; [`startup_check`] is what `tidepool serve` runs at start-up.

use serde::Serialize;

use crate::connection::PooledConnection;
use crate::error::Error;
use crate::pool::Pool;
use crate::settings::Settings;

/// The server-wide settings, role attributes and connections that bound a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerLimits {
    /// `server_version`, e.g. `"15.8 (Debian 15.8-1)"`.
    pub server_version: String,
    /// `server_version_num`, e.g. `150008`.
    pub server_version_num: i32,
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16 and later; `None` before).
    pub reserved_connections: Option<u32>,
    /// The role the check connected as (`current_user`).
    pub role: String,
    /// The role's `rolconnlimit`; `None` when unlimited (`-1`).
    pub role_connection_limit: Option<u32>,
    /// Whether the role is a superuser (its connection limit is then not enforced).
    pub role_superuser: bool,
    /// The `application_name` of the check's own connection: connections with the same name
    /// and role belong to this application.
    pub application_name: String,
    /// Client connections open on the server, grouped by application and role, without the
    /// check's own connection. Largest groups first.
    pub connections: Vec<AppConnections>,
}

/// Client connections sharing an `application_name` and a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppConnections {
    /// `application_name` (empty when the client set none).
    pub application_name: String,
    /// The role they are connected as (empty when the server does not show it).
    pub role: String,
    /// How many.
    pub count: u32,
}

const LIMITS_SQL: &str = "SELECT current_setting('server_version'), \
        current_setting('server_version_num')::int4, \
        current_setting('max_connections')::int4, \
        current_setting('superuser_reserved_connections')::int4, \
        current_setting('reserved_connections', true)::int4, \
        r.rolname::text, r.rolconnlimit, r.rolsuper, \
        coalesce(current_setting('application_name'), '') \
    FROM pg_catalog.pg_roles r WHERE r.rolname = current_user";

// Only client backends occupy `max_connections` slots (autovacuum, background and WAL sender
// processes have their own). Without pg_read_all_stats the server hides `backend_type` of other
// roles' sessions; those with a role are client sessions.
const CONNECTIONS_SQL: &str =
    "SELECT coalesce(application_name, ''), coalesce(usename::text, ''), \
        count(*)::int8 \
    FROM pg_catalog.pg_stat_activity \
    WHERE pid <> pg_backend_pid() \
      AND (backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL)) \
    GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2";

impl ServerLimits {
    /// Reads the limits and the current connections through `conn` (two statements, no
    /// transaction). `conn`'s own backend is left out of [`ServerLimits::connections`].
    pub async fn read(conn: &PooledConnection) -> Result<ServerLimits, Error> {
        let row = conn.query_one(LIMITS_SQL, &[]).await?;
        let count = |v: i32| u32::try_from(v).unwrap_or(0);
        let conn_limit: i32 = row.try_get(6)?;
        let mut limits = ServerLimits {
            server_version: row.try_get(0)?,
            server_version_num: row.try_get(1)?,
            max_connections: count(row.try_get(2)?),
            superuser_reserved_connections: count(row.try_get(3)?),
            reserved_connections: row.try_get::<_, Option<i32>>(4)?.map(count),
            role: row.try_get(5)?,
            role_connection_limit: u32::try_from(conn_limit).ok(),
            role_superuser: row.try_get(7)?,
            application_name: row.try_get(8)?,
            connections: Vec::new(),
        };
        for row in conn.query(CONNECTIONS_SQL, &[]).await? {
            let n: i64 = row.try_get(2)?;
            limits.connections.push(AppConnections {
                application_name: row.try_get(0)?,
                role: row.try_get(1)?,
                count: u32::try_from(n).unwrap_or(u32::MAX),
            });
        }
        Ok(limits)
    }

    /// Slots ordinary applications may use: `max_connections` less the superuser-reserved and
    /// reserved ones.
    pub fn application_slots(&self) -> u32 {
        self.max_connections
            .saturating_sub(self.superuser_reserved_connections)
            .saturating_sub(self.reserved_connections.unwrap_or(0))
    }

    /// Whether `group` is this application's own connections (other instances or services
    /// running this configuration): same non-empty `application_name`, same role. Without an
    /// application name nothing can be told apart, so every other connection counts as another
    /// application's (the cautious choice).
    pub fn is_this_application(&self, group: &AppConnections) -> bool {
        !self.application_name.is_empty()
            && group.application_name == self.application_name
            && group.role == self.role
    }
}

/// What is being sized: one configuration, run by `instances` processes, for `services`
/// services, with `buffer` connections kept spare (the seed's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// Processes or replicas running this configuration (the seed's "workers").
    pub instances: u32,
    /// Services using the database with the same settings (the seed's "API + background tasks").
    pub services: u32,
    /// Connections kept spare for administration, migrations and tools.
    pub buffer: u32,
    /// `DB_POOL_SIZE` of each instance.
    pub pool_size: usize,
    /// `DB_MAX_OVERFLOW` of each instance; `None` for no limit.
    pub max_overflow: Option<usize>,
}

impl Deployment {
    /// The deployment of `settings` run by `instances` processes, one service, no buffer.
    pub fn from_settings(settings: &Settings, instances: u32) -> Deployment {
        Deployment {
            instances,
            services: 1,
            buffer: 0,
            pool_size: settings.pool_size,
            max_overflow: settings.max_overflow,
        }
    }

    /// Connections one instance may open: `pool_size + max_overflow`; `None` when unlimited.
    pub fn per_instance(&self) -> Option<u64> {
        self.max_overflow.map(|o| self.pool_size as u64 + o as u64)
    }

    /// `instances × (pool_size + max_overflow) × services + buffer`; `None` when unlimited.
    pub fn total(&self) -> Option<u64> {
        self.per_instance().map(|c| {
            u64::from(self.instances)
                .saturating_mul(c)
                .saturating_mul(u64::from(self.services))
                .saturating_add(u64::from(self.buffer))
        })
    }
}

/// Per-instance pool settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolSplit {
    /// `DB_POOL_SIZE`.
    pub pool_size: u64,
    /// `DB_MAX_OVERFLOW`.
    pub max_overflow: u64,
}

impl PoolSplit {
    /// `capacity` split 1 : 2 between pool size and overflow, as the seed does (5 + 10 for 15,
    /// 3 + 7 for 10); the pool size is at least 1. `None` for a capacity of 0.
    pub fn seed_ratio(capacity: u64) -> Option<PoolSplit> {
        if capacity == 0 {
            return None;
        }
        let pool_size = (capacity / 3).max(1);
        Some(PoolSplit {
            pool_size,
            max_overflow: capacity - pool_size,
        })
    }
}

/// The seed's rule of thumb for the number of connections a server serves well:
/// `cores × 2 + effective_spindle_count` (1 for an SSD).
pub fn seed_pool_size(db_cores: u32, spindles: u32) -> u32 {
    db_cores.saturating_mul(2).saturating_add(spindles)
}

/// A deployment checked against a server: each term of the sum, what is available, the headroom
/// and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// What was sized.
    pub deployment: Deployment,
    /// `pool_size + max_overflow`; `None` when overflow is unlimited.
    pub per_instance: Option<u64>,
    /// The deployment's total; `None` when overflow is unlimited (it can never be bounded).
    pub required: Option<u64>,
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (0 before PostgreSQL 16).
    pub reserved_connections: u32,
    /// `max_connections` less the reserved slots.
    pub application_slots: u32,
    /// The role's connection limit when it applies (set, and the role is not a superuser).
    pub role_connection_limit: Option<u32>,
    /// Connections other applications hold now (every role).
    pub other_connections: u32,
    /// Of those, the ones under this role (they count against its connection limit).
    pub other_connections_same_role: u32,
    /// Connections this application already holds (part of its own budget, not taken off).
    pub own_connections: u32,
    /// What this deployment may use: the application slots less other applications'
    /// connections, capped by the role's limit less other applications' connections under it.
    pub available: u64,
    /// `available − required`: negative when over budget; `None` when unbounded.
    pub headroom: Option<i64>,
    /// Whether the deployment fits.
    pub within_budget: bool,
    /// The largest `pool_size + max_overflow` per instance that fits with this buffer.
    pub max_per_instance: u64,
    /// Per-instance settings that fit: the current ones when they do, otherwise
    /// [`Budget::max_per_instance`] split 1 : 2. `None` when not even one connection per
    /// instance fits.
    pub recommended: Option<PoolSplit>,
}

impl Budget {
    /// Checks `deployment` against `limits`.
    pub fn compute(deployment: &Deployment, limits: &ServerLimits) -> Budget {
        let mut other = 0u32;
        let mut other_same_role = 0u32;
        let mut own = 0u32;
        for group in &limits.connections {
            if limits.is_this_application(group) {
                own = own.saturating_add(group.count);
            } else {
                other = other.saturating_add(group.count);
                if group.role == limits.role {
                    other_same_role = other_same_role.saturating_add(group.count);
                }
            }
        }
        let slots = limits.application_slots();
        let role_limit = limits
            .role_connection_limit
            .filter(|_| !limits.role_superuser);
        let mut available = u64::from(slots.saturating_sub(other));
        if let Some(limit) = role_limit {
            available = available.min(u64::from(limit.saturating_sub(other_same_role)));
        }
        let required = deployment.total();
        let headroom = required.map(|r| available as i64 - r as i64);
        let within_budget = required.is_some_and(|r| r <= available);
        let shares = u64::from(deployment.instances.max(1)) * u64::from(deployment.services.max(1));
        let max_per_instance = available.saturating_sub(u64::from(deployment.buffer)) / shares;
        let recommended = match (within_budget, deployment.max_overflow) {
            (true, Some(overflow)) => Some(PoolSplit {
                pool_size: deployment.pool_size as u64,
                max_overflow: overflow as u64,
            }),
            _ => PoolSplit::seed_ratio(max_per_instance),
        };
        Budget {
            deployment: *deployment,
            per_instance: deployment.per_instance(),
            required,
            max_connections: limits.max_connections,
            superuser_reserved_connections: limits.superuser_reserved_connections,
            reserved_connections: limits.reserved_connections.unwrap_or(0),
            application_slots: slots,
            role_connection_limit: role_limit,
            other_connections: other,
            other_connections_same_role: other_same_role,
            own_connections: own,
            available,
            headroom,
            within_budget,
            max_per_instance,
            recommended,
        }
    }

    /// One line with the numbers, for a log warning: the sum, what is available and why, and
    /// what would fit.
    pub fn summary(&self) -> String {
        let d = &self.deployment;
        let per_instance = match d.max_overflow {
            Some(o) => format!("({} + {})", d.pool_size, o),
            None => format!("({} + unlimited)", d.pool_size),
        };
        let required = self
            .required
            .map_or_else(|| "unbounded".to_owned(), |r| r.to_string());
        let mut s = format!(
            "{} instance(s) × {per_instance} × {} service(s) + buffer {} = {required} connections; \
             available {} (max_connections {} − {} superuser-reserved",
            d.instances, d.services, d.buffer, self.available, self.max_connections,
            self.superuser_reserved_connections
        );
        if self.reserved_connections > 0 {
            s.push_str(&format!(" − {} reserved", self.reserved_connections));
        }
        s.push_str(&format!(
            " − {} held by other applications",
            self.other_connections
        ));
        if let Some(limit) = self.role_connection_limit {
            s.push_str(&format!("; role connection limit {limit}"));
        }
        s.push(')');
        match self.recommended {
            Some(r) if !self.within_budget => s.push_str(&format!(
                "; fits: DB_POOL_SIZE={} DB_MAX_OVERFLOW={} per instance",
                r.pool_size, r.max_overflow
            )),
            None if !self.within_budget => {
                s.push_str("; not even one connection per instance fits")
            }
            _ => {}
        }
        s
    }
}

/// The budget check `tidepool serve` runs at start-up: this configuration run by `instances`
/// processes (`DB_INSTANCES`, else 1), one service, no buffer, against the server `pool` connects
/// to and each read replica (with the replica pool sizes). Returns the warning to log when the
/// deployment could exceed a server's limit, `None` when it fits everywhere. Uses one connection
/// of each pool for two statements; a replica that cannot be reached is left out (it is not
/// taking connections either).
pub async fn startup_check(pool: &Pool, instances: u32) -> Result<Option<String>, Error> {
    let mut warnings = Vec::new();
    if let Some(warning) = check_one(pool, instances).await? {
        warnings.push(warning);
    }
    for replica in pool.replicas.iter().flat_map(|r| &r.members) {
        if let Ok(Some(warning)) = check_one(&replica.pool, instances).await {
            warnings.push(format!("read replica {}: {warning}", replica.host));
        }
    }
    Ok((!warnings.is_empty()).then(|| warnings.join("; ")))
}

async fn check_one(pool: &Pool, instances: u32) -> Result<Option<String>, Error> {
    let limits = {
        let conn = pool.get().await?;
        ServerLimits::read(&conn).await?
    };
    let budget = Budget::compute(
        &Deployment::from_settings(pool.settings(), instances.max(1)),
        &limits,
    );
    if budget.within_budget {
        return Ok(None);
    }
    Ok(Some(format!(
        "the connection budget could exceed the server's limit: {}",
        budget.summary()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32, reserved: u32, others: &[(&str, &str, u32)]) -> ServerLimits {
        ServerLimits {
            server_version: "15".into(),
            server_version_num: 150000,
            max_connections: max,
            superuser_reserved_connections: reserved,
            reserved_connections: None,
            role: "app".into(),
            role_connection_limit: None,
            role_superuser: false,
            application_name: "api".into(),
            connections: others
                .iter()
                .map(|(a, r, n)| AppConnections {
                    application_name: (*a).into(),
                    role: (*r).into(),
                    count: *n,
                })
                .collect(),
        }
    }

    fn deployment(
        instances: u32,
        services: u32,
        buffer: u32,
        pool: usize,
        overflow: usize,
    ) -> Deployment {
        Deployment {
            instances,
            services,
            buffer,
            pool_size: pool,
            max_overflow: Some(overflow),
        }
    }

    #[test]
    fn seed_examples() {
        // (4 × 5 × 2) + 20 = 60 in the seed counts pool_size only; with overflow 0 it is that.
        assert_eq!(deployment(4, 2, 20, 5, 0).total(), Some(60));
        // 4 workers × (5 + 10) = 60; 4 × (3 + 7) = 40.
        assert_eq!(deployment(4, 1, 0, 5, 10).total(), Some(60));
        assert_eq!(deployment(4, 1, 0, 3, 7).total(), Some(40));
        assert_eq!(
            PoolSplit::seed_ratio(10),
            Some(PoolSplit {
                pool_size: 3,
                max_overflow: 7
            })
        );
        assert_eq!(
            PoolSplit::seed_ratio(15),
            Some(PoolSplit {
                pool_size: 5,
                max_overflow: 10
            })
        );
        assert_eq!(
            PoolSplit::seed_ratio(2),
            Some(PoolSplit {
                pool_size: 1,
                max_overflow: 1
            })
        );
        assert_eq!(PoolSplit::seed_ratio(0), None);
        assert_eq!(seed_pool_size(4, 1), 9);
    }

    #[test]
    fn reserved_slots_and_other_applications_are_taken_off() {
        let l = limits(
            100,
            3,
            &[("other", "app", 7), ("api", "app", 4), ("api", "admin", 2)],
        );
        let b = Budget::compute(&deployment(4, 1, 20, 5, 10), &l);
        // 100 − 3 reserved − (7 + 2) others; "api" under role app is this application.
        assert_eq!(b.application_slots, 97);
        assert_eq!(b.other_connections, 9);
        assert_eq!(b.own_connections, 4);
        assert_eq!(b.available, 88);
        assert_eq!(b.required, Some(80));
        assert_eq!(b.headroom, Some(8));
        assert!(b.within_budget);
        assert_eq!(
            b.recommended,
            Some(PoolSplit {
                pool_size: 5,
                max_overflow: 10
            })
        );
    }

    #[test]
    fn over_budget_recommends_the_largest_split_that_fits() {
        let l = limits(50, 3, &[]);
        let b = Budget::compute(&deployment(4, 1, 20, 5, 10), &l);
        assert!(!b.within_budget);
        assert_eq!(b.headroom, Some(47 - 80));
        // (47 − 20) / 4 = 6 per instance: 2 + 4.
        assert_eq!(b.max_per_instance, 6);
        assert_eq!(
            b.recommended,
            Some(PoolSplit {
                pool_size: 2,
                max_overflow: 4
            })
        );
        assert!(b.summary().contains("= 80 connections"), "{}", b.summary());
    }

    #[test]
    fn role_limit_applies_unless_superuser() {
        let mut l = limits(100, 3, &[("cron", "app", 3)]);
        l.role_connection_limit = Some(10);
        let b = Budget::compute(&deployment(1, 1, 0, 5, 10), &l);
        assert_eq!(b.available, 7);
        assert!(!b.within_budget);
        l.role_superuser = true;
        let b = Budget::compute(&deployment(1, 1, 0, 5, 10), &l);
        assert_eq!(b.role_connection_limit, None);
        assert_eq!(b.available, 94);
        assert!(b.within_budget);
    }

    #[test]
    fn unlimited_overflow_is_never_within_budget() {
        let mut d = deployment(1, 1, 0, 5, 0);
        d.max_overflow = None;
        let b = Budget::compute(&d, &limits(100, 3, &[]));
        assert_eq!(b.required, None);
        assert!(!b.within_budget);
        assert!(b.summary().contains("unbounded"));
    }

    #[test]
    fn without_an_application_name_every_connection_is_another_application() {
        let mut l = limits(100, 3, &[("", "app", 5)]);
        l.application_name.clear();
        let b = Budget::compute(&deployment(1, 1, 0, 5, 10), &l);
        assert_eq!(b.other_connections, 5);
        assert_eq!(b.own_connections, 0);
    }
}
