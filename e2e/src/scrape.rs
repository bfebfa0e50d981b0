//! Reading `/metrics` as Prometheus does: the demo's picture of a run and the test that
//! holds the Grafana dashboard to the live metrics both scrape the federation's
//! processes and read the samples from the text exposition format.

use std::collections::BTreeMap;
use std::time::Duration;

use starling_trainer::roles::metrics::Phase;

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// Where a pod serves `/metrics` on `port`: its pod IP; `None` before it has one.
pub fn pod_url(pod: &k8s_openapi::api::core::v1::Pod, port: u16) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    Some(format!("http://{ip}:{port}/metrics"))
}

/// Scrapes `url` (`http://host:port/metrics`).
pub async fn scrape(url: &str) -> anyhow::Result<Vec<Sample>> {
    // One client for every scrape: the demo scrapes each trainer every second.
    static CLIENT: std::sync::LazyLock<reqwest::Client> =
        std::sync::LazyLock::new(reqwest::Client::new);
    let response = CLIENT
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?;
    parse(&response.text().await?)
}

/// The samples of a text exposition; comments skipped, a line that is not a sample an
/// error naming it.
pub fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let samples = text.lines().map(str::trim);
    samples
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| sample(line).ok_or_else(|| anyhow::anyhow!("not a sample: {line:?}")))
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_at(line.find(' ')?),
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, labels.strip_suffix('}')?),
        None => (series, ""),
    };
    Some(Sample {
        name: name.to_owned(),
        labels: parse_labels(labels)?,
        value,
    })
}

/// `a="x",b="y\"z"` as a map; `None` when malformed.
fn parse_labels(mut text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
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
        labels.insert(name.trim().to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// Each peer's round time by phase, from scrapes of its `/metrics`: the latest scrape of
/// a peer wins (a restarted trainer starts its counters afresh).
#[derive(Debug, Default)]
pub struct RoundPhases {
    /// Per peer, per phase in [`Phase::ALL`] order: (seconds, rounds).
    latest: BTreeMap<String, [(f64, f64); 6]>,
}

impl RoundPhases {
    /// Takes in one trainer's scrape.
    pub fn observe(&mut self, samples: &[Sample]) {
        for s in samples {
            let (Some(peer), Some(phase)) = (s.label("peer"), s.label("phase")) else {
                continue;
            };
            let Some(i) = Phase::ALL.iter().position(|p| p.name() == phase) else {
                continue;
            };
            let entry = self.latest.entry(peer.to_owned()).or_default();
            match s.name.as_str() {
                "starling_trainer_round_phase_seconds_sum" => entry[i].0 = s.value,
                "starling_trainer_round_phase_seconds_count" => entry[i].1 = s.value,
                _ => {}
            }
        }
    }

    /// Each peer's mean seconds per round in each phase.
    pub fn means(&self) -> Vec<(String, [f64; 6])> {
        (self.latest.iter())
            .map(|(peer, phases)| {
                let mean = phases.map(|(sum, n)| if n > 0.0 { sum / n } else { 0.0 });
                (peer.clone(), mean)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_with_their_labels_and_comments_are_skipped() {
        let text = "# HELP x A thing.\n# TYPE x gauge\nx 1.5\n\
            y_total{peer=\"p0\",phase=\"wait\"} 3\n\
            z_bucket{le=\"+Inf\",msg=\"a \\\"b\\\", c\"} 7 1700000000\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!((samples[0].name.as_str(), samples[0].value), ("x", 1.5));
        assert_eq!(samples[1].label("peer"), Some("p0"));
        assert_eq!(samples[1].label("phase"), Some("wait"));
        assert_eq!(samples[2].label("le"), Some("+Inf"));
        assert_eq!(samples[2].label("msg"), Some("a \"b\", c"));
        assert_eq!(samples[2].value, 7.0);
    }

    #[test]
    fn round_phases_are_averaged_per_peer_from_the_latest_scrape() {
        let scrape = |wait_sum: f64, n: u32| {
            parse(&format!(
                "starling_trainer_round_phase_seconds_sum{{phase=\"wait\",peer=\"p1\"}} {wait_sum}\n\
                 starling_trainer_round_phase_seconds_count{{phase=\"wait\",peer=\"p1\"}} {n}\n\
                 starling_trainer_round_phase_seconds_count{{phase=\"fetch\",peer=\"p1\"}} 0\n\
                 starling_trainer_round{{peer=\"p1\"}} {n}\n"
            ))
            .unwrap()
        };
        let mut phases = RoundPhases::default();
        phases.observe(&scrape(2.0, 1));
        phases.observe(&scrape(9.0, 3));
        let means = phases.means();
        assert_eq!(means.len(), 1);
        assert_eq!(means[0].0, "p1");
        assert_eq!(means[0].1, [0.0, 0.0, 0.0, 3.0, 0.0, 0.0]);
    }

    #[test]
    fn a_line_that_is_not_a_sample_is_an_error_that_names_it() {
        let err = parse("x 1\nnonsense\n").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
        assert!(parse("x{a=\"1\" 2\n").is_err());
    }
}
