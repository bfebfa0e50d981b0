//! Which closed rounds the exchange keeps for fetching: bounded by bytes, not only by
//! count, so that a dense run's exchange holds no more than a few copies of the model.

/// How many of the newest closed rounds to keep, given the payload bytes of each (oldest
/// first): the newest two always (up to `keep_rounds`), older ones up to `keep_rounds`
/// in all only while the kept rounds hold no more than the state (`state_bytes`).
///
/// Two, so that a peer or evaluator one round behind (left out of a round by its
/// deadline, or slower than the peers it scores) still fetches the round it missed: a
/// resync would cost a DDP peer its optimiser's moments and an evaluator a round's
/// scores. Beyond that, memory wins: a peer further behind is sent the state instead.
/// For a dense run that is less to download than the rounds it missed, and the
/// exchange holds two rounds where four rounds of four peers were sixteen copies of the
/// model; a compressed run's rounds are hundreds of times smaller than the state and
/// all `keep_rounds` stay, unless it has hundreds of peers.
pub(super) fn rounds_to_keep(payloads: &[u64], keep_rounds: usize, state_bytes: u64) -> usize {
    const ALWAYS: usize = 2;
    let keep_rounds = keep_rounds.max(1);
    let mut held = 0u64;
    let kept = (payloads.iter().rev())
        .take(keep_rounds)
        .enumerate()
        .take_while(|&(i, &bytes)| {
            held += bytes;
            i < ALWAYS || held <= state_bytes
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
    fn dense_rounds_as_large_as_the_state_keep_the_newest_two() {
        // Four peers' dense updates: four states a round.
        assert_eq!(rounds_to_keep(&[400; 4], 4, 100), 2);
    }

    #[test]
    fn older_rounds_are_kept_while_all_kept_hold_no_more_than_the_state() {
        // Newest first: 30, 30, 30 fit in 100, a fourth would make 120.
        assert_eq!(rounds_to_keep(&[30, 30, 30, 30, 30], 8, 100), 3);
        assert_eq!(rounds_to_keep(&[30, 30, 30, 30, 30], 8, 90), 3);
        assert_eq!(rounds_to_keep(&[30, 30, 30, 30, 30], 8, 89), 2);
        // Past the two always kept, a round too large stops the count.
        assert_eq!(rounds_to_keep(&[1, 500, 1, 1], 8, 100), 2);
    }

    #[test]
    fn the_newest_two_are_kept_whatever_their_size_and_the_count_caps_them() {
        assert_eq!(rounds_to_keep(&[1, 1_000_000], 4, 10), 2);
        assert_eq!(rounds_to_keep(&[1_000_000], 4, 10), 1);
        assert_eq!(rounds_to_keep(&[1, 1], 1, 10), 1);
        assert_eq!(rounds_to_keep(&[1, 1], 0, 10), 1);
    }
}
