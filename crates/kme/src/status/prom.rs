//! Reading back this process's own Prometheus text: the status page shows the figures the
//! KME already counts, so it cannot disagree with what a Prometheus server scrapes.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, or "".
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// Every sample of the metrics named in `names`, from Prometheus text; lines it cannot
/// read are skipped (the text is this process's own).
pub(crate) fn samples(text: &str, names: &[&str]) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(parse_line)
        .filter(|s| names.contains(&s.name.as_str()))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.trim().parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(mut text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_and_values() {
        let text = "# TYPE dqkd_pool_keys gauge\n\
            dqkd_pool_keys{kme=\"KME_A\",peer=\"KME_B\"} 42\n\
            dqkd_requests_total{kme=\"KME_A\",call=\"a\\\"b,c\"} 3\n\
            dqkd_other 1\n\
            up 1\n";
        let got = samples(text, &["dqkd_pool_keys", "dqkd_requests_total", "up"]);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].label("peer"), "KME_B");
        assert_eq!(got[0].value, 42.0);
        assert_eq!(got[1].label("call"), "a\"b,c");
        assert_eq!(got[2].name, "up");
        assert!(got[2].labels.is_empty());
    }
}
