//! A shared PostgreSQL store (`backend = "postgres"`): a small pool of connections driven by a
//! runtime of its own, a synchronous call with a deadline for moat's stores, and a listener
//! that hands every `NOTIFY` to whoever subscribed to its channel.
//!
//! Why synchronous: moat's stores are called from Lua (on tokio's blocking pool), from the
//! admin API and from override setters, the same places that commit to redb today. The call
//! hands its query to the store runtime and waits at most [`CALL_DEADLINE`]: a database that
//! is down gives an error within that time, never a hang, and the next call dials again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

/// Longest a store call waits for its answer, retries included.
pub const CALL_DEADLINE: Duration = Duration::from_secs(3);
/// Longest one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the listener checks that its connection still answers.
const LISTENER_PING: Duration = Duration::from_secs(1);
/// Most connections one moat opens to one database (the listener's not counted).
const MAX_CONNECTIONS: usize = 16;

/// A future a query closure returns.
pub type Query<T> = Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send>>;

/// One pooled connection and the statements it has prepared.
pub struct Conn {
    pub client: Client,
    prepared: Mutex<HashMap<&'static str, Statement>>,
}

impl Conn {
    /// `sql` prepared once per connection (a statement is bound to the connection that made it).
    pub async fn statement(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.prepared.lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.prepared.lock().unwrap_or_else(|e| e.into_inner()).insert(sql, s.clone());
        Ok(s)
    }
}

/// What a subscriber to a channel is told.
#[derive(Clone, Copy)]
pub enum Event<'a> {
    /// A notification's payload.
    Notified(&'a str),
    /// The listener connection is gone: notifications may be missed until [`Event::Listening`].
    Lost,
    /// The listener (re)connected: anything cached before may have changed meanwhile.
    Listening,
}

type Subscriber = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// A PostgreSQL database moat keeps state in.
pub struct Pg {
    config: tokio_postgres::Config,
    /// `host:port/dbname`: how errors name the database (never the URL: it may carry a password).
    pub shown: String,
    rt: crate::db::runtime::StoreRuntime,
    idle: Mutex<Vec<Arc<Conn>>>,
    permits: Arc<tokio::sync::Semaphore>,
    subscribers: Arc<Mutex<HashMap<String, Vec<Subscriber>>>>,
    listener_started: std::sync::Once,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pg({})", self.shown)
    }
}

/// A URL moat accepts: `postgres://user:password@host:port/db`. TLS to the database is not
/// built in; a URL that asks for it is refused rather than silently sent in the clear.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("not a PostgreSQL URL ({e}): write postgres://USER:PASSWORD@HOST:PORT/DB"))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require: moat speaks to PostgreSQL without TLS; reach it over loopback, a Unix socket or a TLS sidecar, and drop sslmode".into());
    }
    if config.get_hosts().is_empty() {
        return Err("the PostgreSQL URL names no host".into());
    }
    Ok(config)
}

fn show(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("postgres {host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

impl Pg {
    /// Connects (once, to check the database answers) and creates moat's tables if missing.
    pub fn open(url: &str) -> Result<Arc<Self>, String> {
        let mut config = parse_url(url)?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("moat");
        let rt = crate::db::runtime::StoreRuntime::new("moat-store")
            .map_err(|e| format!("cannot start the store runtime: {e}"))?;
        let pg = Arc::new(Self {
            shown: show(&config),
            config,
            rt,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            subscribers: Default::default(),
            listener_started: std::sync::Once::new(),
        });
        pg.call(|c| Box::pin(async move { c.client.batch_execute(super::schema::POSTGRES).await }))
            .map_err(|e| format!("{e} (is the database up, and may this user create tables?)"))?;
        Ok(pg)
    }

    /// Runs `query` on a pooled connection and waits for its answer. A failure that is the
    /// connection's (refused, reset, closed) is retried on a fresh one with backoff until
    /// [`CALL_DEADLINE`]; an error of the query itself is returned at once.
    pub fn call<T: Send + 'static>(
        self: &Arc<Self>,
        query: impl Fn(Arc<Conn>) -> Query<T> + Send + Sync + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let this = self.clone();
        self.rt.spawn(async move {
            let out = tokio::time::timeout(CALL_DEADLINE, this.with_retries(&query))
                .await
                .unwrap_or_else(|_| Err(format!("{} did not answer within {} s", this.shown, CALL_DEADLINE.as_secs())));
            let _ = tx.send(out);
        });
        rx.recv_timeout(CALL_DEADLINE + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(format!("{} did not answer within {} s", self.shown, CALL_DEADLINE.as_secs())))
    }

    async fn with_retries<T>(&self, query: &(impl Fn(Arc<Conn>) -> Query<T> + Send + Sync)) -> Result<T, String> {
        let _permit = self.permits.acquire().await.map_err(|_| "store closed".to_string())?;
        let mut backoff = Duration::from_millis(50);
        loop {
            let failure = match self.conn().await {
                Ok(conn) => match query(conn.clone()).await {
                    Ok(v) => {
                        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                        return Ok(v);
                    }
                    // The query's own error (a constraint, bad input): no retry; the
                    // connection is fine unless it closed.
                    Err(e) if !e.is_closed() && e.as_db_error().is_some() => {
                        if !conn.client.is_closed() {
                            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                        }
                        return Err(format!(
                            "{}: {}",
                            self.shown,
                            e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())
                        ));
                    }
                    Err(e) => crate::units::one_line(&e.to_string()),
                },
                Err(e) => e,
            };
            tracing::debug!("{}: {failure}; retrying in {backoff:?}", self.shown);
            if backoff > Duration::from_millis(800) {
                return Err(format!("{} is unreachable: {failure}", self.shown));
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    /// An idle connection that is still open, or a new one.
    async fn conn(&self) -> Result<Arc<Conn>, String> {
        loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(c) if !c.client.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| describe_connect(&e))?;
        self.rt.spawn(async move {
            let _ = connection.await;
        });
        Ok(Arc::new(Conn { client, prepared: Mutex::new(HashMap::new()) }))
    }

    /// Calls `subscriber` with every notification on `channel`, and when the listener loses or
    /// regains its connection. The listener starts with the first subscription.
    pub fn subscribe(self: &Arc<Self>, channel: &str, subscriber: impl Fn(Event<'_>) + Send + Sync + 'static) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(channel.to_string())
            .or_default()
            .push(Arc::new(subscriber));
        let this = self.clone();
        self.listener_started.call_once(move || {
            this.rt.spawn(listen(Arc::downgrade(&this)));
        });
    }

    /// Runs `f` on the store runtime (periodic reconciles and sweeps live there).
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }
}

/// A connection failure as one line (tokio-postgres's own text is "error connecting to server").
fn describe_connect(e: &tokio_postgres::Error) -> String {
    use std::error::Error;
    let text = e.source().map_or_else(|| e.to_string(), |cause| cause.to_string());
    format!("cannot connect: {}", crate::units::one_line(&text))
}

/// The listener: one connection that `LISTEN`s on every subscribed channel, forwarding each
/// notification; reconnects with backoff, telling subscribers when it lost and regained it.
async fn listen(pg: std::sync::Weak<Pg>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(this) = pg.upgrade() else { return };
        let connected = this.config.connect(NoTls).await;
        let (client, mut connection) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!("{}: listener: {}", this.shown, describe_connect(&e));
                drop(this);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(msg) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match msg {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let sql: String = super::schema::CHANNELS.iter().map(|c| format!("LISTEN {c};")).collect();
        if client.batch_execute(&sql).await.is_err() {
            driver.abort();
            continue;
        }
        backoff = Duration::from_millis(100);
        let subscribers = this.subscribers.clone();
        let shown = this.shown.clone();
        drop(this);
        tell_all(&subscribers, Event::Listening);
        tracing::debug!("{shown}: listening for changes");
        // A database that vanished without closing the connection (a partition, a host gone)
        // would leave it open and silent: a ping every second with a deadline finds out.
        let mut ping = tokio::time::interval(LISTENER_PING);
        loop {
            tokio::select! {
                next = rx.recv() => {
                    let Some((channel, payload)) = next else { break };
                    let list = subscribers.lock().unwrap_or_else(|e| e.into_inner()).get(&channel).cloned().unwrap_or_default();
                    for s in list {
                        s(Event::Notified(&payload));
                    }
                }
                _ = ping.tick() => {
                    if !matches!(tokio::time::timeout(LISTENER_PING * 2, client.simple_query("SELECT 1")).await, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        driver.abort();
        tracing::warn!("{shown}: lost the notification connection; reconnecting (caches are off meanwhile)");
        tell_all(&subscribers, Event::Lost);
        drop(client);
    }
}

fn tell_all(subscribers: &Mutex<HashMap<String, Vec<Subscriber>>>, event: Event<'_>) {
    let all: Vec<Subscriber> =
        subscribers.lock().unwrap_or_else(|e| e.into_inner()).values().flatten().cloned().collect();
    for s in all {
        s(event);
    }
}
