//! Property tests for the settings: arbitrary text in any variable never panics, and a URL's
//! password never shows in an error, a `Display`, a `Debug` or `redacted()`.

use std::collections::HashMap;

use proptest::prelude::*;
use tidepool::settings::VARIABLES;
use tidepool::{DatabaseUrl, Settings, SettingsError, UrlError};

/// Text likely to reach every parser's edge cases: anything at all, printable ASCII, number-ish
/// text, and the words the parsers look for.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,40}",
        "[-+ ]?[0-9]{0,25}(\\.[0-9]{0,12})?([eE][-+]?[0-9]{1,4})? ?",
        "(-1|0|1|-0|\\+1|1e400|-1e400|NaN|inf|-inf|1\\.|\\.5|\\.)",
        "(true|FALSE|yes|No|on|OFF|t|f|rollback|DISCARD|none|commit)",
    ]
}

/// URL-shaped text: a plausible scheme and then characters that matter to URL parsing.
fn url_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just(""),
            Just("postgresql://"),
            Just("postgres://"),
            Just("postgresql+asyncpg://"),
            Just("mysql://"),
        ],
        "[a-zA-Z0-9:@/?&=%.,\\[\\]#+ _-]{0,60}",
    )
        .prop_map(|(scheme, rest)| format!("{scheme}{rest}"))
}

/// A password of at least 6 random letters and digits, with an uppercase letter and a digit, so
/// that no fixed message text and no other generated part (lowercase and digits only, or
/// uppercase-free) can contain it by chance.
fn password() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{6,24}".prop_filter("an uppercase letter and a digit", |p| {
        p.bytes().any(|b| b.is_ascii_uppercase()) && p.bytes().any(|b| b.is_ascii_digit())
    })
}

fn percent_encode_all(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// One query parameter (never containing an uppercase letter).
fn param() -> impl Strategy<Value = String> {
    let known = prop_oneof![
        Just("sslmode"),
        Just("ssl"),
        Just("application_name"),
        Just("connect_timeout"),
        Just("timeout"),
        Just("command_timeout"),
        Just("prepared_statement_cache_size"),
        Just("statement_cache_size"),
        Just("host"),
        Just("hostaddr"),
        Just("port"),
        Just("options"),
        Just("keepalives"),
        Just("keepalives_idle"),
        Just("target_session_attrs"),
        Just("tcp_user_timeout"),
        Just("dbname"),
        Just("user"),
        Just("client_encoding"),
        Just("gssencmode"),
    ];
    prop_oneof![
        (known, "[a-z0-9./,:-]{0,10}").prop_map(|(k, v)| format!("{k}={v}")),
        "[a-z_]{1,8}=[a-z0-9]{0,4}",
        "[a-z]{1,4}",
        Just(String::new()),
    ]
}

/// Where the password goes in a structured URL.
#[derive(Debug, Clone)]
enum Placement {
    /// `user:PASSWORD@`
    UserInfo,
    /// `user:%50%41...@`
    Encoded,
    /// `?password=PASSWORD`
    Query,
    /// `user:CORE1<sep>CORE2@`: characters that need encoding, unencoded.
    UserInfoSpecial(&'static str, String),
    /// `?password=CORE1<sep>CORE2`
    QuerySpecial(&'static str, String),
}

fn separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "@", ":", "/", "?", "#", "&", "%", "@@", "=", ",", "%4", " ", "://", "[",
    ])
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        Just(Placement::UserInfo),
        Just(Placement::Encoded),
        Just(Placement::Query),
        (separator(), password()).prop_map(|(s, p)| Placement::UserInfoSpecial(s, p)),
        (separator(), password()).prop_map(|(s, p)| Placement::QuerySpecial(s, p)),
    ]
}

#[derive(Debug, Clone)]
struct StructuredUrl {
    text: String,
    /// Text that must never be shown (the password, or each of its parts).
    secrets: Vec<String>,
}

fn structured_url() -> impl Strategy<Value = StructuredUrl> {
    let scheme = prop::sample::select(vec![
        "postgresql",
        "postgres",
        "postgresql+asyncpg",
        "postgresql+psycopg",
        "postgresql+psycopg2",
        "mysql",
        "postgresql+",
        "",
    ]);
    let host = prop_oneof![
        "[a-z]{1,10}",
        Just("127.0.0.1".to_owned()),
        Just("[::1]".to_owned()),
        Just("%2Ftmp%2Fsock".to_owned()),
        Just(String::new()),
    ];
    let port = prop_oneof![
        Just(String::new()),
        "[0-9]{1,6}".prop_map(|p| format!(":{p}")),
        "[a-z]{1,3}".prop_map(|p| format!(":{p}")),
    ];
    let hosts = prop::collection::vec((host, port), 1..3).prop_map(|hs| {
        hs.into_iter()
            .map(|(h, p)| format!("{h}{p}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    (
        scheme,
        "[a-z]{0,8}",
        password(),
        placement(),
        hosts,
        "(/[a-z_]{0,8})?",
        prop::collection::vec(param(), 0..4),
    )
        .prop_map(|(scheme, user, password, placement, hosts, db, params)| {
            let mut params = params;
            let mut secrets = vec![password.clone()];
            let userinfo = match &placement {
                Placement::UserInfo => format!("{user}:{password}@"),
                Placement::Encoded => {
                    let encoded = percent_encode_all(&password);
                    secrets.push(encoded.clone());
                    format!("{user}:{encoded}@")
                }
                Placement::Query => {
                    params.insert(0, format!("password={password}"));
                    format!("{user}@")
                }
                Placement::UserInfoSpecial(sep, second) => {
                    secrets.push(second.clone());
                    format!("{user}:{password}{sep}{second}@")
                }
                Placement::QuerySpecial(sep, second) => {
                    secrets.push(second.clone());
                    params.insert(0, format!("password={password}{sep}{second}"));
                    format!("{user}@")
                }
            };
            let query = if params.is_empty() {
                String::new()
            } else {
                format!("?{}", params.join("&"))
            };
            StructuredUrl {
                text: format!("{scheme}://{userinfo}{hosts}{db}{query}"),
                secrets,
            }
        })
}

/// Everything a URL or an error can show about itself.
fn shown_url(result: &Result<DatabaseUrl, UrlError>) -> String {
    match result {
        Ok(url) => format!("{url} {url:?} {}", url.redacted()),
        Err(e) => format!("{e} {e:?}"),
    }
}

fn shown_settings(result: &Result<Settings, SettingsError>) -> String {
    match result {
        Ok(s) => {
            let url = s
                .database_url
                .as_ref()
                .map(|u| format!("{u} {u:?} {}", u.redacted()))
                .unwrap_or_default();
            format!("{s:?} {url}")
        }
        Err(e) => format!("{e} {e:?}"),
    }
}

fn assert_hidden(shown: &str, secrets: &[String], url: &str) {
    for secret in secrets {
        assert!(
            !shown.contains(secret.as_str()),
            "{secret:?} of {url:?} shows in {shown}"
        );
    }
}

/// 512 cases per property, or `PROPTEST_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_values_never_panic(
        values in prop::collection::vec((0..VARIABLES.len(), value_text()), 0..10)
    ) {
        let map: HashMap<&str, String> =
            values.iter().map(|(i, v)| (VARIABLES[*i], v.clone())).collect();
        let result = Settings::from_lookup(|name| map.get(name).cloned());
        let shown = shown_settings(&result);
        if let Err(SettingsError::Invalid { variable, .. }) = &result {
            prop_assert!(VARIABLES.contains(&variable.as_str()));
            prop_assert!(shown.starts_with(&format!("{variable}=")), "{}", shown);
        }
        if let Ok(s) = &result {
            prop_assert!(s.pool_size >= 1);
            prop_assert!(s.connect_timeout > std::time::Duration::ZERO);
            prop_assert!(s.recycle.is_none_or(|r| !r.is_zero()));
            // Adding any duration to now must be safe for the pool.
            let now = std::time::Instant::now();
            for d in [s.pool_timeout, s.connect_timeout, s.slow_query_threshold] {
                prop_assert!(now.checked_add(d).is_some());
            }
        }
    }

    #[test]
    fn any_database_url_never_panics(text in prop_oneof![any::<String>(), url_text()]) {
        let parsed = DatabaseUrl::parse(&text);
        let _ = shown_url(&parsed);
        let _ = text.parse::<DatabaseUrl>();
        let result = Settings::from_lookup(|name| (name == "DATABASE_URL").then(|| text.clone()));
        let _ = shown_settings(&result);
        if let Err(e) = result {
            let is_url_error =
                matches!(&e, SettingsError::Invalid { variable, .. } if variable == "DATABASE_URL");
            prop_assert!(is_url_error, "{:?}", e);
        }
    }

    #[test]
    fn password_never_shown(url in structured_url()) {
        let parsed = DatabaseUrl::parse(&url.text);
        assert_hidden(&shown_url(&parsed), &url.secrets, &url.text);
        let result =
            Settings::from_lookup(|name| (name == "DATABASE_URL").then(|| url.text.clone()));
        assert_hidden(&shown_settings(&result), &url.secrets, &url.text);
        if let Ok(parsed) = &parsed {
            let config_debug = format!("{:?}", parsed.config());
            assert_hidden(&config_debug, &url.secrets, &url.text);
        }
    }

    #[test]
    fn valid_urls_round_trip(
        scheme in prop::sample::select(vec![
            "postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2",
        ]),
        user in "[a-z][a-z0-9_]{0,8}",
        password in password(),
        host in "[a-z]{1,10}",
        port in 1u16..,
        db in "[a-z_]{1,8}",
    ) {
        let text = format!("{scheme}://{user}:{password}@{host}:{port}/{db}?sslmode=disable");
        let url = DatabaseUrl::parse(&text).unwrap();
        prop_assert_eq!(url.config().get_user(), Some(user.as_str()));
        prop_assert_eq!(url.config().get_password(), Some(password.as_bytes()));
        prop_assert_eq!(url.config().get_ports(), &[port]);
        prop_assert_eq!(url.config().get_dbname(), Some(db.as_str()));
        prop_assert_eq!(
            url.redacted(),
            format!("{scheme}://{user}:***@{host}:{port}/{db}?sslmode=disable")
        );
    }
}
