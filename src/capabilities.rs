//! This machine's capabilities, detected, and the flops of Apple's chips: what
//! a node sends in its hello (the types are the protocol's).

pub use crate::protocol::capabilities::{DeviceCapabilities, Flops};

/// This machine, detected through sysinfo (sysctl on macOS, /proc and DMI on
/// Linux), with flops looked up from the chip name.
pub fn detect() -> DeviceCapabilities {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, Product, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_memory(MemoryRefreshKind::nothing().with_ram())
            .with_cpu(CpuRefreshKind::nothing()),
    );
    let chip = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_owned())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "Unknown Chip".to_owned());
    // On a Mac this is the model identifier from `hw.model` (e.g. "Mac14,6").
    let model = Product::name()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .or_else(System::host_name)
        .unwrap_or_else(|| "Unknown Model".to_owned());
    DeviceCapabilities {
        flops: chip_flops(&chip),
        model,
        chip,
        memory: sys.total_memory() / (1024 * 1024),
    }
}

/// Peak TFLOPS of Apple's chips, the figures exo uses to weigh nodes. Chips not
/// listed (every Linux CPU among them) count as zero: no guess is better than a
/// wrong one when layers are split by these numbers.
pub fn chip_flops(chip: &str) -> Flops {
    const TABLE: &[(&str, f32, f32, f32)] = &[
        ("Apple M1", 2.29, 4.58, 9.16),
        ("Apple M1 Pro", 5.30, 10.60, 21.20),
        ("Apple M1 Max", 10.60, 21.20, 42.40),
        ("Apple M1 Ultra", 21.20, 42.40, 84.80),
        ("Apple M2", 3.55, 7.10, 14.20),
        ("Apple M2 Pro", 5.68, 11.36, 22.72),
        ("Apple M2 Max", 13.49, 26.98, 53.96),
        ("Apple M2 Ultra", 26.98, 53.96, 107.92),
        ("Apple M3", 3.55, 7.10, 14.20),
        ("Apple M3 Pro", 4.97, 9.94, 19.88),
        ("Apple M3 Max", 14.20, 28.40, 56.80),
        ("Apple M3 Ultra", 54.26, 108.52, 217.04),
        ("Apple M4", 4.26, 8.52, 17.04),
        ("Apple M4 Pro", 5.72, 11.44, 22.88),
        ("Apple M4 Max", 18.03, 36.07, 72.14),
    ];
    TABLE
        .iter()
        .find(|(name, ..)| *name == chip)
        .map(|&(_, fp32, fp16, int8)| Flops { fp32, fp16, int8 })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_chip_has_flops_and_unknown_has_none() {
        assert_eq!(chip_flops("Apple M2 Max").fp16, 26.98);
        assert_eq!(chip_flops("Apple M2 Max Pro"), Flops::default());
        assert_eq!(chip_flops("Intel(R) Xeon(R)"), Flops::default());
    }

    /// Against the kernel's own account of this machine, not our reading of it.
    #[cfg(target_os = "linux")]
    #[test]
    fn detect_reads_this_machine() {
        let caps = detect();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let model_name = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_owned());
        if let Some(name) = model_name {
            assert_eq!(caps.chip, name);
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(caps.memory, kib / 1024, "{caps:?}");
    }
}
