//! Reading the mesh's Prometheus text (`/metrics`): sums of counters over the series
//! whose labels match.

use std::collections::BTreeMap;

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the sample lines of Prometheus/OpenMetrics text; comments, blank lines and
/// lines it cannot read are skipped (a counter it cannot read then fails the path
/// check for lack of traffic, never passes it).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    if name.is_empty() {
        return None;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y \"q\""` → map. Values may hold escaped quotes and backslashes.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 2..].trim_start_matches(',').trim();
    }
    Some(labels)
}

/// Sum of the samples named `name` whose labels include every `(key, value)` of `want`.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP istio_tcp_connections_opened TCP connections opened.
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="destination",source_workload="client",connection_security_policy="mutual_tls"} 7
istio_tcp_connections_opened_total{reporter="source",source_workload="client",connection_security_policy="mutual_tls"} 5
istio_tcp_connections_opened_total{reporter="destination",source_workload="odd \"one\"",connection_security_policy="none"} 2
istio_tcp_received_bytes_total{reporter="destination",connection_security_policy="mutual_tls"} 1.5e3
plain_total 3
# EOF"#;

    #[test]
    fn sums_matching_series() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 5);
        let opened = "istio_tcp_connections_opened_total";
        assert_eq!(
            sum(
                &s,
                opened,
                &[
                    ("reporter", "destination"),
                    ("connection_security_policy", "mutual_tls")
                ]
            ),
            7.0
        );
        assert_eq!(sum(&s, opened, &[]), 14.0);
        assert_eq!(sum(&s, opened, &[("source_workload", "odd \"one\"")]), 2.0);
        assert_eq!(sum(&s, "istio_tcp_received_bytes_total", &[]), 1500.0);
        assert_eq!(sum(&s, "plain_total", &[]), 3.0);
        assert_eq!(sum(&s, "absent_total", &[]), 0.0);
    }

    #[test]
    fn garbage_is_skipped() {
        assert!(parse("x{a=\"unterminated} 1\n{} 2\nname notanumber\n").is_empty());
    }
}
