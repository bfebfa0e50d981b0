//! Which closed rounds the exchange keeps for fetching: bounded by bytes, not only by
//! count, so that a dense run's exchange holds no more than a few copies of the model.

/// How many of the newest closed rounds to keep, given the payload bytes of each (oldest
/// first): the newest always, older ones up to `keep_rounds` in all and only while the
/// kept rounds hold no more than the state (`state_bytes`).
///
/// A peer (or evaluator) that far behind is sent the state instead of the rounds it
/// missed, which is no more to download, so nothing is lost by forgetting them; and the
/// exchange's memory stays within the state plus a round. Dense updates are each as
/// large as the state, so a dense run keeps only its newest round, where keeping four
/// rounds of four peers would hold sixteen copies of the model; a compressed run's
/// rounds are hundreds of times smaller and all `keep_rounds` stay.
pub(super) fn rounds_to_keep(payloads: &[u64], keep_rounds: usize, state_bytes: u64) -> usize {
    let mut held = 0u64;
    let kept = (payloads.iter().rev())
        .take(keep_rounds.max(1))
        .take_while(|&&bytes| {
            held += bytes;
            held <= state_bytes
        })
        .count();
    kept.max(1)
}

#[cfg(test)]
mod tests {
    use super::rounds_to_keep;

    #[test]
    fn compressed_rounds_far_smaller_than_the_state_are_all_kept_up_to_the_count() {
        assert_eq!(rounds_to_keep(&[10; 6], 4, 1_000), 4);
        assert_eq!(rounds_to_keep(&[10; 2], 4, 1_000), 2);
    }

    #[test]
    fn dense_rounds_as_large_as_the_state_keep_only_the_newest() {
        // Four peers' dense updates: four states a round.
        assert_eq!(rounds_to_keep(&[400; 4], 4, 100), 1);
    }

    #[test]
    fn older_rounds_are_kept_while_all_kept_hold_no_more_than_the_state() {
        // Newest first: 30, 30, 30 fit in 100, a fourth would make 120.
        assert_eq!(rounds_to_keep(&[30, 30, 30, 30, 30], 8, 100), 3);
        assert_eq!(rounds_to_keep(&[30, 30, 30, 30, 30], 8, 90), 3);
        assert_eq!(rounds_to_keep(&[30, 30, 30, 30, 30], 8, 89), 2);
    }

    #[test]
    fn the_newest_round_is_kept_whatever_its_size_or_the_count() {
        assert_eq!(rounds_to_keep(&[1, 1_000_000], 4, 10), 1);
        assert_eq!(rounds_to_keep(&[1, 1], 0, 10), 1);
    }
}
