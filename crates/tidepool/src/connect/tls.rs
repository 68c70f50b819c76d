//! TLS as libpq does it: the `sslmode` decides whether to ask for TLS and how much of the
//! server's certificate to check; the request itself is PostgreSQL's `SSLRequest` followed by a
//! rustls handshake on the same socket.
//!
//! Which certificate checks each mode makes (libpq's rules):
//! - `verify-full`: a chain to a trusted root (`sslrootcert`, `~/.postgresql/root.crt`, or the
//!   system's roots) and the host name in the certificate's subject alternative names.
//! - `verify-ca`: the chain only.
//! - `require`, `prefer`, `allow`: the chain only when a root certificate file exists (given, or
//!   libpq's default path), otherwise none (encryption without authentication of the server).
//!
//! Certificate problems are final: they say what failed and are never retried.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Failure;
use crate::settings::SettingsError;
use crate::url::{RootCert, SslMode, TlsParams};

/// A TLS connection to the server.
pub(crate) type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How connections of one pool use TLS: the mode and, unless it is `disable`, the rustls
/// configuration with the verification that mode calls for.
pub(crate) struct TlsPolicy {
    pub(crate) mode: SslMode,
    config: Option<Arc<ClientConfig>>,
    /// What the certificate was checked against, for error messages.
    roots: Arc<str>,
}

/// The server's answer to the TLS request.
pub(crate) enum Negotiated {
    /// TLS is up.
    Tls(Box<TlsStream>),
    /// The server does not do TLS (`N`): the same socket continues in plaintext.
    Refused(TcpStream),
}

/// What a cancel request needs to reach the server the way its connection did.
#[derive(Clone)]
pub(crate) struct TlsResume {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsPolicy {
    /// The policy for the URL's TLS parameters. Reads the root certificates and the client
    /// certificate now, so a missing or unreadable file stops the pool from being built.
    pub(crate) fn new(params: &TlsParams) -> Result<TlsPolicy, SettingsError> {
        let mode = params.mode;
        if mode == SslMode::Disable {
            return Ok(TlsPolicy {
                mode,
                config: None,
                roots: "".into(),
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let default_file = |name: &str| home.as_ref().map(|h| h.join(".postgresql").join(name));
        let roots = match &params.root_cert {
            Some(RootCert::System) => Some((system_roots()?, Arc::from("the system's roots"))),
            Some(RootCert::File(path)) => Some((file_roots(path)?, describe_file(path))),
            // libpq's default file, used only when it exists.
            None => match default_file("root.crt").filter(|p| p.exists()) {
                Some(path) => Some((file_roots(&path)?, describe_file(&path))),
                None => None,
            },
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots.as_ref()) {
            (SslMode::VerifyFull, Some((store, _))) => web_pki(store, &provider)?,
            (_, Some((store, _))) => Arc::new(ChainOnly(web_pki(store, &provider)?)),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                let path = default_file("root.crt")
                    .map_or_else(|| "~/.postgresql/root.crt".to_owned(), show_path);
                return Err(SettingsError::File {
                    parameter: "sslrootcert".into(),
                    path,
                    reason: format!(
                        "the file does not exist: sslmode={} checks the server's certificate \
                         against it (give sslrootcert=FILE, sslrootcert=system, or a weaker \
                         sslmode)",
                        mode.as_str()
                    ),
                });
            }
            (_, None) => Arc::new(Unverified(provider.clone())),
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_setting("sslmode", mode.as_str(), e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let cert = match &params.cert {
            Some(path) => Some(path.clone()),
            None => default_file("postgresql.crt").filter(|p| p.exists()),
        };
        let mut config = match cert {
            Some(cert) => {
                let key = match &params.key {
                    Some(path) => path.clone(),
                    None => match default_file("postgresql.key") {
                        Some(path) => path,
                        None => return Err(tls_setting("sslkey", "", "no file given".into())),
                    },
                };
                let (chain, key) = client_identity(&cert, &key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_setting("sslkey", &show_path(cert), e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = params.sni;
        // As libpq 17 does; servers before 17 ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(TlsPolicy {
            mode,
            config: Some(Arc::new(config)),
            roots: roots.map_or_else(|| "".into(), |(_, desc)| desc),
        })
    }

    /// Asks the server for TLS on `tcp` (`SSLRequest`) and, when it agrees, does the handshake.
    /// `host` is the name the URL gave (checked by `verify-full`, sent as SNI), `ip` the
    /// address connected to (the name used when the URL gave only an address).
    pub(crate) async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: Option<&str>,
        ip: IpAddr,
    ) -> Result<(Negotiated, Option<TlsResume>), Failure> {
        let Some(config) = &self.config else {
            return Ok((Negotiated::Refused(tcp), None));
        };
        let name = self.server_name(host, ip)?;
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        tcp.write_all(&request)
            .await
            .map_err(|e| Failure::io("sending the TLS request", e))?;
        // Exactly one byte: anything the server sent after it before the handshake would be
        // unauthenticated plaintext (CVE-2021-23222), and the handshake rejects it.
        let answer = tcp
            .read_u8()
            .await
            .map_err(|e| Failure::io("reading the answer to the TLS request", e))?;
        match answer {
            b'S' => {}
            b'N' => return Ok((Negotiated::Refused(tcp), None)),
            // What a postmaster that cannot start a backend (fork failure, shutdown) sends; the
            // text itself came before any authentication, so it is not shown.
            b'E' => {
                return Err(Failure::io(
                    "asking for TLS",
                    io::Error::other("the server answered the TLS request with an error"),
                ))
            }
            other => {
                return Err(Failure::protocol(format!(
                    "the server answered the TLS request with byte {other:#04x}: not a \
                     PostgreSQL server"
                )))
            }
        }
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match connector.connect(name.clone(), tcp).await {
            Ok(stream) => Ok((
                Negotiated::Tls(Box::new(stream)),
                Some(TlsResume {
                    config: config.clone(),
                    name,
                }),
            )),
            Err(e) => Err(self.handshake_failed(e, host.map_or(ip.to_string(), str::to_owned))),
        }
    }

    /// The name the handshake uses: the URL's host name (or IP address); only an address given
    /// by `hostaddr` without a host name when the certificate's names are not checked.
    fn server_name(&self, host: Option<&str>, ip: IpAddr) -> Result<ServerName<'static>, Failure> {
        match host {
            Some(host) => ServerName::try_from(host.to_owned()).map_err(|_| {
                Failure::tls(format!(
                    "{host:?} is not a host name a TLS certificate can be checked against"
                ))
            }),
            None if self.mode == SslMode::VerifyFull => Err(Failure::tls(
                "sslmode=verify-full needs a host name to check the certificate against (the URL \
                 gives only hostaddr)"
                    .into(),
            )),
            None => Ok(ServerName::IpAddress(ip.into())),
        }
    }

    /// Why the handshake failed, in words: certificate problems and a server's alert are final;
    /// a transport failure is not.
    fn handshake_failed(&self, e: io::Error, host: String) -> Failure {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Failure::Io {
                during: "during the TLS handshake",
                error: e,
            };
        };
        let roots = &self.roots;
        let why = match tls {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => format!(
                    "the server's certificate is not trusted: no certificate in {roots} issued it \
                     (sslmode={})",
                    self.mode.as_str()
                ),
                CertificateError::NotValidForName => {
                    format!("the server's certificate does not match host name {host:?}")
                }
                CertificateError::NotValidForNameContext { presented, .. } => format!(
                    "the server's certificate does not match host name {host:?} (it is for {})",
                    presented.join(", ")
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is not valid yet".to_owned()
                }
                other => format!("the server's certificate was rejected: {other:?}"),
            },
            _ => return Failure::io("during the TLS handshake", e),
        };
        Failure::tls(why)
    }
}

impl TlsResume {
    /// TLS on a fresh socket to the same server, as the connection had it (for cancel
    /// requests, which PostgreSQL accepts inside TLS).
    pub(crate) async fn resume(&self, mut tcp: TcpStream) -> io::Result<TlsStream> {
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        if tcp.read_u8().await? != b'S' {
            return Err(io::Error::other("the server no longer accepts TLS"));
        }
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
    }
}

/// The `tls-server-end-point` channel binding data of a TLS connection (RFC 5929): the hash of
/// the server's certificate with its signature's hash function, SHA-256 for MD5 and SHA-1.
/// `None` when the certificate's signature algorithm has no such hash (Ed25519, RSASSA-PSS).
pub(crate) fn server_end_point(stream: &TlsStream) -> Option<Vec<u8>> {
    use x509_cert::der::Decode;
    let cert = stream.get_ref().1.peer_certificates()?.first()?;
    let parsed = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let oid = parsed.signature_algorithm.oid.to_string();
    Some(match oid.as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => sha2::Sha256::digest(cert).to_vec(),
        // sha384WithRSA, ecdsa-with-SHA384.
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert).to_vec(),
        // sha512WithRSA, ecdsa-with-SHA512.
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert).to_vec(),
        _ => return None,
    })
}

/// Verifies the chain to a trusted root but not the host name (`verify-ca`, and `require` with
/// a root file): a certificate for another name is accepted, anything else is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accepts any certificate (libpq's `require`/`prefer`/`allow` without a root file: the
/// connection is encrypted, the server unauthenticated), while still checking that the server
/// holds the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn web_pki(
    roots: &RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, SettingsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider.clone())
        .build()
        .map_err(|e| tls_setting("sslrootcert", "", e.to_string()))
}

fn system_roots() -> Result<RootCertStore, SettingsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(tls_setting(
            "sslrootcert",
            "system",
            format!("the system's root certificates could not be loaded: {why}"),
        ));
    }
    Ok(store)
}

fn file_roots(path: &Path) -> Result<RootCertStore, SettingsError> {
    let fail = |reason: String| tls_setting("sslrootcert", &show_path(path), reason);
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| fail(format!("is not PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| fail(format!("holds a certificate rustls cannot use: {e}")))?;
    }
    if store.is_empty() {
        return Err(fail("holds no PEM certificate".into()));
    }
    Ok(store)
}

/// The client certificate chain and its key; the key file must not be readable by others
/// (libpq's rule: 0600, or 0640 when owned by root).
fn client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), SettingsError> {
    let cert_text = show_path(cert);
    let bytes = std::fs::read(cert)
        .map_err(|e| tls_setting("sslcert", &cert_text, format!("cannot be read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_setting("sslcert", &cert_text, format!("is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(tls_setting(
            "sslcert",
            &cert_text,
            "holds no PEM certificate".into(),
        ));
    }
    let key_text = show_path(key);
    check_key_permissions(key).map_err(|reason| tls_setting("sslkey", &key_text, reason))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_setting(
            "sslkey",
            &key_text,
            format!("is not an unencrypted PEM private key: {e}"),
        )
    })?;
    Ok((chain, key))
}

#[cfg(unix)]
fn check_key_permissions(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(format!(
            "has group or world access (mode {mode:o}): it must be u=rw (0600) or less, or \
             u=rw,g=r (0640) or less if owned by root"
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_: &Path) -> Result<(), String> {
    Ok(())
}

fn tls_setting(parameter: &str, path: &str, reason: String) -> SettingsError {
    SettingsError::File {
        parameter: parameter.into(),
        path: path.into(),
        reason,
    }
}

fn show_path(path: impl AsRef<Path>) -> String {
    path.as_ref().display().to_string()
}

fn describe_file(path: &Path) -> Arc<str> {
    format!("sslrootcert {}", path.display()).into()
}
