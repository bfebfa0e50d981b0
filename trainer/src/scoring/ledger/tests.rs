use super::*;
use crate::scoring::rules::Evaluation;

fn p(i: u32) -> PeerId {
    PeerId::new(i)
}

fn scored(score: f64) -> Measured {
    Measured::Evaluated(Evaluation {
        score,
        own_score: score + 0.002,
        sync_distance: 0.3,
        copy: None,
    })
}

/// Two evaluators' reports of `round`: p0–p2 honest, p3 hurting from round 2.
fn reports(round: u32) -> Vec<EvaluatorReport> {
    (0..2)
        .map(|e| EvaluatorReport {
            evaluator: format!("evaluator-{e}"),
            round: Round(round),
            theta: String::new(),
            seed: format!("{:064x}", round * 2 + e),
            measured: (0..4)
                .map(|i| {
                    let s = if i == 3 && round >= 2 { -0.02 } else { 0.01 };
                    (p(i), scored(s + 0.001 * f64::from(e + i)))
                })
                .collect(),
            public_key: String::new(),
            signature: String::new(),
        })
        .collect()
}

/// A signed ledger of `rounds` rounds, its lines and the public key.
fn ledger(signer: &Signer, rounds: u32) -> Vec<String> {
    let constants = ScoringSpec::default();
    let mut lines: Vec<String> = Vec::new();
    let mut state = Scoring::default();
    let evaluator = self::signer();
    for r in 0..rounds {
        let draft = Draft {
            run: "demo/3f2a",
            round: Round(r),
            theta: &format!("{:064x}", r + 100),
            constants: &constants,
            evaluators: (reports(r).into_iter())
                .map(|e| EvaluatorReport::from_signed(&e.signed(&evaluator)).unwrap())
                .collect(),
        };
        let previous = lines.last().map(|l| (l.as_str(), &state));
        let (record, after) = draft.record(previous);
        lines.push(signer.sign(&record));
        state = after;
    }
    lines
}

fn signer() -> Signer {
    Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap()
}

fn invalid_line(e: LedgerError) -> (usize, String) {
    match e {
        LedgerError::Invalid { line, reason, .. } => (line, reason),
        other => panic!("{other}"),
    }
}

#[test]
fn a_signed_ledger_verifies_and_replays_to_its_rows() {
    let signer = signer();
    let lines = ledger(&signer, 6);
    let verified = verify(&(lines.join("\n") + "\n"), &signer.public_key()).unwrap();
    assert_eq!(verified.records, 6);
    assert_eq!(
        (verified.first_round, verified.last_round),
        (Round(0), Round(5))
    );
    assert_eq!(verified.head, sha256_hex(lines[5].as_bytes()));
    let last: Record = serde_json::from_str(&lines[5]).unwrap();
    assert!(last.peers[&p(3)].excluded, "{:?}", last.peers[&p(3)]);
    assert!(!last.aggregate.contains(&p(3)));
    assert_eq!(last.previous, sha256_hex(lines[4].as_bytes()));
    let first: Record = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first.previous, GENESIS);
}

#[test]
fn changing_any_byte_of_any_record_is_caught_at_that_record() {
    let signer = signer();
    let lines = ledger(&signer, 3);
    for (i, line) in lines.iter().enumerate() {
        for at in 0..line.len() {
            let mut bytes = line.clone().into_bytes();
            bytes[at] ^= if bytes[at] == b'0' { 0x01 } else { 0x20 };
            let mut tampered = lines.clone();
            tampered[i] = String::from_utf8_lossy(&bytes).into_owned();
            let e = verify(&tampered.join("\n"), &signer.public_key()).unwrap_err();
            assert_eq!(invalid_line(e).0, i + 1, "byte {at} of record {i}");
        }
    }
}

#[test]
fn reordered_or_dropped_records_break_the_chain() {
    let signer = signer();
    let mut lines = ledger(&signer, 4);
    lines.swap(1, 2);
    let (line, reason) = invalid_line(verify(&lines.join("\n"), &signer.public_key()).unwrap_err());
    assert_eq!(line, 2);
    assert!(reason.contains("hash chain broken"), "{reason}");
    lines.swap(1, 2);
    lines.remove(1);
    let (line, _) = invalid_line(verify(&lines.join("\n"), &signer.public_key()).unwrap_err());
    assert_eq!(line, 2);
}

#[test]
fn another_key_does_not_verify() {
    let lines = ledger(&signer(), 2);
    let e = verify(&lines.join("\n"), &signer().public_key()).unwrap_err();
    let (line, reason) = invalid_line(e);
    assert_eq!(line, 1);
    assert!(reason.contains("signature does not verify"), "{reason}");
    assert!(matches!(
        verify(&lines[0], "not-hex"),
        Err(LedgerError::Key(_))
    ));
}

#[test]
fn a_record_re_signed_with_other_rows_fails_the_replay() {
    // Whoever holds the key can sign anything, but not make it follow from the
    // measurements: a cheater's weight restored is caught.
    let signer = signer();
    let mut lines = ledger(&signer, 6);
    let mut record: Record = serde_json::from_str(&lines[5]).unwrap();
    record.aggregate.push(p(3));
    record.peers.get_mut(&p(3)).unwrap().weight = 0.2;
    lines[5] = signer.sign(&record);
    let (line, reason) = invalid_line(verify(&lines.join("\n"), &signer.public_key()).unwrap_err());
    assert_eq!(line, 6);
    assert!(
        reason.contains("replaying the rules gives p3 another row"),
        "{reason}"
    );
    // So are measurements that are not what the evaluators reported.
    let mut lines = ledger(&signer, 3);
    let mut record: Record = serde_json::from_str(&lines[2]).unwrap();
    record.measured.insert(p(3), scored(0.05));
    lines[2] = signer.sign(&record);
    let (_, reason) = invalid_line(verify(&lines.join("\n"), &signer.public_key()).unwrap_err());
    assert!(reason.contains("do not combine"), "{reason}");
}

#[test]
fn a_ledger_cut_short_still_verifies_but_its_head_tells() {
    let signer = signer();
    let lines = ledger(&signer, 4);
    let whole = verify(&lines.join("\n"), &signer.public_key()).unwrap();
    let cut = verify(&lines[..3].join("\n"), &signer.public_key()).unwrap();
    assert_ne!(whole.head, cut.head);
    assert_eq!(verify("", &signer.public_key()), Err(LedgerError::Empty));
}

#[test]
fn evaluators_combine_by_median_and_one_liar_is_outvoted() {
    let report = |name: &str, m: Measured| EvaluatorReport {
        evaluator: name.into(),
        round: Round(0),
        theta: String::new(),
        seed: String::new(),
        measured: [(p(0), m)].into(),
        public_key: String::new(),
        signature: String::new(),
    };
    let combined = combine(&[
        report("a", scored(0.01)),
        report("b", scored(0.012)),
        report("liar", scored(9.0)),
    ]);
    match &combined[&p(0)] {
        Measured::Evaluated(e) => assert_eq!((e.score, e.own_score), (0.012, 0.014)),
        other => panic!("{other:?}"),
    }
    let invalid = Measured::Invalid {
        reason: "non-finite".into(),
    };
    let half = combine(&[report("a", invalid.clone()), report("b", scored(0.01))]);
    assert_eq!(half[&p(0)], invalid);
    let missing = combine(&[
        report("a", Measured::Missing),
        report("b", Measured::Missing),
    ]);
    assert_eq!(missing[&p(0)], Measured::Missing);
    assert!(combine(&[]).is_empty());
}

#[test]
fn an_evaluator_report_is_accepted_only_signed_by_the_key_it_names() {
    let evaluator = signer();
    let report = reports(1).remove(0);
    let line = report.clone().signed(&evaluator);
    assert_eq!(
        EvaluatorReport::from_signed(&line).unwrap().measured,
        report.measured
    );
    let unsigned = String::from_utf8(canonical::to_vec(&serde_json::to_value(&report).unwrap()));
    let err = EvaluatorReport::from_signed(&unsigned.unwrap()).unwrap_err();
    assert!(err.contains("not signed"), "{err}");
    let forged = line.replace("evaluator-0", "evaluator-9");
    let err = EvaluatorReport::from_signed(&forged).unwrap_err();
    assert!(err.contains("does not verify"), "{err}");
    let other = line.replace(&evaluator.public_key(), &signer().public_key());
    assert!(EvaluatorReport::from_signed(&other).is_err());
    assert!(EvaluatorReport::from_signed(&format!(" {line}")).is_err());
}

#[test]
fn a_record_whose_evaluator_report_was_altered_does_not_verify() {
    let signer = signer();
    let evaluator = self::signer();
    let mut report = reports(0).remove(0);
    let line = report.clone().signed(&evaluator);
    report = EvaluatorReport::from_signed(&line).unwrap();
    // The operator (who signs the record) changes a number the evaluator signed.
    if let Some(Measured::Evaluated(e)) = report.measured.get_mut(&p(0)) {
        e.score = 0.5;
    }
    let constants = ScoringSpec::default();
    let (record, _) = Draft {
        run: "demo/3f2a",
        round: Round(0),
        theta: "00",
        constants: &constants,
        evaluators: vec![report],
    }
    .record(None);
    let e = verify(&signer.sign(&record), &signer.public_key()).unwrap_err();
    let (line, reason) = invalid_line(e);
    assert_eq!(line, 1);
    assert!(reason.contains("does not verify"), "{reason}");
}
