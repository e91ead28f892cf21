//! The access line, formatted directly: the same bytes tracing's human and JSON formatters
//! write for the `moat::access` event (the tests below hold the two side by side), without
//! tracing's per-field visitor and dynamic dispatch on every request.

use std::io::Write;
use std::time::SystemTime;

use super::{AccessRecord, LogFormat};

/// The access line for `r` at `now`, with its newline.
pub(super) fn line(format: LogFormat, now: SystemTime, r: &AccessRecord<'_>, detail: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(320);
    match format {
        LogFormat::Human => human(&mut out, now, r, detail),
        LogFormat::Json => json(&mut out, now, r, detail),
    }
    .expect("writing to a Vec cannot fail");
    out
}

/// The same event through tracing (used when moat's own subscriber is not installed).
pub(super) fn via_tracing(r: &AccessRecord<'_>, detail: &str) {
    tracing::info!(
        target: "moat::access",
        request_id = r.request_id,
        container = r.container,
        class = r.class,
        generation = r.generation,
        method = r.method,
        scheme = r.scheme,
        host = r.host,
        port = r.port,
        path = r.path,
        decision = r.decision.as_str(),
        detail = detail,
        status = r.status,
        bytes_up = r.bytes_up,
        bytes_down = r.bytes_down,
        duration_ms = duration_ms(r),
        "access"
    );
}

/// Milliseconds, rounded to the microsecond.
fn duration_ms(r: &AccessRecord<'_>) -> f64 {
    (r.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// `2026-11-25T09:59:42.559976Z`, as tracing's `SystemTime` timer writes it.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) -> std::io::Result<()> {
    let t = time::OffsetDateTime::from(now);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// `TIMESTAMP  INFO moat::access: access key="value" …` (strings in Rust debug quoting).
fn human(out: &mut Vec<u8>, now: SystemTime, r: &AccessRecord<'_>, detail: &str) -> std::io::Result<()> {
    timestamp(out, now)?;
    writeln!(
        out,
        "  INFO moat::access: access request_id={:?} container={:?} class={:?} generation={} method={:?} \
         scheme={:?} host={:?} port={} path={:?} decision={:?} detail={:?} status={} bytes_up={} \
         bytes_down={} duration_ms={:?}",
        r.request_id,
        r.container,
        r.class,
        r.generation,
        r.method,
        r.scheme,
        r.host,
        r.port,
        r.path,
        r.decision.as_str(),
        detail,
        r.status,
        r.bytes_up,
        r.bytes_down,
        duration_ms(r)
    )
}

/// One JSON object: timestamp, level, message, the fields, target (tracing's flattened order).
fn json(out: &mut Vec<u8>, now: SystemTime, r: &AccessRecord<'_>, detail: &str) -> std::io::Result<()> {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, now)?;
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"access\"");
    let text = |out: &mut Vec<u8>, key: &str, value: &str| -> std::io::Result<()> {
        write!(out, ",\"{key}\":")?;
        serde_json::to_writer(out, value).map_err(std::io::Error::other)
    };
    text(out, "request_id", r.request_id)?;
    text(out, "container", r.container)?;
    text(out, "class", r.class)?;
    write!(out, ",\"generation\":{}", r.generation)?;
    text(out, "method", r.method)?;
    text(out, "scheme", r.scheme)?;
    text(out, "host", r.host)?;
    write!(out, ",\"port\":{}", r.port)?;
    text(out, "path", r.path)?;
    text(out, "decision", r.decision.as_str())?;
    text(out, "detail", detail)?;
    write!(out, ",\"status\":{},\"bytes_up\":{},\"bytes_down\":{}", r.status, r.bytes_up, r.bytes_down)?;
    out.extend_from_slice(b",\"duration_ms\":");
    serde_json::to_writer(&mut *out, &duration_ms(r)).map_err(std::io::Error::other)?;
    out.extend_from_slice(b",\"target\":\"moat::access\"}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// Fields that need escaping in both formats, and a duration that is a whole number.
    fn record(duration: Duration) -> AccessRecord<'static> {
        AccessRecord {
            request_id: "0123456789abcdef",
            container: "agent-1",
            class: "policy",
            generation: 7,
            method: "GET",
            scheme: "http",
            host: "api.github.com",
            port: 8080,
            path: "/a \"quoted\"\\path/é\t",
            decision: crate::log::Logged::Handler,
            detail: "",
            status: 200,
            bytes_up: 12,
            bytes_down: 3456,
            duration,
        }
    }

    /// What tracing's formatter writes for the same event (no timestamp).
    fn through_tracing(format: LogFormat, r: &AccessRecord<'_>, detail: &str) -> String {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buf = buf.clone();
            move || Sink(buf.clone())
        };
        let builder = tracing_subscriber::fmt().with_writer(writer).without_time();
        match format {
            LogFormat::Human => {
                tracing::subscriber::with_default(builder.with_ansi(false).finish(), || via_tracing(r, detail))
            }
            LogFormat::Json => tracing::subscriber::with_default(
                builder.json().flatten_event(true).with_current_span(false).finish(),
                || via_tracing(r, detail),
            ),
        }
        String::from_utf8(buf.lock().unwrap().clone()).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn human_lines_are_tracings_bytes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_600_782_559_976);
        for (duration, detail) in [
            (Duration::from_micros(5185), "outboundByHost[\"my.kv\"]"),
            (Duration::from_secs(2), "line\nbreak \u{1} and \\"),
        ] {
            let r = record(duration);
            let ours = String::from_utf8(line(LogFormat::Human, now, &r, detail)).unwrap();
            let (ts, rest) = ours.split_once("  INFO").unwrap();
            assert_eq!(ts, "2026-11-25T09:59:42.559976Z");
            // tracing without a timer starts the line at the padded level.
            assert_eq!(format!(" INFO{rest}"), through_tracing(LogFormat::Human, &r, detail));
        }
    }

    #[test]
    fn json_lines_are_tracings_bytes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_600_782_000_001);
        for (duration, detail) in [
            (Duration::from_micros(42), "internet-disabled"),
            (Duration::from_secs(3), "quote \" backslash \\ control \u{7f}\u{1b}"),
        ] {
            let r = record(duration);
            let ours = String::from_utf8(line(LogFormat::Json, now, &r, detail)).unwrap();
            let without_time = ours.replace("\"timestamp\":\"2026-11-25T09:59:42.000001Z\",", "");
            assert_ne!(without_time, ours, "timestamp as tracing writes it");
            assert_eq!(without_time, through_tracing(LogFormat::Json, &r, detail));
            let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
            assert_eq!(v["path"], r.path);
            assert_eq!(v["detail"], detail);
        }
    }
}
