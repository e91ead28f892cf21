//! Sizes and durations as users write them (`"16MiB"`, `"500ms"`): in `moat.toml`, on the
//! command line and in the admin API; numbers written without the formatting machinery; a
//! message made one line.

use std::time::Duration;

/// `text` on one line, its lines joined with "; ". A reason moat gives a client is one line,
/// and servers' messages are not: PostgreSQL puts `DETAIL:` and `HINT:` on lines of their own
/// (a server starting up answers "FATAL: the database system is not yet accepting
/// connections", then "DETAIL: ..."), an S3 service may answer with an XML document.
pub fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// `"10s"`, `"500ms"`, `"2m"`, `"1h"`, `"250us"`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// `"65536"`, `"64KiB"`, `"16MiB"`, `"1GiB"`, `"500KB"`.
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult).map(|v| v as usize)
}

/// A size a user typed (`--memory`, the admin API, Lua): bytes, or the error line to show.
pub fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map(|n| n as u64).ok_or_else(|| format!("{text:?} is no size (write e.g. \"256MiB\")"))
}

/// `n` in decimal, written into `buf`. Written out: the formatting machinery (`write!`,
/// `to_string`) cost about a thousand instructions per number on the request path (addresses,
/// ports, Content-Length), several times per request.
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_message_with_detail_lines_becomes_one_line() {
        let text = "FATAL: the database system is not yet accepting connections\nDETAIL: Consistent recovery state has not been yet reached.\n";
        assert_eq!(
            one_line(text),
            "FATAL: the database system is not yet accepting connections; DETAIL: Consistent recovery state has not been yet reached."
        );
        assert_eq!(one_line("connection refused"), "connection refused");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("1 TiB"), None);
    }
}
