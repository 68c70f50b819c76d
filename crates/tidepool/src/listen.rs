//! `LISTEN`/`NOTIFY`: [`Pool::listener`] and the [`Listener`]s it hands out, all served by one
//! dedicated connection per pool (opened when the first listener is made, outside
//! `pool_size`, and shown in [`Status::listener_connections`](crate::Status)). The connection
//! `LISTEN`s on every channel any listener asked for; after a disconnect it reconnects with a
//! backoff, issues its `LISTEN`s again and tells every listener that notifications may have
//! been missed ([`ListenEvent::Gap`]): PostgreSQL keeps no notification for a session that
//! is not there.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, Mutex};
use tokio_postgres::Client;

use crate::error::Error;
use crate::pool::{Pool, Shared};

/// Notifications buffered per listener before a slow one starts losing them (it is then told,
/// with a [`ListenEvent::Gap`]).
const BUFFER: usize = 1024;
/// First and longest wait between reconnects.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a [`Listener`] receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEvent {
    /// A `NOTIFY` on a channel some listener of the pool listens on.
    Notification {
        /// The channel.
        channel: String,
        /// The payload (empty when none was given).
        payload: String,
        /// The server process that sent it.
        process_id: i32,
    },
    /// Notifications may have been missed: the listening connection was lost (and has been,
    /// or is being, opened again with every `LISTEN`), or this listener fell behind.
    Gap {
        /// Why.
        reason: String,
    },
}

/// The pool's listening connection and the channels it listens on.
pub(crate) struct Hub {
    /// The connection, while there is one.
    client: Mutex<Option<Client>>,
    /// Every channel asked for, issued again after a reconnect.
    channels: Mutex<BTreeSet<String>>,
    events: broadcast::Sender<ListenEvent>,
    connected: AtomicBool,
}

impl Hub {
    /// Drops the listening connection (on [`Pool::close`]).
    pub(crate) fn close(&self) {
        if let Ok(mut client) = self.client.try_lock() {
            client.take();
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Whether the listening connection is open now.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Notifications on the channels added with [`Listener::listen`] (and those other listeners of
/// the same pool listen on: check [`ListenEvent::Notification::channel`]). Receive them with
/// [`Listener::recv`] or as a [`Stream`] ([`Listener::into_stream`]).
pub struct Listener {
    hub: Arc<Hub>,
    events: broadcast::Receiver<ListenEvent>,
}

impl Pool {
    /// A listener of this pool's `LISTEN` connection (opened in the background on first use;
    /// needs a tokio runtime). Every listener of a pool shares that one connection.
    pub fn listener(&self) -> Listener {
        let shared = self.shared();
        let hub = shared
            .listener
            .get_or_init(|| {
                let hub = Arc::new(Hub {
                    client: Mutex::new(None),
                    channels: Mutex::new(BTreeSet::new()),
                    events: broadcast::channel(BUFFER).0,
                    connected: AtomicBool::new(false),
                });
                tokio::spawn(run(Arc::downgrade(shared), Arc::downgrade(&hub)));
                hub
            })
            .clone();
        let events = hub.events.subscribe();
        Listener { hub, events }
    }
}

impl Listener {
    /// Listens on `channel` (`LISTEN`, the name quoted as given). When the connection is not
    /// open yet (or being reopened) the `LISTEN` is issued as soon as it is.
    pub async fn listen(&self, channel: &str) -> Result<(), Error> {
        let mut channels = self.hub.channels.lock().await;
        if channels.insert(channel.to_owned()) {
            if let Some(client) = &*self.hub.client.lock().await {
                client.batch_execute(&listen_sql(channel)).await?;
            }
        }
        Ok(())
    }

    /// The next notification or gap; `None` once the pool is gone.
    pub async fn recv(&mut self) -> Option<ListenEvent> {
        match self.events.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(ListenEvent::Gap {
                reason: format!("this listener fell behind: {n} notifications dropped"),
            }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The listener as a stream of events (ends once the pool is gone).
    pub fn into_stream(self) -> impl Stream<Item = ListenEvent> + Send {
        futures_util::stream::unfold(self, |mut listener| async move {
            listener.recv().await.map(|event| (event, listener))
        })
    }
}

/// `LISTEN "channel"`, the name quoted as an identifier.
fn listen_sql(channel: &str) -> String {
    format!("LISTEN \"{}\"", channel.replace('"', "\"\""))
}

/// The listening connection's life: open, `LISTEN` on every channel, forward notifications
/// until it ends, report the gap, reopen after a backoff. Ends when the pool or every listener
/// is gone, or the pool is closed.
async fn run(pool: Weak<Shared>, hub: Weak<Hub>) {
    let mut backoff = FIRST_BACKOFF;
    let mut lost_before = false;
    loop {
        let (Some(shared), Some(hub)) = (pool.upgrade(), hub.upgrade()) else {
            return;
        };
        if shared.core.is_closed() {
            return;
        }
        let opened = match shared
            .connect_and_set_up(shared.settings.connect_timeout)
            .await
        {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(target: crate::instrument::POOL_TARGET, error = %e, "listener: cannot connect");
                drop((shared, hub));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        drop(shared);
        let mut notifications = opened.notifications;
        let listened = {
            let channels = hub.channels.lock().await;
            let mut ok = true;
            for channel in channels.iter() {
                if opened
                    .client
                    .batch_execute(&listen_sql(channel))
                    .await
                    .is_err()
                {
                    ok = false;
                    break;
                }
            }
            if ok {
                *hub.client.lock().await = Some(opened.client);
            }
            ok
        };
        if listened {
            hub.connected.store(true, Ordering::Relaxed);
            backoff = FIRST_BACKOFF;
            if lost_before {
                tracing::info!(target: crate::instrument::POOL_TARGET, "listener: connected again, LISTENs issued");
            }
            let events = hub.events.clone();
            drop(hub);
            while let Some(n) = notifications.recv().await {
                let _ = events.send(ListenEvent::Notification {
                    channel: n.channel().to_owned(),
                    payload: n.payload().to_owned(),
                    process_id: n.process_id(),
                });
            }
            let Some(hub) = hub_again(&pool) else {
                return;
            };
            hub.connected.store(false, Ordering::Relaxed);
            *hub.client.lock().await = None;
            lost_before = true;
            tracing::warn!(target: crate::instrument::POOL_TARGET, "listener: connection lost; reconnecting");
            let _ = hub.events.send(ListenEvent::Gap {
                reason: "the listening connection was lost; notifications sent meanwhile were \
                         missed"
                    .into(),
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The pool's hub, while the pool is alive.
fn hub_again(pool: &Weak<Shared>) -> Option<Arc<Hub>> {
    pool.upgrade()?.listener.get().cloned()
}
