//! pgbench on the same cluster: the server's own ceiling for `SELECT 1` with 10 connections, in
//! the simple and the prepared protocol (`pgbench -n -c 10 -j 2 -T S -M MODE -f select1.sql`).

use std::path::PathBuf;
use std::process::Command;

use crate::systems::Target;

pub struct PgbenchResult {
    pub ops: u64,
    pub wall_s: f64,
    pub tps: f64,
    pub latency_avg_us: f64,
}

/// `$TIDEPOOL_PG_BIN/pgbench`, else the highest `/usr/lib/postgresql/*/bin/pgbench`, else
/// `pgbench` on `$PATH`.
fn binary() -> PathBuf {
    if let Some(dir) = std::env::var_os("TIDEPOOL_PG_BIN") {
        let p = PathBuf::from(dir).join("pgbench");
        if p.exists() {
            return p;
        }
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let p = e.path().join("bin/pgbench");
            if p.exists() && best.as_ref().is_none_or(|(b, _)| v > *b) {
                best = Some((v, p));
            }
        }
    }
    best.map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// Runs pgbench for `secs` seconds with `clients` connections; `mode` is `simple` or `prepared`.
pub fn run(
    target: &Target,
    mode: &str,
    clients: u32,
    secs: u32,
    app: &str,
) -> Result<PgbenchResult, String> {
    let dir = std::env::temp_dir().join(format!("peers-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let script = dir.join("select1.sql");
    std::fs::write(&script, "SELECT 1;\n").map_err(|e| e.to_string())?;
    let bin = binary();
    let out = Command::new(&bin)
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
        ])
        .args(["-M", mode, "-f"])
        .arg(&script)
        .args([
            "-h",
            &target.host,
            "-p",
            &target.port.to_string(),
            "-U",
            &target.user,
        ])
        .arg(&target.dbname)
        .env("PGPASSWORD", &target.password)
        .env("PGAPPNAME", app)
        .envs(match &target.tls {
            // --tls: libpq verifies the server as tidepool's verify-full does (over OpenSSL).
            Some(t) => vec![
                ("PGSSLMODE", "verify-full".to_owned()),
                ("PGSSLROOTCERT", t.ca_path.display().to_string()),
            ],
            None => vec![("PGSSLMODE", "disable".to_owned())],
        })
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (install postgresql-contrib / the server package)",
                bin.display()
            )
        })?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}{}",
            bin.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let ops = field("number of transactions actually processed:")
        .ok_or("no transaction count in pgbench output")? as u64;
    let tps = field("tps =").ok_or("no tps in pgbench output")?;
    let latency_ms = field("latency average =").unwrap_or(f64::NAN);
    Ok(PgbenchResult {
        ops,
        wall_s: if tps > 0.0 {
            ops as f64 / tps
        } else {
            secs as f64
        },
        tps,
        latency_avg_us: latency_ms * 1000.0,
    })
}
