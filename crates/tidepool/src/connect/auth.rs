//! Authentication, done by the pool for every method tokio-postgres supports: trust, cleartext
//! password, md5, and SCRAM-SHA-256 (with `-PLUS` channel binding over TLS).
//!
//! SCRAM makes the client derive `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, i)`. The
//! salt and round count are the server's, fixed for a role until its password changes, so every
//! connection a pool opens derives the same keys. tokio-postgres derives them afresh for each
//! connection (about 1.3 ms of CPU here, most of a connection's client-side cost); the pool
//! derives them once ([`KeyCache`]), on a blocking thread so the async workers keep serving.
//!
//! The exchange is checked as strictly as libpq checks it: the server's nonce must extend ours,
//! its round count is capped, and after the client's proof only `AuthenticationSASLFinal` with a
//! verifying signature (or an error) is accepted. `channel_binding=require` refuses any server
//! that did not authenticate with SCRAM-SHA-256-PLUS.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use fallible_iterator::FallibleIterator as _;
use hmac::{Hmac, KeyInit, Mac};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::ChannelBinding;

use super::startup::Exchange;
use super::Failure;

type HmacSha256 = Hmac<Sha256>;

/// The most PBKDF2 rounds a server may ask for (postgres-protocol's and pgjdbc's cap): the count
/// comes from the server, and an absurd one would pin a CPU for minutes.
const MAX_ROUNDS: u32 = 100_000;

/// What authentication needs from the pool.
pub(crate) struct Credentials<'a> {
    pub(crate) user: &'a str,
    pub(crate) password: Option<&'a [u8]>,
    pub(crate) channel_binding: ChannelBinding,
    pub(crate) keys: &'a KeyCache,
}

/// The TLS channel the exchange runs on, for SCRAM's channel binding.
pub(crate) enum Channel {
    /// No TLS.
    Plain,
    /// TLS, with the `tls-server-end-point` data when the certificate allows it.
    Tls(Option<Vec<u8>>),
}

/// Authenticates after the start-up message. On success `AuthenticationOk` is left at the front
/// of `ex.input`; when the server refuses (an `ErrorResponse`), `Err(Failure::Refused)` and the
/// error is left there for [`super::startup::decode`].
pub(crate) async fn authenticate<S>(
    ex: &mut Exchange<S>,
    creds: &Credentials<'_>,
    channel: &Channel,
) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let require_binding = creds.channel_binding == ChannelBinding::Require;
    let without_binding = || {
        Failure::protocol(
            "channel_binding=require, but the server authenticated without channel binding \
             (SCRAM-SHA-256-PLUS)"
                .into(),
        )
    };
    match ex.peek().await? {
        Message::AuthenticationOk if require_binding => Err(without_binding()),
        Message::AuthenticationOk => Ok(()),
        Message::ErrorResponse(_) => Err(Failure::Refused),
        Message::AuthenticationCleartextPassword | Message::AuthenticationMd5Password(_)
            if require_binding =>
        {
            Err(without_binding())
        }
        Message::AuthenticationCleartextPassword => {
            ex.consume();
            let password = creds.password.ok_or_else(no_password)?;
            frontend::password_message(password, &mut ex.output).map_err(unencodable)?;
            ex.send().await?;
            expect_ok(ex).await
        }
        Message::AuthenticationMd5Password(body) => {
            ex.consume();
            let password = creds.password.ok_or_else(no_password)?;
            let hash = md5_hash(creds.user.as_bytes(), password, body.salt());
            frontend::password_message(hash.as_bytes(), &mut ex.output).map_err(unencodable)?;
            ex.send().await?;
            expect_ok(ex).await
        }
        Message::AuthenticationSasl(body) => {
            let mut plain = false;
            let mut plus = false;
            let mut mechanisms = body.mechanisms();
            while let Ok(Some(m)) = mechanisms.next() {
                plain |= m == SCRAM_SHA_256;
                plus |= m == SCRAM_SHA_256_PLUS;
            }
            ex.consume();
            scram(ex, creds, channel, plain, plus).await?;
            expect_ok(ex).await
        }
        Message::AuthenticationKerberosV5
        | Message::AuthenticationScmCredential
        | Message::AuthenticationGss
        | Message::AuthenticationSspi => Err(Failure::protocol(
            "the server asks for an authentication method tidepool does not support \
             (GSSAPI, SSPI or Kerberos)"
                .into(),
        )),
        _ => Err(Failure::protocol(
            "the server's first answer is not an authentication request: is this port a \
             PostgreSQL server?"
                .into(),
        )),
    }
}

/// After the credentials: `AuthenticationOk` (left in place) or the server's refusal.
async fn expect_ok<S: AsyncRead + AsyncWrite + Unpin>(ex: &mut Exchange<S>) -> Result<(), Failure> {
    match ex.peek().await? {
        Message::AuthenticationOk => Ok(()),
        Message::ErrorResponse(_) => Err(Failure::Refused),
        _ => Err(Failure::protocol(
            "the server sent an unexpected message during authentication".into(),
        )),
    }
}

fn no_password() -> Failure {
    Failure::protocol("the server asks for a password, and the URL gives none".into())
}

fn unencodable(_: std::io::Error) -> Failure {
    Failure::protocol("the password cannot be sent (it contains a NUL byte)".into())
}

/// The SCRAM-SHA-256 exchange (RFC 5802, RFC 7677), with `-PLUS` channel binding when the
/// connection is TLS and the server offers it (libpq's choice of gs2 header: `p` when binding,
/// `y` when this client could bind but the server offered no `-PLUS`, `n` without TLS).
async fn scram<S>(
    ex: &mut Exchange<S>,
    creds: &Credentials<'_>,
    channel: &Channel,
    plain: bool,
    plus: bool,
) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let password = creds.password.ok_or_else(no_password)?;
    let binding_allowed = creds.channel_binding != ChannelBinding::Disable;
    let end_point = match channel {
        Channel::Tls(Some(hash)) if binding_allowed && plus => Some(hash.as_slice()),
        _ => None,
    };
    if plus && matches!(channel, Channel::Plain) {
        return Err(Failure::protocol(
            "the server offered SCRAM-SHA-256-PLUS over a connection without TLS".into(),
        ));
    }
    let (mechanism, gs2) = match (end_point, channel) {
        (Some(_), _) => (SCRAM_SHA_256_PLUS, "p=tls-server-end-point,,"),
        (None, _) if creds.channel_binding == ChannelBinding::Require => {
            return Err(Failure::protocol(
                "channel_binding=require, but the server offers no SCRAM-SHA-256-PLUS (or its \
                 certificate's signature algorithm has no channel-binding hash)"
                    .into(),
            ))
        }
        (None, _) if !plain => {
            return Err(Failure::protocol(
                "the server offers no SASL mechanism tidepool can use".into(),
            ))
        }
        (None, Channel::Tls(Some(_))) if binding_allowed => (SCRAM_SHA_256, "y,,"),
        (None, _) => (SCRAM_SHA_256, "n,,"),
    };
    // 18 random bytes, as libpq uses.
    let mut raw = [0u8; 18];
    getrandom::fill(&mut raw)
        .map_err(|_| Failure::protocol("no randomness for the SCRAM nonce".into()))?;
    let nonce = B64.encode(raw);
    // The user name goes in the start-up message; PostgreSQL ignores the one in SCRAM.
    let client_first_bare = format!("n=,r={nonce}");
    let initial = format!("{gs2}{client_first_bare}");
    frontend::sasl_initial_response(mechanism, initial.as_bytes(), &mut ex.output)
        .map_err(unencodable)?;
    ex.send().await?;

    let server_first = match ex.peek().await? {
        Message::AuthenticationSaslContinue(body) => std::str::from_utf8(body.data())
            .map_err(|_| malformed())?
            .to_owned(),
        Message::ErrorResponse(_) => return Err(Failure::Refused),
        _ => return Err(unexpected()),
    };
    ex.consume();
    let first = ServerFirst::parse(&server_first, &nonce)?;
    let keys = creds.keys.get(password, &first.salt, first.rounds).await?;

    let mut cbind = gs2.as_bytes().to_vec();
    if let Some(hash) = end_point {
        cbind.extend_from_slice(hash);
    }
    let client_final_bare = format!("c={},r={}", B64.encode(&cbind), first.nonce);
    let auth_message = format!("{client_first_bare},{server_first},{client_final_bare}");
    let signature = hmac(&keys.stored_key, auth_message.as_bytes());
    let mut proof = keys.client_key;
    for (p, s) in proof.iter_mut().zip(signature) {
        *p ^= s;
    }
    let client_final = format!("{client_final_bare},p={}", B64.encode(proof));
    frontend::sasl_response(client_final.as_bytes(), &mut ex.output).map_err(unencodable)?;
    ex.send().await?;

    // Only the server's proof (or a refusal) may follow: an `AuthenticationOk` without it
    // would let a server that does not know the password in.
    let verified = match ex.peek().await? {
        Message::AuthenticationSaslFinal(body) => body
            .data()
            .strip_prefix(b"v=")
            .and_then(|v| B64.decode(v).ok())
            .is_some_and(|v| {
                let mut mac = HmacSha256::new_from_slice(&keys.server_key)
                    .expect("HMAC takes keys of any length");
                mac.update(auth_message.as_bytes());
                mac.verify_slice(&v).is_ok()
            }),
        Message::ErrorResponse(_) => return Err(Failure::Refused),
        _ => {
            return Err(Failure::protocol(
                "the server ended the SCRAM exchange without proving it knows the password".into(),
            ))
        }
    };
    if !verified {
        return Err(Failure::protocol(
            "the server's SCRAM-SHA-256 signature did not verify".into(),
        ));
    }
    ex.consume();
    Ok(())
}

fn malformed() -> Failure {
    Failure::protocol("the server's SCRAM-SHA-256 message is malformed".into())
}

fn unexpected() -> Failure {
    Failure::protocol("the server sent an unexpected message during authentication".into())
}

/// The server's first SCRAM message: `r=<nonce>,s=<salt>,i=<rounds>`.
struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    rounds: u32,
}

impl<'a> ServerFirst<'a> {
    fn parse(message: &'a str, client_nonce: &str) -> Result<Self, Failure> {
        let mut parts = message.split(',');
        let (Some(r), Some(s), Some(i)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed());
        };
        let (Some(nonce), Some(salt), Some(rounds)) = (
            r.strip_prefix("r="),
            s.strip_prefix("s=").and_then(|s| B64.decode(s).ok()),
            i.strip_prefix("i=").and_then(|i| i.parse::<u32>().ok()),
        ) else {
            return Err(malformed());
        };
        // The server's nonce extends ours; a bare echo or another nonce is not a SCRAM server.
        if nonce.len() <= client_nonce.len() || !nonce.starts_with(client_nonce) || rounds == 0 {
            return Err(malformed());
        }
        if rounds > MAX_ROUNDS {
            return Err(Failure::protocol(format!(
                "the server asks for {rounds} SCRAM iterations, more than the {MAX_ROUNDS} \
                 tidepool accepts"
            )));
        }
        Ok(ServerFirst {
            nonce,
            salt,
            rounds,
        })
    }
}

/// The SCRAM keys of one password for one (salt, rounds). Worth as much as the password, which
/// the pool holds anyway; never logged or shown.
struct Keys {
    salt: Vec<u8>,
    rounds: u32,
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Keys {
    fn derive(password: &[u8], salt: Vec<u8>, rounds: u32) -> Keys {
        // SASLprep as PostgreSQL does: a password that is not valid UTF-8 or not preparable is
        // used as it is.
        let prepared = std::str::from_utf8(password)
            .ok()
            .and_then(|p| stringprep::saslprep(p).ok());
        let password = prepared.as_deref().map_or(password, str::as_bytes);
        let salted: [u8; 32] = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, &salt, rounds);
        let client_key = hmac(&salted, b"Client Key");
        Keys {
            salt,
            rounds,
            stored_key: Sha256::digest(client_key).into(),
            client_key,
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The pool's derived SCRAM keys. Connections opened at once wait for the first derivation
/// rather than each doing it; a server that changes the salt (a new password) gets new keys.
#[derive(Default)]
pub(crate) struct KeyCache(tokio::sync::Mutex<Option<Arc<Keys>>>);

impl KeyCache {
    async fn get(&self, password: &[u8], salt: &[u8], rounds: u32) -> Result<Arc<Keys>, Failure> {
        let mut slot = self.0.lock().await;
        if let Some(keys) = &*slot {
            if keys.salt == salt && keys.rounds == rounds {
                return Ok(keys.clone());
            }
        }
        // Thousands of HMAC rounds: off the async workers.
        let (password, salt) = (password.to_vec(), salt.to_vec());
        let keys = tokio::task::spawn_blocking(move || Keys::derive(&password, salt, rounds))
            .await
            .map(Arc::new)
            .map_err(|_| Failure::protocol("the SCRAM key derivation did not finish".into()))?;
        *slot = Some(keys.clone());
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's test vector: user "user", password "pencil".
    #[test]
    fn rfc7677_proof_and_server_signature() {
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let first = ServerFirst::parse(server_first, "rOprNGfwEbeRWgbNEkqO")
            .unwrap_or_else(|_| panic!("valid server-first"));
        let keys = Keys::derive(b"pencil", first.salt, first.rounds);
        let client_final_bare = format!("c=biws,r={}", first.nonce);
        let auth = format!("{client_first_bare},{server_first},{client_final_bare}");
        let mut proof = keys.client_key;
        for (p, s) in proof
            .iter_mut()
            .zip(hmac(&keys.stored_key, auth.as_bytes()))
        {
            *p ^= s;
        }
        assert_eq!(
            B64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            B64.encode(hmac(&keys.server_key, auth.as_bytes())),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[tokio::test]
    async fn keys_are_derived_once_per_salt_and_rounds() {
        let cache = KeyCache::default();
        let get = |salt: &'static [u8], rounds| cache.get(b"pw", salt, rounds);
        let a = get(b"salt-1", 4096).await.ok().unwrap();
        assert!(Arc::ptr_eq(&a, &get(b"salt-1", 4096).await.ok().unwrap()));
        let b = get(b"salt-2", 4096).await.ok().unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_ne!(a.client_key, b.client_key);
        let c = get(b"salt-2", 8192).await.ok().unwrap();
        assert_ne!(b.client_key, c.client_key);
        assert_eq!(format!("{c:?}"), "Keys(..)");
    }

    #[test]
    fn server_first_must_extend_our_nonce_and_stay_under_the_round_cap() {
        let ok = "r=abcXYZ,s=c2FsdA==,i=4096";
        assert!(ServerFirst::parse(ok, "abc").is_ok());
        for bad in [
            "r=abc,s=c2FsdA==,i=4096",
            "r=xyzXYZ,s=c2FsdA==,i=4096",
            "r=abcXYZ,s=!!,i=4096",
            "r=abcXYZ,s=c2FsdA==,i=0",
            "r=abcXYZ,s=c2FsdA==",
            "r=abcXYZ,s=c2FsdA==,i=100001",
        ] {
            assert!(ServerFirst::parse(bad, "abc").is_err(), "{bad}");
        }
        assert!(ServerFirst::parse("r=abcXYZ,s=c2FsdA==,i=100000", "abc").is_ok());
    }
}
