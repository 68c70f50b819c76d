//! TLS for test clusters (feature `tls`): a certificate authority made at run
//! time, the server and client certificates it signs, and the per-cluster
//! setup behind [`ClusterBuilder::tls`](crate::ClusterBuilder::tls).
//!
//! Keys are ECDSA P-256; certificates are valid from yesterday (tolerates
//! clock skew) to a year from now. Nothing here is meant for production.
//!
//! ```no_run
//! use tidepool_cluster::{tls::TlsMode, Cluster};
//!
//! let cluster = Cluster::builder().tls(TlsMode::Only).start()?;
//! let tls = cluster.tls().expect("a TLS cluster");
//! let (cert, key) = tls.client_cert(cluster.user())?;
//! println!(
//!     "host=localhost port={} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
//!     cluster.port(),
//!     tls.ca_cert_path().display(),
//!     cert.display(),
//!     key.display(),
//! );
//! # Ok::<(), tidepool_cluster::ClusterError>(())
//! ```

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::setup::{io_err, Env};
use crate::{ClusterError, HOST};

/// Common name of the per-process CA behind every TLS cluster.
const SHARED_CA_NAME: &str = "tidepool-cluster test CA";

/// A certificate authority created at run time, for signing test certificates.
///
/// Every TLS cluster of a process uses [`Ca::shared`]; make another with
/// [`Ca::new`] for "certificate from the wrong CA" tests.
pub struct Ca {
    common_name: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA with a fresh key and subject `CN=common_name`.
    pub fn new(common_name: &str) -> Result<Ca, ClusterError> {
        let make = || -> Result<Ca, rcgen::Error> {
            let mut params = params(common_name, &[])?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            Ok(Ca {
                common_name: common_name.to_owned(),
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            })
        };
        make().map_err(|e| cert_err(format!("creating the CA {common_name:?}"), e))
    }

    /// The process-wide CA that signs every TLS cluster's server certificate,
    /// created on first use. Trust it to verify any of this process's clusters.
    pub fn shared() -> Result<&'static Ca, ClusterError> {
        static SHARED: OnceLock<Ca> = OnceLock::new();
        if let Some(ca) = SHARED.get() {
            return Ok(ca);
        }
        // Two threads racing here both make a CA; the first stored wins.
        let ca = Ca::new(SHARED_CA_NAME)?;
        Ok(SHARED.get_or_init(|| ca))
    }

    /// The subject common name given to [`Ca::new`].
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The CA certificate, PEM-encoded (what clients put in `sslrootcert`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes [`cert_pem`](Ca::cert_pem) to `path` (mode 0644).
    pub fn write_cert(&self, path: &Path) -> Result<(), ClusterError> {
        write_file(path, &self.cert_pem, 0o644)
    }

    /// A server certificate for `names` (its subject alternative names: entries
    /// that parse as an IP address become IP SANs, the rest DNS names), with
    /// the first name as common name. Extended key usage: server auth.
    pub fn server_cert(&self, names: &[&str]) -> Result<Issued, ClusterError> {
        let common_name = names.first().copied().unwrap_or("localhost");
        self.issue(common_name, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with subject `CN=common_name`: the PostgreSQL role
    /// it authenticates as under `clientcert=verify-full`. Extended key usage:
    /// client auth.
    pub fn client_cert(&self, common_name: &str) -> Result<Issued, ClusterError> {
        self.issue(common_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Issued, ClusterError> {
        let make = || -> Result<Issued, rcgen::Error> {
            let mut params = params(common_name, names)?;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &self.issuer)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        };
        make().map_err(|e| cert_err(format!("issuing a certificate for {common_name:?}"), e))
    }
}

/// Subject `CN=common_name`, SANs `names`, valid from yesterday for a year.
fn params(common_name: &str, names: &[&str]) -> Result<CertificateParams, rcgen::Error> {
    let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365);
    Ok(params)
}

/// A certificate and its private key, both PEM-encoded (the key as PKCS#8).
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// Writes `dir/STEM.crt` (mode 0644) and `dir/STEM.key` (mode 0600, which
    /// libpq and the server require of a key file), replacing existing files.
    /// Returns both paths: (certificate, key).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), ClusterError> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem, 0o644)?;
        write_file(&key, &self.key_pem, 0o600)?;
        Ok((cert, key))
    }
}

/// How a TLS cluster treats TCP connections (the unix socket stays plaintext, `trust`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS offered, plaintext accepted too (`host ... scram-sha-256`).
    Optional,
    /// TLS required (`hostssl ... scram-sha-256`): a plaintext connection
    /// fails with "no pg_hba.conf entry ... no encryption".
    Only,
    /// TLS and a client certificate signed by the cluster's CA whose common
    /// name is the role, on top of the password
    /// (`hostssl ... scram-sha-256 clientcert=verify-full`).
    ClientCert,
}

impl TlsMode {
    /// The cluster's pg_hba.conf for this mode. Replication connections (of
    /// standbys, see [`Cluster::standby`](crate::Cluster::standby)) follow the
    /// same rule as the others.
    fn pg_hba(self) -> String {
        let (kind, options) = match self {
            TlsMode::Optional => ("host   ", ""),
            TlsMode::Only => ("hostssl", ""),
            TlsMode::ClientCert => ("hostssl", " clientcert=verify-full"),
        };
        format!(
            "# written by tidepool-cluster, TLS mode {self:?}\n\
             local   all         all trust\n\
             local   replication all trust\n\
             {kind} all         all 127.0.0.1/32 scram-sha-256{options}\n\
             {kind} replication all 127.0.0.1/32 scram-sha-256{options}\n"
        )
    }
}

/// postgresql.conf settings of a TLS cluster; the files are in the data dir.
pub(crate) const SERVER_SETTINGS: [(&str, &str); 4] = [
    ("ssl", "on"),
    ("ssl_cert_file", "server.crt"),
    ("ssl_key_file", "server.key"),
    ("ssl_ca_file", "root.crt"),
];

/// The TLS side of a cluster started with [`ClusterBuilder::tls`](crate::ClusterBuilder::tls).
#[derive(Debug)]
pub struct ClusterTls {
    mode: TlsMode,
    ca: &'static Ca,
    /// The cluster's directory (next to `data/`), where client files go.
    dir: PathBuf,
    ca_cert_path: PathBuf,
    clients: AtomicU32,
}

impl ClusterTls {
    /// Writes the server certificate, key, CA certificate and pg_hba.conf into
    /// `data_dir` (owned by the server user) and the CA certificate into `dir`
    /// for clients.
    pub(crate) fn install(
        mode: TlsMode,
        env: &Env,
        dir: &Path,
        data_dir: &Path,
    ) -> Result<ClusterTls, ClusterError> {
        let ca = Ca::shared()?;
        let (cert, key) = ca
            .server_cert(&["localhost", HOST])?
            .write(data_dir, "server")?;
        let root = data_dir.join("root.crt");
        ca.write_cert(&root)?;
        let hba = data_dir.join("pg_hba.conf");
        write_file(&hba, &mode.pg_hba(), 0o600)?;
        for path in [&cert, &key, &root, &hba] {
            env.chown(path)?;
        }
        // Outside the data dir, owned by us: `dir` is 0700 and owned by the
        // server user, which is us unless we are root (who can read it anyway).
        let ca_cert_path = dir.join("ca.crt");
        ca.write_cert(&ca_cert_path)?;
        Ok(ClusterTls {
            mode,
            ca,
            dir: dir.to_owned(),
            ca_cert_path,
            clients: AtomicU32::new(0),
        })
    }

    /// The mode the cluster was started with.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The CA that signed the server certificate (and signs [`client_cert`](ClusterTls::client_cert)s):
    /// [`Ca::shared`].
    pub fn ca(&self) -> &Ca {
        self.ca
    }

    /// The CA certificate as a file readable by this process, for
    /// `sslrootcert` (verify-ca, verify-full). Removed with the cluster.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    /// Writes a new client certificate for `CN=common_name` (the role to
    /// connect as) and its key (mode 0600, owned by this process) next to
    /// [`ca_cert_path`](ClusterTls::ca_cert_path), for `sslcert`/`sslkey`.
    /// Returns (certificate, key); each call writes new files.
    pub fn client_cert(&self, common_name: &str) -> Result<(PathBuf, PathBuf), ClusterError> {
        let n = self.clients.fetch_add(1, Ordering::Relaxed) + 1;
        let safe: String = common_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.ca
            .client_cert(common_name)?
            .write(&self.dir, &format!("client-{n}-{safe}"))
    }
}

/// Writes `text` to `path` with permission bits `mode`, replacing it.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), ClusterError> {
    let err = |e| io_err(format!("writing {}", path.display()), e);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    // `mode` applies only when the file is created (and through the umask).
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)
}

fn cert_err(context: String, source: rcgen::Error) -> ClusterError {
    ClusterError::Certificate {
        context,
        source: Box::new(source),
    }
}

/// `path` as a URL query value (`?sslrootcert=...`): percent-encoded except for `/` and the
/// unreserved characters, so a path with spaces or `&` survives the URL.
pub fn url_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'.' | b'_' | b'~' => {
                out.push(*b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
