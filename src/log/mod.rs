//! Log output: the access log (SPEC 11), and redaction of secret values (SPEC 8.5).

use std::sync::RwLock;

mod access;
pub mod capture;

/// Values shorter than this are not redacted in responses: replacing every occurrence of a
/// two-letter "secret" would corrupt ordinary content.
pub const MIN_REDACTED_LEN: usize = 4;

/// Secret values known to this process, with their names, longest first.
static SECRETS: RwLock<Vec<(String, String)>> = RwLock::new(Vec::new());

/// Secrets of moat's own (a store's password), kept when [`set_secrets`] replaces the rest.
static OWN_SECRETS: RwLock<Vec<(String, String)>> = RwLock::new(Vec::new());

/// Registers the secrets whose values must never be printed. Replaces the previous set
/// (but for moat's own, see [`add_own_secret`]).
pub fn set_secrets(mut secrets: Vec<(String, String)>) {
    secrets.extend(OWN_SECRETS.read().unwrap_or_else(|e| e.into_inner()).iter().cloned());
    secrets.retain(|(_, v)| !v.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.1.len()));
    *SECRETS.write().unwrap_or_else(|e| e.into_inner()) = secrets;
}

/// Registers a secret of moat's own (not a policy's), such as a database password.
pub fn add_own_secret(name: String, value: String) {
    OWN_SECRETS.write().unwrap_or_else(|e| e.into_inner()).push((name, value));
    let mut all = secrets();
    all.retain(|(_, v)| !OWN_SECRETS.read().unwrap_or_else(|e| e.into_inner()).iter().any(|(_, o)| o == v));
    set_secrets(all);
}

/// The registered secrets (name, value), longest value first.
pub fn secrets() -> Vec<(String, String)> {
    SECRETS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Replaces every secret value in `text` with `[secret NAME]`.
pub fn redact(text: &str) -> String {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for (name, value) in secrets.iter() {
        if out.contains(value.as_str()) {
            out = out.replace(value.as_str(), &format!("[secret {name}]"));
        }
    }
    out
}

/// What moat did with a request, as the access log and `moat_requests_total` name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Logged {
    /// Nothing decided yet (the client went away first, or the request was malformed).
    #[default]
    Undecided,
    /// Denied by the policy (a 520 `moat-denied`).
    Deny,
    /// Answered by a handler.
    Handler,
    /// Sent upstream, or tunnelled.
    Egress,
    /// Refused before a decision: bad request, no identity, no policy loaded.
    Error,
}

impl Logged {
    /// The name in the log line and the metric's `decision` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecided => "",
            Self::Deny => "deny",
            Self::Handler => "handler",
            Self::Egress => "egress",
            Self::Error => "error",
        }
    }
}

/// One access-log line (SPEC 11).
pub(crate) struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub container: &'a str,
    pub class: &'a str,
    pub generation: u64,
    pub method: &'a str,
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
    /// Path only: the query string may carry secrets and is never logged.
    pub path: &'a str,
    /// What moat did with the request.
    pub decision: Logged,
    /// The deny reason, the handler's name, or the error.
    pub detail: &'a str,
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: std::time::Duration,
}

/// Writes one access-log line through the log stream (human or JSON, per `--log-format`).
///
/// Under moat's own subscriber (see [`init`]) the line is formatted here, byte for byte what
/// tracing's formatter writes (tested in `access`), and handed to the log thread directly:
/// tracing's generic field visitor cost ~1.2 µs per request, a tenth of an egress request.
pub(crate) fn access(r: &AccessRecord<'_>) {
    if capture::take(r) {
        return;
    }
    // Redaction scans the text: skip it when the access log is filtered out.
    if !access_enabled() {
        return;
    }
    let detail = redact(r.detail);
    match ACCESS_SINK.get() {
        Some((format, tx)) => {
            let _ = tx.send(access::line(*format, std::time::SystemTime::now(), r, &detail));
        }
        None => access::via_tracing(r, &detail),
    }
}

/// Whether an access record would be written or captured: when not, the caller need not
/// format the fields it keeps unformatted (the host, about 1,000 instructions a request).
pub(crate) fn access_wanted() -> bool {
    capture::active() || access_enabled()
}

fn access_enabled() -> bool {
    tracing::enabled!(target: "moat::access", tracing::Level::INFO)
}

/// The log thread's queue and the format, for access lines formatted by moat itself.
static ACCESS_SINK: std::sync::OnceLock<(LogFormat, std::sync::mpsc::SyncSender<Vec<u8>>)> = std::sync::OnceLock::new();

/// Output format of the log stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people: time, level, target, message.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the log subscriber: everything to stderr, `RUST_LOG` filters (default `info`).
///
/// Lines are formatted on the thread that logs and written by a dedicated thread, which
/// batches them into as few `write` calls as the load allows (at most one write per
/// `LOG_GATHER` under load): one line per request must not cost every request a system
/// call, nor a wake-up of the log thread. The returned guard flushes what is left when dropped.
pub fn init(format: LogFormat) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(LOG_QUEUE);
    let thread = std::thread::Builder::new()
        .name("moat-log".into())
        .spawn(move || {
            use std::io::Write;
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(&line);
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(&more);
                }
                let _ = out.flush();
                // Let the next lines gather. A logging thread wakes this one only when it
                // is blocked in `recv`; waking it for every line cost more than the rest of
                // a proxied request. A line logged while idle is still written at once.
                std::thread::sleep(LOG_GATHER);
            }
        })
        .ok();
    let _ = ACCESS_SINK.set((format, tx.clone()));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(QueueWriter(tx));
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Human => builder.with_ansi(false).try_init(),
    };
    LogGuard { thread }
}

/// A plain subscriber for short commands (`moat test`): warnings and errors, and what
/// policies print, to stderr; `RUST_LOG` overrides `default`.
pub fn init_plain(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// How long the log thread lets lines gather after each write.
const LOG_GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Lines waiting for the log thread; when full, logging threads wait (back-pressure, never
/// unbounded memory and never a dropped line).
const LOG_QUEUE: usize = 16 * 1024;

/// Keeps the log thread until the process ends (see [`init`]).
pub struct LogGuard {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Give the log thread a moment to drain: its sender lives in the global subscriber,
        // so the channel never closes on its own.
        if self.thread.take().is_some() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Hands each formatted event to the log thread.
struct QueueWriter(std::sync::mpsc::SyncSender<Vec<u8>>);

/// One event's bytes, sent when tracing drops the writer at the end of the event.
struct EventBuffer {
    buf: Vec<u8>,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> EventBuffer {
        EventBuffer { buf: Vec::with_capacity(256), tx: self.0.clone() }
    }
}

impl std::io::Write for EventBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.tx.send(one_line(std::mem::take(&mut self.buf)));
        }
    }
}

/// Keeps one event on one line. A message may carry what a container sent (a policy that logs
/// a request body, an error that quotes it), and a line break in it must not start a line that
/// looks like moat's own (a forged access line), nor an escape sequence drive the terminal of
/// whoever reads the log. Control bytes other than tab are written as `\n`, `\r`, `\x1b`, ...;
/// the event's final newline stays. (JSON lines never carry any: they are escaped already.)
fn one_line(event: Vec<u8>) -> Vec<u8> {
    let escaped = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f;
    let text = event.strip_suffix(b"\n").unwrap_or(&event);
    if !text.iter().any(|&b| escaped(b)) {
        return event;
    }
    let mut out = Vec::with_capacity(event.len() + 16);
    for &b in text {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if escaped(b) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            b => out.push(b),
        }
    }
    out.push(b'\n');
    out
}
