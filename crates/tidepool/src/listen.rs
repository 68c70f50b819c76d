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
use tokio::sync::{broadcast, Mutex, Notify};
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
    /// The pool, for connecting (weak: listeners do not keep a dropped pool alive).
    pool: Weak<Shared>,
    /// The connection, while there is one. Cloned out, never held across an `.await`.
    client: std::sync::Mutex<Option<Arc<Client>>>,
    /// Every channel asked for, issued again after a reconnect. Held while `LISTEN`s are
    /// issued, so none is lost between a reconnect and a new [`Listener::listen`].
    channels: Mutex<BTreeSet<String>>,
    /// Taken on close, so every listener's `recv` then ends.
    events: std::sync::Mutex<Option<broadcast::Sender<ListenEvent>>>,
    connected: AtomicBool,
    /// The connection's task was started.
    running: AtomicBool,
    /// [`Hub::close`] was called: the task ends and drops the connection.
    closed: AtomicBool,
    closing: Notify,
}

impl Hub {
    /// Ends the listening connection (on [`Pool::close`], or when the pool is dropped).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.closing.notify_one();
        self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Sends `event` to every listener (none after close).
    fn send(&self, event: ListenEvent) {
        if let Some(events) = &*self.events.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = events.send(event);
        }
    }

    /// Whether the listening connection is open now.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Starts the connection's task, once, when a runtime is there to run it.
    fn start(self: &Arc<Self>) {
        if self.running.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.running.swap(true, Ordering::AcqRel) {
            runtime.spawn(run(self.clone()));
        }
    }

    fn client(&self) -> Option<Arc<Client>> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Notifications on the channels added with [`Listener::listen`] (and those other listeners of
/// the same pool listen on: check the `channel` of each [`ListenEvent::Notification`]).
/// Receive them with [`Listener::recv`] or as a [`Stream`] ([`Listener::into_stream`]).
pub struct Listener {
    hub: Arc<Hub>,
    events: broadcast::Receiver<ListenEvent>,
}

impl Pool {
    /// A listener of this pool's `LISTEN` connection, opened in the background (from here
    /// when inside a tokio runtime, else at the first [`Listener::listen`]). Every listener of
    /// a pool shares that one connection.
    pub fn listener(&self) -> Listener {
        let shared = self.shared();
        let hub = shared
            .listener
            .get_or_init(|| {
                Arc::new(Hub {
                    pool: Arc::downgrade(shared),
                    client: std::sync::Mutex::new(None),
                    channels: Mutex::new(BTreeSet::new()),
                    events: std::sync::Mutex::new(Some(broadcast::channel(BUFFER).0)),
                    connected: AtomicBool::new(false),
                    running: AtomicBool::new(false),
                    closed: AtomicBool::new(false),
                    closing: Notify::new(),
                })
            })
            .clone();
        hub.start();
        let events = match &*hub.events.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(events) => events.subscribe(),
            // Closed already: a receiver that ends at once.
            None => broadcast::channel(1).1,
        };
        Listener { hub, events }
    }
}

impl Listener {
    /// Listens on `channel` (`LISTEN`, the name quoted as given). When the connection is not
    /// open yet (or being reopened) the `LISTEN` is issued as soon as it is. A `LISTEN` the
    /// server refuses is an error, and the channel is not kept.
    pub async fn listen(&self, channel: &str) -> Result<(), Error> {
        self.hub.start();
        let mut channels = self.hub.channels.lock().await;
        if channels.insert(channel.to_owned()) {
            if let Some(client) = self.hub.client() {
                if let Err(e) = client.batch_execute(&listen_sql(channel)).await {
                    channels.remove(channel);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// The next notification or gap; `None` once the pool is closed or gone.
    pub async fn recv(&mut self) -> Option<ListenEvent> {
        match self.events.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(ListenEvent::Gap {
                reason: format!("this listener fell behind: {n} notifications dropped"),
            }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The listener as a stream of events (ends once the pool is closed or gone).
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
/// until it ends, report the gap, reopen after a backoff. Ends when the hub is closed (pool
/// closed or dropped) or the pool is gone.
async fn run(hub: Arc<Hub>) {
    let mut backoff = FIRST_BACKOFF;
    let mut lost_before = false;
    while !hub.closed.load(Ordering::Acquire) {
        let Some(shared) = hub.pool.upgrade() else {
            break;
        };
        if shared.core.is_closed() {
            break;
        }
        let limit = shared.settings.connect_timeout;
        let connected = shared.connect_and_set_up(limit).await;
        drop(shared);
        let opened = match connected {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(target: crate::instrument::POOL_TARGET, error = %e, "listener: cannot connect");
                if closed_during(&hub, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let mut notifications = opened.notifications;
        let client = Arc::new(opened.client);
        let listened = {
            let channels = hub.channels.lock().await;
            let mut ok = true;
            for channel in channels.iter() {
                if client.batch_execute(&listen_sql(channel)).await.is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && !hub.closed.load(Ordering::Acquire) {
                *hub.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
                hub.connected.store(true, Ordering::Relaxed);
            }
            ok
        };
        if listened {
            backoff = FIRST_BACKOFF;
            if lost_before {
                tracing::info!(target: crate::instrument::POOL_TARGET, "listener: connected again, LISTENs issued");
            }
            loop {
                tokio::select! {
                    n = notifications.recv() => match n {
                        Some(n) => {
                            hub.send(ListenEvent::Notification {
                                channel: n.channel().to_owned(),
                                payload: n.payload().to_owned(),
                                process_id: n.process_id(),
                            });
                        }
                        None => break,
                    },
                    _ = hub.closing.notified() => break,
                }
            }
            hub.client.lock().unwrap_or_else(|e| e.into_inner()).take();
            hub.connected.store(false, Ordering::Relaxed);
            if hub.closed.load(Ordering::Acquire) {
                break;
            }
            lost_before = true;
            tracing::warn!(target: crate::instrument::POOL_TARGET, "listener: connection lost; reconnecting");
            hub.send(ListenEvent::Gap {
                reason: "the listening connection was lost; notifications sent meanwhile were \
                         missed"
                    .into(),
            });
        }
        if closed_during(&hub, backoff).await {
            break;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    hub.close();
}

/// Waits `pause`, or less if the hub is closed meanwhile; returns whether it was.
async fn closed_during(hub: &Hub, pause: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => hub.closed.load(Ordering::Acquire),
        _ = hub.closing.notified() => true,
    }
}
