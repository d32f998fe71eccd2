//! A blocking HTTP/1.0 GET and Prometheus text parsing: enough to read `/health` and
//! `/metrics` of etcd and etcdmux without an HTTP client dependency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `host:port` and path of an `http://host:port/path` URL.
pub(crate) fn split_url(url: &str) -> (&str, &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// One blocking HTTP/1.0 GET of `http://IP:PORT/path`; returns (status code, body).
pub fn http_get(url: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let (hp, path) = split_url(url);
    let addr: SocketAddr =
        hp.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{hp}: {e}")))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hp}\r\nAccept: */*\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP status line"))?;
    Ok((status, body.to_string()))
}

/// Sum of the samples of metric `name` (any labels) in Prometheus text format; `None`
/// when no sample has exactly that name.
pub fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value_part = if let Some(labels) = rest.strip_prefix('{') {
            match labels.rfind('}') {
                Some(i) => &labels[i + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') || rest.starts_with('\t') {
            rest
        } else {
            continue; // a longer name such as `<name>_bucket`
        };
        if let Some(v) = value_part.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

/// Sum of the samples of metric `name` at `url`'s `/metrics` (etcd or etcdmux; `url`
/// is `http://IP:PORT`); `None` if nothing answers 200 or there is no such metric.
pub fn scrape_metric(url: &str, name: &str) -> Option<f64> {
    let (status, body) = http_get(&format!("{url}/metrics"), Duration::from_secs(5)).ok()?;
    (status == 200).then(|| sum_metric(&body, name))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        assert_eq!(split_url("http://127.0.0.1:2379/metrics"), ("127.0.0.1:2379", "/metrics"));
        assert_eq!(split_url("http://127.0.0.1:2379"), ("127.0.0.1:2379", "/"));
        assert_eq!(split_url("127.0.0.1:2379/health"), ("127.0.0.1:2379", "/health"));
    }

    #[test]
    fn sums_samples_of_exactly_one_name() {
        let text = "# HELP x_total a counter\n# TYPE x_total counter\n\
                    x_total{code=\"OK\"} 3\nx_total{code=\"Unavailable\",m=\"a}b\"} 4.5\n\
                    x_total_bucket{le=\"1\"} 100\nx_total 1 1700000000000\ny 9\n";
        assert_eq!(sum_metric(text, "x_total"), Some(8.5));
        assert_eq!(sum_metric(text, "y"), Some(9.0));
        assert_eq!(sum_metric(text, "x"), None);
        assert_eq!(sum_metric(text, "z"), None);
        assert_eq!(sum_metric("x_total NaN-ish\n", "x_total"), None);
    }
}
