//! The embedded default database: with no `DATABASE_URL`, `serve` and `bench` start a throwaway
//! PostgreSQL from the installed server binaries and remove it on exit.

use tidepool::{DatabaseUrl, Settings};
use tidepool_cluster::Cluster;

/// The database a command runs against. Holding it keeps an embedded cluster alive; dropping it
/// stops the cluster and removes its data directory.
pub struct Database {
    /// The settings, with `database_url` filled in.
    pub settings: Settings,
    /// The embedded cluster, when `DATABASE_URL` was unset.
    pub cluster: Option<Cluster>,
}

/// Uses `DATABASE_URL` when set; otherwise starts an embedded cluster and points the settings
/// at it. The error is a message for the user (what is missing and how to fix it).
pub fn resolve(mut settings: Settings) -> Result<Database, String> {
    if settings.database_url.is_some() {
        return Ok(Database {
            settings,
            cluster: None,
        });
    }
    let cluster = Cluster::start().map_err(|e| {
        format!("DATABASE_URL is not set and the embedded PostgreSQL could not start: {e}")
    })?;
    let url = DatabaseUrl::parse(&cluster.url())
        .map_err(|e| format!("the embedded PostgreSQL gave an unusable URL: {e}"))?;
    tracing::info!(
        url = %url,
        data_dir = %cluster.data_dir().display(),
        "DATABASE_URL not set: started an embedded PostgreSQL (removed on exit)"
    );
    settings.database_url = Some(url);
    Ok(Database {
        settings,
        cluster: Some(cluster),
    })
}
