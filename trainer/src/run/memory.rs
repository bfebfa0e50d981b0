//! The resident memory the exchange and an evaluator peak at, as a function of the
//! model, the algorithm and the peers: what the operator asks for on their behalf.
//!
//! Both hold the model several times over (θ as a tensor and as the outer loop's f32
//! copy, the outer state, the state as the bytes a late peer fetches), and a dense run's
//! exchange also holds every peer's update of the open round and of the round it keeps
//! (see the exchange's `rounds_to_keep`), with the buffers they pass through on the way
//! in and out. The multiples below cover `bench convergence --evaluators 1` peaks less
//! [`BASE_BYTES`], over the model's f32 size, with some headroom (the test below holds
//! them to it): a 9.5M-parameter model (36 MiB) with 4 peers peaked at 909 MiB
//! (exchange, DiLoCo), 873 MiB (DDP), 244 MiB (SparseLoCo), and 587 / 248 MiB
//! (evaluator, dense / SparseLoCo): 21–23, 5, 14 and 5 times the model over the base.
//! Not counted: a corpus larger than the built-in one (its token shards are held in
//! memory) and the embedding of a tokenizer's vocabulary the spec does not give.

use super::Algorithm;
use crate::model::ModelConfig;

/// A run's process whose memory follows its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Exchange,
    Evaluator,
}

/// The runtime, the built-in corpus's token shards and the validation rows.
const BASE_BYTES: u64 = 64 << 20;

/// The peak resident bytes of `role` in a run of `model` with `algorithm` and up to
/// `peers` peers.
pub fn peak_bytes(role: Role, model: &ModelConfig, algorithm: Algorithm, peers: u32) -> u64 {
    let theta = model.parameter_count() * 4;
    let peers = u64::from(peers.max(1));
    let copies = match (role, algorithm) {
        (Role::Exchange, Algorithm::SparseLoCo) => 6,
        // The open round's updates and the two kept rounds', and the buffers they pass
        // through (5 per peer); the model, the mean, the outer state and the state's
        // bytes, old and new (8).
        (Role::Exchange, Algorithm::DiLoCo | Algorithm::Ddp) => 8 + 5 * peers,
        (Role::Evaluator, Algorithm::SparseLoCo) => 6,
        // A dense round's updates, fetched and parsed, beside the model it measures.
        (Role::Evaluator, Algorithm::DiLoCo | Algorithm::Ddp) => 4 + 3 * peers,
    };
    BASE_BYTES + theta * copies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;

    /// The measurements this module's multiples come from, each under its estimate by
    /// less than half of it: the estimate holds without asking for twice the memory.
    #[test]
    fn estimates_cover_the_measured_peaks_with_modest_headroom() {
        let mid = ModelConfig {
            hidden_size: 384,
            intermediate_size: 1024,
            num_hidden_layers: 6,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            ..Preset::Tiny.config(256)
        };
        let mib = |bytes: u64| bytes >> 20;
        for (role, algorithm, measured_mib) in [
            (Role::Exchange, Algorithm::DiLoCo, 909),
            (Role::Exchange, Algorithm::Ddp, 873),
            (Role::Exchange, Algorithm::SparseLoCo, 244),
            (Role::Evaluator, Algorithm::DiLoCo, 587),
            (Role::Evaluator, Algorithm::SparseLoCo, 248),
        ] {
            let estimate = mib(peak_bytes(role, &mid, algorithm, 4));
            assert!(
                estimate >= measured_mib && estimate < 2 * measured_mib,
                "{role:?} {algorithm:?}: estimate {estimate} MiB, measured {measured_mib} MiB"
            );
        }
    }

    #[test]
    fn a_dense_exchange_grows_with_its_peers_and_a_sparse_one_does_not() {
        let m = Preset::Llama125M.config(32_000);
        let dense = |p| peak_bytes(Role::Exchange, &m, Algorithm::DiLoCo, p);
        let sparse = |p| peak_bytes(Role::Exchange, &m, Algorithm::SparseLoCo, p);
        assert!(dense(8) > dense(4));
        assert_eq!(sparse(8), sparse(4));
        assert!(sparse(4) < dense(4));
    }
}
