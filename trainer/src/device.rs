//! Where a role's tensors live: `--device cpu|cuda|cuda:N|auto` (env `STARLING_DEVICE`).
//!
//! `auto` takes the first CUDA device when this binary was built with the `cuda` feature
//! and one answers, and the CPU otherwise, and says which and why: a pod that asked for a
//! GPU and trains on the CPU must be visible in its log, not only in its speed. Asking for
//! `cuda` where there is none is an error naming the reason, never a fallback.
//!
//! `--precision f32|bf16|auto` (env `STARLING_PRECISION`) picks the dtype of the model's
//! matrix products ([`Precision`]); `auto` is bf16 where a peer trains on a GPU, whose
//! tensor cores run it many times faster than f32, and f32 on the CPU, which has no
//! bf16 kernel to gain from, and in the roles that measure rather than train (the
//! exchange's validation loss, evaluators' scores): their numbers are compared with
//! thresholds and with each other, and stay exact.

use candle_core::Device;

use crate::model::Precision;

/// The device a role was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    /// A CUDA device by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device {other:?}: expected cpu, cuda, cuda:N or auto")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device {0}: this starling-trainer was built without CUDA; use --device cpu, or a \
         binary built with `--features cuda` (see trainer/cuda/toolchain.sh)"
    )]
    NotBuilt(DeviceChoice),
    #[error("--device {choice}: no usable CUDA device: {reason}")]
    Unavailable {
        choice: DeviceChoice,
        reason: String,
    },
}

/// The precision a role was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionChoice {
    /// bf16 products on a GPU, f32 on the CPU.
    Auto,
    Fixed(Precision),
}

impl std::str::FromStr for PrecisionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            // The spellings of the CRD's `spec.peers.precision`.
            other => serde_json::from_value(serde_json::Value::from(other))
                .map(Self::Fixed)
                .map_err(|_| format!("precision {other:?}: expected f32, bf16 or auto")),
        }
    }
}

impl std::fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(precision) => precision.fmt(f),
        }
    }
}

/// What a role does with its model: `auto` precision depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Train,
    /// Losses that are reported, compared or scored.
    Measure,
}

impl PrecisionChoice {
    /// The precision on `device` for a role that does `work`.
    pub fn on(self, device: &Device, work: Use) -> Precision {
        match self {
            Self::Fixed(precision) => precision,
            Self::Auto if device.is_cpu() || work == Use::Measure => Precision::F32,
            Self::Auto => Precision::Bf16,
        }
    }
}

/// The `--device` and `--precision` flags every tensor-holding role takes.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N, or auto (CUDA when this binary has it and a GPU answers).
    #[arg(long, env = crate::env::DEVICE, default_value = "auto")]
    pub device: DeviceChoice,
    /// The dtype of the model's matrix products: f32, bf16 (autocast: weights, gradients
    /// and optimiser state stay f32), or auto (bf16 to train on a GPU, f32 otherwise).
    #[arg(long, env = crate::env::PRECISION, default_value = "auto")]
    pub precision: PrecisionChoice,
}

/// Where a role's model lives and the dtype its products run in.
#[derive(Clone, Debug)]
pub struct Placement {
    pub device: Device,
    pub precision: Precision,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

impl DeviceChoice {
    /// Opens the device on this machine, logging which and why.
    pub fn open(self) -> Result<Device, DeviceError> {
        let (device, why) = open(self, candle_core::utils::cuda_is_available())?;
        tracing::info!(device = %describe(&device), "{why}");
        Ok(device)
    }
}

impl DeviceArgs {
    /// Opens the device and resolves the precision on it for `work`, logging which and
    /// why.
    pub fn open(&self, work: Use) -> Result<Placement, DeviceError> {
        let device = self.device.open()?;
        let precision = self.precision.on(&device, work);
        tracing::info!(%precision, "matrix products in {precision}");
        Ok(Placement { device, precision })
    }
}

/// The device for `choice` where `cuda_built` says whether this binary has CUDA, and a
/// sentence saying why it is the one.
pub fn open(choice: DeviceChoice, cuda_built: bool) -> Result<(Device, String), DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "training on the CPU, as asked".into())),
        DeviceChoice::Cuda(_) if !cuda_built => Err(DeviceError::NotBuilt(choice)),
        DeviceChoice::Cuda(n) => Device::new_cuda(n)
            .map(|d| (d, format!("training on CUDA device {n}, as asked")))
            .map_err(|e| DeviceError::Unavailable {
                choice,
                reason: e.to_string(),
            }),
        DeviceChoice::Auto if !cuda_built => Ok((
            Device::Cpu,
            "training on the CPU: this binary was built without CUDA".into(),
        )),
        DeviceChoice::Auto => match Device::new_cuda(0) {
            Ok(d) => Ok((d, "training on CUDA device 0 (auto)".into())),
            Err(e) => Ok((
                Device::Cpu,
                format!("training on the CPU: no usable CUDA device ({e})"),
            )),
        },
    }
}

/// `cpu` or `cuda:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (name, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(name.parse(), Ok(choice));
            assert_eq!(choice.to_string(), name);
        }
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("cpu, cuda, cuda:N or auto"), "{e}");
        }
    }

    #[test]
    fn auto_precision_is_bf16_to_train_on_a_gpu_and_f32_otherwise_and_a_fixed_one_is_kept() {
        assert_eq!("auto".parse(), Ok(PrecisionChoice::Auto));
        assert_eq!(PrecisionChoice::Auto.to_string(), "auto");
        assert_eq!(
            PrecisionChoice::Auto.on(&Device::Cpu, Use::Train),
            Precision::F32
        );
        for (name, precision) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
            let choice: PrecisionChoice = name.parse().unwrap();
            assert_eq!(choice.on(&Device::Cpu, Use::Train), precision);
            assert_eq!(choice.on(&Device::Cpu, Use::Measure), precision);
            assert_eq!(choice.to_string(), name);
            assert_eq!(precision.to_string(), name);
        }
        let e = "fp16".parse::<PrecisionChoice>().unwrap_err();
        assert!(e.contains("f32, bf16 or auto"), "{e}");
        // A GPU, where this machine has one.
        if let Ok(gpu) = Device::new_cuda(0) {
            assert_eq!(PrecisionChoice::Auto.on(&gpu, Use::Train), Precision::Bf16);
            assert_eq!(PrecisionChoice::Auto.on(&gpu, Use::Measure), Precision::F32);
        }
    }

    #[test]
    fn auto_without_cuda_picks_the_cpu_and_says_why() {
        let (device, why) = open(DeviceChoice::Auto, false).unwrap();
        assert!(device.is_cpu());
        assert!(why.contains("CPU") && why.contains("without CUDA"), "{why}");
    }

    #[test]
    fn asking_for_cuda_without_it_is_a_clear_error() {
        let e = open(DeviceChoice::Cuda(1), false).unwrap_err();
        assert!(matches!(e, DeviceError::NotBuilt(DeviceChoice::Cuda(1))));
        let message = e.to_string();
        assert!(message.contains("--device cuda:1") && message.contains("--features cuda"));
    }

    /// On this machine, whatever it has: auto never fails, cpu is the CPU, and cuda either
    /// opens a GPU or names why not.
    #[test]
    fn on_this_machine_auto_never_fails_and_cuda_opens_or_explains() {
        let built = candle_core::utils::cuda_is_available();
        assert!(open(DeviceChoice::Auto, built).is_ok());
        assert!(open(DeviceChoice::Cpu, built).unwrap().0.is_cpu());
        match open(DeviceChoice::Cuda(0), built) {
            Ok((device, _)) => assert!(device.is_cuda()),
            Err(e) => assert!(e.to_string().starts_with("--device cuda:0: "), "{e}"),
        }
    }
}
