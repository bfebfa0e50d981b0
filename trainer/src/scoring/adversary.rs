//! Adversaries, a testing aid: what a cheating peer sends instead of its honest work.
//! Every kind still passes the exchange's decoder; scoring has to catch it.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::codec::{CodecError, Compressor, EncodedTensor, Finite, Update};
use crate::exchange::PeerId;

/// How a peer cheats (`--adversary KIND`).
#[derive(Clone, Debug, PartialEq)]
pub enum Adversary {
    /// A random update of its honest update's norm, at the same positions.
    Noise,
    /// Its honest update multiplied by F.
    Scale(f32),
    /// Its honest update negated.
    SignFlip,
    /// All zeros.
    Zero,
    /// Another peer's previous update, as its own.
    Copy(PeerId),
    /// Its own update of two rounds before, again.
    Replay,
    /// Trains from a θ two rounds old.
    Stale,
    /// Trains on data it was not assigned.
    OffSlice,
    /// Never applies the outer step: trains on alone.
    Frozen,
}

impl FromStr for Adversary {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let bad = || {
            format!(
                "unknown adversary {s:?}: expected noise, scale:F, signflip, zero, copy:PEER, \
                 replay, stale, offslice or frozen"
            )
        };
        Ok(match (kind, arg) {
            ("noise", "") => Adversary::Noise,
            ("scale", f) => Adversary::Scale(
                f.parse()
                    .ok()
                    .filter(|f: &f32| f.is_finite())
                    .ok_or_else(bad)?,
            ),
            ("signflip", "") => Adversary::SignFlip,
            ("zero", "") => Adversary::Zero,
            ("copy", peer) => Adversary::Copy(peer.parse()?),
            ("replay", "") => Adversary::Replay,
            ("stale", "") => Adversary::Stale,
            ("offslice", "") => Adversary::OffSlice,
            ("frozen", "") => Adversary::Frozen,
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Adversary::Noise => write!(f, "noise"),
            Adversary::Scale(x) => write!(f, "scale:{x}"),
            Adversary::SignFlip => write!(f, "signflip"),
            Adversary::Zero => write!(f, "zero"),
            Adversary::Copy(p) => write!(f, "copy:{p}"),
            Adversary::Replay => write!(f, "replay"),
            Adversary::Stale => write!(f, "stale"),
            Adversary::OffSlice => write!(f, "offslice"),
            Adversary::Frozen => write!(f, "frozen"),
        }
    }
}

/// When a peer applies the rounds it fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applies {
    /// As they close, as honest peers do.
    AtOnce,
    /// This many rounds after they close: it trains from an old θ.
    Late(usize),
    /// Never: it trains on alone.
    Never,
}

/// What the adversary can draw on besides its honest update.
pub struct Material<'a> {
    /// Its own update of two rounds before, if any.
    pub own_old: Option<&'a [u8]>,
    /// The copied peer's update of the previous round, if any.
    pub copied: Option<&'a [u8]>,
    pub seed: u64,
}

impl Adversary {
    /// Whose data `peer` (of `peers`) trains on.
    pub fn trains_on(&self, peer: PeerId, peers: u32) -> PeerId {
        match self {
            Adversary::OffSlice => PeerId::new((peer.index() + 1) % peers.max(1)),
            _ => peer,
        }
    }

    pub fn applies(&self) -> Applies {
        match self {
            Adversary::Stale => Applies::Late(2),
            Adversary::Frozen => Applies::Never,
            _ => Applies::AtOnce,
        }
    }

    /// The update sent in place of `honest` (the kinds that cheat in how they train send
    /// it unchanged; so do replay and copy before there is anything to replay or copy).
    pub fn tamper(&self, honest: &[u8], m: &Material<'_>) -> Result<Vec<u8>, CodecError> {
        match self {
            Adversary::Copy(_) => return Ok(m.copied.unwrap_or(honest).to_vec()),
            Adversary::Replay => return Ok(m.own_old.unwrap_or(honest).to_vec()),
            Adversary::Stale | Adversary::OffSlice | Adversary::Frozen => {
                return Ok(honest.to_vec());
            }
            _ => {}
        }
        let update = Update::from_bytes(honest)?;
        let mut rng = StdRng::seed_from_u64(m.seed);
        let dense = |f: &mut dyn FnMut(&mut [f32])| reencode(&update, f);
        Ok(match self {
            Adversary::Noise => dense(&mut |d: &mut [f32]| {
                let norm = l2(d);
                for v in d.iter_mut().filter(|v| **v != 0.0) {
                    *v = normal(&mut rng);
                }
                let scale = if l2(d) > 0.0 { norm / l2(d) } else { 0.0 };
                d.iter_mut().for_each(|v| *v *= scale);
            })?,
            Adversary::Scale(x) => dense(&mut |d: &mut [f32]| d.iter_mut().for_each(|v| *v *= x))?,
            Adversary::SignFlip => dense(&mut |d: &mut [f32]| d.iter_mut().for_each(|v| *v = -*v))?,
            Adversary::Zero => dense(&mut |d: &mut [f32]| d.fill(0.0))?,
            Adversary::Copy(_)
            | Adversary::Replay
            | Adversary::Stale
            | Adversary::OffSlice
            | Adversary::Frozen => update,
        }
        .to_bytes())
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn l2(d: &[f32]) -> f32 {
    d.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// `update` decoded, changed by `f` tensor by tensor, and encoded again (without error
/// feedback: the residual is dropped).
fn reencode(update: &Update, f: &mut dyn FnMut(&mut [f32])) -> Result<Update, CodecError> {
    let compressor = Compressor::new(update.config(), 0.0)?;
    let tensors = (update.tensors().iter())
        .map(|t: &EncodedTensor| {
            let mut dense = vec![0.0; t.numel()];
            t.decode_add(1.0, &mut dense)?;
            f(&mut dense);
            let mut ef = vec![0.0; t.numel()];
            compressor.compress(t.name(), t.shape(), Finite::new(&dense)?, &mut ef)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Update::new(update.config(), tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print_back() {
        for kind in [
            "noise",
            "scale:20",
            "scale:0.5",
            "signflip",
            "zero",
            "copy:p1",
            "replay",
            "stale",
            "offslice",
            "frozen",
        ] {
            assert_eq!(kind.parse::<Adversary>().unwrap().to_string(), kind);
        }
        for bad in [
            "scale",
            "scale:x",
            "scale:inf",
            "copy:",
            "copy:1",
            "loud",
            "zero:1",
        ] {
            assert!(bad.parse::<Adversary>().is_err(), "{bad}");
        }
    }
}
