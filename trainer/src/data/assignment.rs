use super::{DataError, Token};

/// Which training windows each peer trains on, round by round.
///
/// The training tokens are cut into `W = ⌊(n − 1) / seq⌋` windows of `seq + 1` tokens
/// (window `w` starts at `w·seq`; its extra token is the last target). Sample `i` of peer
/// `p` in round `r` is sample `g = (r·P + p)·per_round + i` of the run's stream, and that
/// is window `π_e(g mod W)`, where `e = ⌊g / W⌋` is the epoch and `π_e` a keyed
/// pseudo-random permutation of `[0, W)`. So within an epoch no window is used twice,
/// peers never share a window in a round, and anyone who knows the run's seed, peer
/// count and batch size can recompute any peer's windows, one at a time, without
/// materialising a permutation: that is how evaluators check what a peer trained on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    seed: u64,
    peers: u64,
    per_round: u64,
    seq: usize,
    windows: u64,
}

/// Input and target tokens for `rows` sequences of `seq` tokens, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<Token>,
    pub targets: Vec<Token>,
    pub rows: usize,
    pub seq: usize,
}

impl Assignment {
    /// `peers` is the run's maximum peer count (fixed for the run, so assignments do not
    /// move when peers come and go); `per_round` the sequences a peer trains on per round.
    pub fn new(
        seed: u64,
        peers: u32,
        per_round: u64,
        seq: usize,
        train_tokens: usize,
    ) -> Result<Self, DataError> {
        let windows = (train_tokens.saturating_sub(1) / seq.max(1)) as u64;
        if windows == 0 || seq == 0 {
            return Err(DataError::TooSmall {
                what: "one training window",
                needed: seq as u64 + 1,
                available: train_tokens as u64,
            });
        }
        Ok(Self {
            seed,
            peers: u64::from(peers.max(1)),
            per_round,
            seq,
            windows,
        })
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// The window of sample `i` (`< per_round`) of `peer` in `round`.
    pub fn window(&self, peer: u32, round: u32, i: u64) -> u64 {
        let g = (u64::from(round) * self.peers + u64::from(peer)) * self.per_round + i;
        let epoch = g / self.windows;
        permute(mix(self.seed ^ mix(epoch)), g % self.windows, self.windows)
    }

    /// All windows of `peer` in `round`, in training order.
    pub fn peer_round(&self, peer: u32, round: u32) -> Vec<u64> {
        (0..self.per_round)
            .map(|i| self.window(peer, round, i))
            .collect()
    }

    /// The tokens of `windows` from `tokens` (the training shard this was built for).
    pub fn batch(&self, tokens: &[Token], windows: &[u64]) -> Batch {
        let seq = self.seq;
        let mut inputs = Vec::with_capacity(windows.len() * seq);
        let mut targets = Vec::with_capacity(windows.len() * seq);
        for &w in windows {
            let start = w as usize * seq;
            inputs.extend_from_slice(&tokens[start..start + seq]);
            targets.extend_from_slice(&tokens[start + 1..start + seq + 1]);
        }
        Batch {
            inputs,
            targets,
            rows: windows.len(),
            seq,
        }
    }
}

/// splitmix64's finaliser: a fixed, well-mixed 64-bit hash (stable across versions and
/// languages, unlike a library RNG).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A keyed permutation of `[0, n)`: a 4-round Feistel network on the smallest even
/// number of bits covering `n`, cycle-walking until the result falls inside `[0, n)`
/// (fewer than 4 steps on average, since the domain is less than 4n).
fn permute(key: u64, x: u64, n: u64) -> u64 {
    let bits = (64 - (n - 1).leading_zeros()).max(2).next_multiple_of(2);
    let half = bits / 2;
    let mask = (1u64 << half) - 1;
    let mut x = x;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = mix(key ^ round.wrapping_mul(0xa076_1d64_78bd_642f) ^ r) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn permutations_are_bijections() {
        for n in [1u64, 2, 3, 10, 257, 1000] {
            for key in [0, 1, 0xdead_beef] {
                let image: HashSet<u64> = (0..n).map(|x| permute(key, x, n)).collect();
                assert_eq!(image.len() as u64, n);
                assert!(image.iter().all(|&y| y < n));
            }
        }
        // ...and keyed: different keys give different orders.
        let a: Vec<u64> = (0..100).map(|x| permute(1, x, 100)).collect();
        let b: Vec<u64> = (0..100).map(|x| permute(2, x, 100)).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn peers_never_share_windows_within_an_epoch() {
        let a = Assignment::new(42, 3, 16, 128, 1_000_000).unwrap();
        assert_eq!(a.windows(), 7812);
        let mut seen = HashSet::new();
        // 3 peers × 16 samples × 150 rounds = 7200 < 7812: one epoch, no repeats.
        for round in 0..150 {
            for peer in 0..3 {
                for w in a.peer_round(peer, round) {
                    assert!(w < a.windows());
                    assert!(seen.insert(w), "window {w} assigned twice");
                }
            }
        }
        // Recomputable: a fresh Assignment with the same inputs agrees.
        let again = Assignment::new(42, 3, 16, 128, 1_000_000).unwrap();
        assert_eq!(again.peer_round(2, 77), a.peer_round(2, 77));
        let other_seed = Assignment::new(43, 3, 16, 128, 1_000_000).unwrap();
        assert_ne!(other_seed.peer_round(2, 77), a.peer_round(2, 77));
    }

    #[test]
    fn batches_hold_inputs_and_next_token_targets() {
        let tokens: Vec<Token> = (0..100).collect();
        let a = Assignment::new(0, 1, 2, 10, tokens.len()).unwrap();
        // 100 tokens make 9 windows of 10 (+1 target); the last one ends at token 90.
        assert_eq!(a.windows(), 9);
        let b = a.batch(&tokens, &[0, 8]);
        assert_eq!((b.rows, b.seq), (2, 10));
        assert_eq!(&b.inputs[..10], &(0..10).collect::<Vec<_>>()[..]);
        assert_eq!(&b.targets[..10], &(1..11).collect::<Vec<_>>()[..]);
        assert_eq!(&b.inputs[10..], &(80..90).collect::<Vec<_>>()[..]);
        assert_eq!(&b.targets[10..], &(81..91).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn a_corpus_too_small_for_one_window_is_an_error() {
        let err = Assignment::new(0, 1, 1, 128, 100).unwrap_err();
        assert!(
            err.to_string().contains("need at least 129 tokens"),
            "{err}"
        );
    }
}
