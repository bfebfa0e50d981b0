//! The model card (`README.md`): YAML metadata the Hub indexes (license, library,
//! pipeline, tags, datasets, a `model-index` with the validation loss) and a body for
//! the reader — what was trained, by whom, how well, how compressed, and how to load it.

use std::fmt::Write;

use super::RepoId;

/// What the card says beyond the checkpoint's own files.
#[derive(Clone, Debug, Default)]
pub struct CardContext {
    /// An SPDX id or the Hub's license name, e.g. `apache-2.0`; `other` when unknown.
    pub license: Option<String>,
    /// Hub dataset ids the run trained on, when known.
    pub datasets: Vec<String>,
    /// Contributing peers with their rating when scoring gives one.
    pub contributors: Vec<(String, Option<f64>)>,
}

/// `ctx`, with the contributors rated from the checkpoint's scoring ledger (the last
/// record of `dir/ledger.jsonl`) when the context names none and the ledger is there.
pub(super) fn with_ledger_ratings(
    ctx: &CardContext,
    dir: &std::path::Path,
    meta: &serde_json::Value,
) -> CardContext {
    let mut ctx = ctx.clone();
    let last = std::fs::read_to_string(dir.join("ledger.jsonl"))
        .ok()
        .and_then(|text| text.lines().rfind(|l| !l.is_empty()).map(str::to_owned))
        .and_then(|line| serde_json::from_str::<crate::scoring::ledger::Record>(&line).ok());
    let (Some(record), true) = (last, ctx.contributors.is_empty()) else {
        return ctx;
    };
    let contributors = meta["contributors"].as_array().into_iter().flatten();
    ctx.contributors = contributors
        .filter_map(|p| p.as_str())
        .map(|p| {
            let rating = (p.parse().ok())
                .and_then(|id| record.peers.get(&id))
                .map(|s| s.rating.ordinal());
            (p.to_owned(), rating)
        })
        .collect();
    ctx
}

/// A YAML (and JSON) string scalar: quoting every string keeps any name valid YAML.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The card for a checkpoint of `config.json` and `starling.json` (`meta`).
pub(super) fn model_card(
    repo: &RepoId,
    config: &serde_json::Value,
    meta: &serde_json::Value,
    ctx: &CardContext,
) -> String {
    let run = meta["run"].as_str();
    let round = meta["round"].as_u64().unwrap_or(0);
    let loss = meta["validation_loss"].as_f64();
    let mut card = String::from("---\n");
    let license = ctx.license.as_deref().unwrap_or("other");
    let _ = writeln!(card, "license: {}", quoted(license));
    card.push_str("library_name: transformers\npipeline_tag: text-generation\n");
    card.push_str("tags:\n- starling\n- federated-training\n- llama\n");
    if let Some(algorithm) = meta["algorithm"].as_str() {
        let _ = writeln!(card, "- {}", quoted(&algorithm.to_lowercase()));
    }
    if !ctx.datasets.is_empty() {
        card.push_str("datasets:\n");
        for d in &ctx.datasets {
            let _ = writeln!(card, "- {}", quoted(d));
        }
    }
    if let Some(loss) = loss {
        let _ = write!(
            card,
            "model-index:\n- name: {}\n  results:\n  - task:\n      type: text-generation\n      \
             name: Text generation\n    dataset:\n      name: {}\n      type: {}\n      \
             split: validation\n    metrics:\n    - type: loss\n      name: Validation loss\n      \
             value: {loss:.4}\n",
            quoted(repo.name()),
            quoted(ctx.datasets.first().map_or("held-out text", String::as_str)),
            quoted(ctx.datasets.first().map_or("custom", String::as_str)),
        );
    }
    card.push_str("---\n\n");
    let _ = writeln!(card, "# {}\n", repo.name());
    card.push_str(&summary(config, meta, run, round, loss));
    card.push_str(&loss_curve(meta));
    card.push_str(&contributors(meta, ctx));
    card.push_str(&compression(meta));
    card.push_str(&how_to_load(repo));
    card
}

fn summary(
    config: &serde_json::Value,
    meta: &serde_json::Value,
    run: Option<&str>,
    round: u64,
    loss: Option<f64>,
) -> String {
    let n = |k: &str| config[k].as_u64().unwrap_or(0);
    let mut s = format!(
        "A LLaMA-style language model ({} layers, hidden size {}, {} attention heads, \
         vocabulary {}) trained with [Starling](https://github.com/starling-dev/starling): \
         federated training over clusters in clouds and homes that exchange compressed \
         pseudo-gradients instead of weights.\n\n",
        n("num_hidden_layers"),
        n("hidden_size"),
        n("num_attention_heads"),
        n("vocab_size")
    );
    s.push_str("| | |\n|---|---|\n");
    if let Some(run) = run {
        let _ = writeln!(s, "| Run | `{run}` |");
    }
    let _ = writeln!(s, "| Round | {round} |");
    if let Some(tokens) = meta["tokens"].as_u64() {
        let _ = writeln!(s, "| Tokens trained on | {tokens} |");
    }
    if let Some(loss) = loss {
        let _ = writeln!(s, "| Validation loss | {loss:.4} |");
    }
    if let Some(t) = meta["tokenizer"].as_str() {
        let _ = writeln!(s, "| Tokenizer | `{t}` |");
    }
    s.push('\n');
    s
}

/// The validation loss at the start, at its best and now, and every recorded round.
fn loss_curve(meta: &serde_json::Value) -> String {
    let points: Vec<(u64, f64)> = meta["validation_curve"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["round"].as_u64()?, p["loss"].as_f64()?)))
        .collect();
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return String::new();
    };
    let best = points
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(last);
    let mut s = format!(
        "## Loss curve\n\nValidation loss {:.4} at round {}, best {:.4} at round {}, \
         {:.4} at round {}.\n\n| Round | Validation loss |\n|---:|---:|\n",
        first.1, first.0, best.1, best.0, last.1, last.0
    );
    for (round, loss) in &points {
        let _ = writeln!(s, "| {round} | {loss:.4} |");
    }
    s.push('\n');
    s
}

fn contributors(meta: &serde_json::Value, ctx: &CardContext) -> String {
    let rated = if ctx.contributors.is_empty() {
        meta["contributors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.as_str()?.to_owned(), None)))
            .collect()
    } else {
        ctx.contributors.clone()
    };
    if rated.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "## Contributors\n\nPeers whose updates made the last round, with their OpenSkill \
         ordinal from the run's signed scoring ledger (`ledger.jsonl`, verified by \
         `starling-operator ledger verify`) where it has one:\n\n\
         | Peer | Rating |\n|---|---:|\n",
    );
    for (peer, rating) in rated {
        let rating = rating.map_or("not scored".to_owned(), |r| format!("{r:.2}"));
        let _ = writeln!(s, "| `{peer}` | {rating} |");
    }
    s.push('\n');
    s
}

fn compression(meta: &serde_json::Value) -> String {
    let codec = &meta["codec"];
    let (Some(chunk), Some(k)) = (codec["chunk"].as_u64(), codec["k"].as_u64()) else {
        return String::new();
    };
    let bits = match &codec["bits"] {
        serde_json::Value::Null => "quantised".to_owned(),
        b => format!("{}-bit", b.as_str().map_or(b.to_string(), str::to_owned)),
    };
    format!(
        "## Compression\n\nEvery round each peer sent the top {k} of every {chunk} values of its \
         pseudo-gradient, {bits} values, with error feedback ({}).\n\n",
        meta["algorithm"].as_str().unwrap_or("SparseLoCo"),
    )
}

fn how_to_load(repo: &RepoId) -> String {
    format!(
        "## How to load\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n\
         tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")\n\
         inputs = tokenizer(\"ROMEO:\", return_tensors=\"pt\")\n\
         print(tokenizer.decode(model.generate(**inputs, max_new_tokens=100)[0]))\n```\n\n\
         `starling.json` records the run, round, loss curve and compression settings.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_names_the_run_its_loss_and_how_to_load_it() {
        let repo: RepoId = "org/tiny".parse().unwrap();
        let config = serde_json::json!({"num_hidden_layers": 2, "hidden_size": 64,
            "num_attention_heads": 4, "vocab_size": 256});
        let meta = serde_json::json!({"run": "shakespeare", "round": 12, "algorithm": "SparseLoCo",
            "validation_loss": 2.5, "tokens": 1000, "contributors": ["p0", "p2"],
            "codec": {"chunk": 4096, "k": 64, "bits": 2},
            "validation_curve": [{"round": 0, "loss": 5.5}, {"round": 12, "loss": 2.5}]});
        let ctx = CardContext {
            license: Some("apache-2.0".into()),
            datasets: vec!["tiny_shakespeare".into()],
            contributors: vec![],
        };
        let card = model_card(&repo, &config, &meta, &ctx);
        for needle in [
            "license: \"apache-2.0\"",
            "- starling\n- federated-training",
            "value: 2.5000",
            "| Round | 12 |",
            "best 2.5000 at round 12",
            "| `p2` | not scored |",
            "top 64 of every 4096 values of its pseudo-gradient, 2-bit",
            "from_pretrained(\"org/tiny\")",
        ] {
            assert!(card.contains(needle), "{needle} missing from:\n{card}");
        }
    }

    #[test]
    fn contributors_are_rated_from_the_checkpoints_ledger() {
        use crate::outer::Round;
        use crate::scoring::ScoringSpec;
        use crate::scoring::ledger::{Draft, EvaluatorReport};
        use crate::scoring::rules::{Evaluation, Measured};
        let measured = (0..2)
            .map(|p| {
                let e = Evaluation {
                    score: 0.01 * f64::from(p + 1),
                    own_score: 0.03,
                    sync_distance: 0.0,
                    copy: None,
                };
                (crate::exchange::PeerId::new(p), Measured::Evaluated(e))
            })
            .collect();
        let (record, _) = Draft {
            run: "ns/run",
            round: Round(4),
            theta: "00",
            constants: &ScoringSpec::default(),
            evaluators: vec![EvaluatorReport {
                evaluator: "e0".into(),
                round: Round(4),
                theta: String::new(),
                seed: "00".into(),
                measured,
                public_key: String::new(),
                signature: String::new(),
            }],
        }
        .record(None);
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_string(&record).unwrap();
        std::fs::write(dir.path().join("ledger.jsonl"), line + "\n").unwrap();
        let meta = serde_json::json!({"contributors": ["p0", "p1", "p5"]});
        let ctx = with_ledger_ratings(&CardContext::default(), dir.path(), &meta);
        let rating = |p: &str| ctx.contributors.iter().find(|(q, _)| q == p).unwrap().1;
        assert!(rating("p1").unwrap() > rating("p0").unwrap());
        assert_eq!(rating("p5"), None);
        let section = contributors(&meta, &ctx);
        assert!(section.contains("| `p5` | not scored |"), "{section}");
    }
}
