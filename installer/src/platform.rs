//! Whether a Mac can run the node binary about to be installed on it. The
//! binary's own header says which CPU and system it was built for and, on
//! macOS, the oldest version it runs on (Mach-O's `LC_BUILD_VERSION`); the Mac
//! says what it is through `uname`, `sysctl` and `sw_vers`. Copying a binary
//! that cannot start there would leave a node that launchd restarts every two
//! seconds, forever, with "Bad CPU type in executable" in its log.

use std::fmt;

use object::macho::MachHeader64;
use object::read::macho::{
    FatArch, LoadCommandVariant, MachHeader, MachOFatFile32, MachOFatFile64,
};
use object::{Architecture, Endianness, FileKind, Object};
use thiserror::Error;

/// What a binary runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    MacOs,
    Linux,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Arm64,
    X86_64,
}

/// A macOS version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Mach-O's encoding: `X.Y.Z` in nibbles `xxxx.yy.zz`.
    fn from_nibbles(v: u32) -> Version {
        Version(v >> 16, (v >> 8) & 0xff, v & 0xff)
    }

    /// `sw_vers -productVersion`: "14.5", "15.0.1".
    pub fn parse(text: &str) -> Option<Version> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next().unwrap_or(Some(0))?;
        let patch = parts.next().unwrap_or(Some(0))?;
        parts
            .next()
            .is_none()
            .then_some(Version(major, minor, patch))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)?;
        if self.2 != 0 {
            write!(f, ".{}", self.2)?;
        }
        Ok(())
    }
}

/// One architecture a binary holds (a universal binary holds several).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Build {
    pub os: Os,
    pub arch: Arch,
    /// The oldest macOS it starts on, from its header.
    pub min_macos: Option<Version>,
}

impl fmt::Display for Build {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arch = match self.arch {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x86_64",
        };
        match (self.os, self.min_macos) {
            (Os::MacOs, Some(v)) => write!(f, "macOS {v} or later on {arch}"),
            (Os::MacOs, None) => write!(f, "macOS on {arch}"),
            (Os::Linux, _) => write!(f, "Linux on {arch}"),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlatformError {
    #[error("it is not a program for macOS or Linux on arm64 or x86_64 ({0})")]
    NotAProgram(String),
    #[error("{host} cannot run it: it is built for {builds}")]
    Unsupported { host: String, builds: String },
    #[error("could not tell what it is from what it answered: {0:?}")]
    UnknownHost(String),
}

/// The architectures a node binary is built for, read from its header.
pub fn builds_of(binary: &[u8]) -> Result<Vec<Build>, PlatformError> {
    let kind = FileKind::parse(binary).map_err(|e| PlatformError::NotAProgram(e.to_string()))?;
    let slices: Vec<&[u8]> = match kind {
        FileKind::MachOFat32 => fat_slices(MachOFatFile32::parse(binary), binary)?,
        FileKind::MachOFat64 => fat_slices(MachOFatFile64::parse(binary), binary)?,
        _ => vec![binary],
    };
    slices.into_iter().map(build_of).collect()
}

fn fat_slices<'a, F: FatArch>(
    fat: object::Result<object::read::macho::MachOFatFile<'a, F>>,
    binary: &'a [u8],
) -> Result<Vec<&'a [u8]>, PlatformError> {
    let fat = fat.map_err(|e| PlatformError::NotAProgram(e.to_string()))?;
    fat.arches()
        .iter()
        .map(|a| {
            a.data(binary)
                .map_err(|e| PlatformError::NotAProgram(e.to_string()))
        })
        .collect()
}

fn build_of(binary: &[u8]) -> Result<Build, PlatformError> {
    let bad = |what: String| PlatformError::NotAProgram(what);
    match FileKind::parse(binary).map_err(|e| bad(e.to_string()))? {
        FileKind::Elf64 => {
            let file = object::File::parse(binary).map_err(|e| bad(e.to_string()))?;
            let arch = match file.architecture() {
                Architecture::Aarch64 => Arch::Arm64,
                Architecture::X86_64 => Arch::X86_64,
                other => return Err(bad(format!("ELF for {other:?}"))),
            };
            Ok(Build {
                os: Os::Linux,
                arch,
                min_macos: None,
            })
        }
        // Only the header and load commands are read: a stripped binary, or
        // one the symbol reader dislikes, still says what it runs on.
        FileKind::MachO64 => {
            let header =
                MachHeader64::<Endianness>::parse(binary, 0).map_err(|e| bad(e.to_string()))?;
            let endian = header.endian().map_err(|e| bad(e.to_string()))?;
            let arch = match header.cputype(endian) {
                object::macho::CPU_TYPE_ARM64 => Arch::Arm64,
                object::macho::CPU_TYPE_X86_64 => Arch::X86_64,
                other => return Err(bad(format!("Mach-O for CPU type {other:#x}"))),
            };
            let mut commands = header
                .load_commands(endian, binary, 0)
                .map_err(|e| bad(e.to_string()))?;
            Ok(Build {
                os: Os::MacOs,
                arch,
                min_macos: min_macos(&mut commands, endian),
            })
        }
        other => Err(bad(format!("{other:?}"))),
    }
}

/// `LC_BUILD_VERSION` (what current linkers write), else the older
/// `LC_VERSION_MIN_MACOSX`.
fn min_macos(
    commands: &mut object::read::macho::LoadCommandIterator<'_, Endianness>,
    endian: Endianness,
) -> Option<Version> {
    while let Ok(Some(command)) = commands.next() {
        match command.variant().ok()? {
            LoadCommandVariant::BuildVersion(b)
                if b.platform.get(endian) == object::macho::PLATFORM_MACOS =>
            {
                return Some(Version::from_nibbles(b.minos.get(endian)));
            }
            LoadCommandVariant::VersionMin(v)
                if v.cmd.get(endian) == object::macho::LC_VERSION_MIN_MACOSX =>
            {
                return Some(Version::from_nibbles(v.version.get(endian)));
            }
            _ => {}
        }
    }
    None
}

/// The shell commands whose answers make a [`Host`], one `key=value` per
/// line. `hw.optional.arm64` is 1 on Apple silicon even in a shell running
/// under Rosetta, where `uname -m` says x86_64.
pub const PROBE: &str = "echo \"os=$(uname -s)\"; echo \"arch=$(uname -m)\"; \
echo \"arm64=$(sysctl -n hw.optional.arm64 2>/dev/null)\"; \
echo \"macos=$(sw_vers -productVersion 2>/dev/null)\"";

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.said)
    }
}

/// A machine, as [`PROBE`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub os: Option<Os>,
    pub arch: Option<Arch>,
    pub macos: Option<Version>,
    /// What it said, for messages: "Darwin arm64 14.5".
    said: String,
}

impl Host {
    /// From [`PROBE`]'s answer (other `key=value` lines are ignored).
    pub fn parse(text: &str) -> Result<Host, PlatformError> {
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let unknown = || PlatformError::UnknownHost(text.trim().to_owned());
        let (uname_s, uname_m) = (
            value("os").ok_or_else(unknown)?,
            value("arch").ok_or_else(unknown)?,
        );
        let os = match uname_s {
            "Darwin" => Some(Os::MacOs),
            "Linux" => Some(Os::Linux),
            _ => None,
        };
        let arch = match uname_m {
            "arm64" | "aarch64" => Some(Arch::Arm64),
            "x86_64" if os == Some(Os::MacOs) && value("arm64") == Some("1") => Some(Arch::Arm64),
            "x86_64" => Some(Arch::X86_64),
            _ => None,
        };
        let macos = value("macos").and_then(Version::parse);
        let said = match (os, macos) {
            (Some(Os::MacOs), Some(v)) => format!("macOS {v} on {uname_m}"),
            _ => format!("{uname_s} on {uname_m}"),
        };
        Ok(Host {
            os,
            arch,
            macos,
            said,
        })
    }

    /// Ok when one of `builds` starts here.
    pub fn runs(&self, builds: &[Build]) -> Result<(), PlatformError> {
        let fits = |b: &Build| {
            Some(b.os) == self.os
                && Some(b.arch) == self.arch
                && match (b.min_macos, self.macos) {
                    (Some(min), Some(have)) => have >= min,
                    // No version to compare: the header or sw_vers said none.
                    _ => true,
                }
        };
        if builds.iter().any(fits) {
            return Ok(());
        }
        Err(PlatformError::Unsupported {
            host: self.said.clone(),
            builds: builds
                .iter()
                .map(Build::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the probe prints on an Apple silicon Mac with macOS 14.5
    /// (`uname -s`, `uname -m`, `sysctl -n hw.optional.arm64`, `sw_vers -productVersion`).
    const MAC: &str = "os=Darwin\narch=arm64\narm64=1\nmacos=14.5\n";

    fn mac_arm64(min: Version) -> Build {
        Build {
            os: Os::MacOs,
            arch: Arch::Arm64,
            min_macos: Some(min),
        }
    }

    #[test]
    fn an_apple_silicon_mac_runs_an_arm64_build_for_its_version_or_older() {
        let host = Host::parse(MAC).unwrap();
        assert_eq!(host.runs(&[mac_arm64(Version(11, 0, 0))]), Ok(()));
        assert_eq!(host.runs(&[mac_arm64(Version(14, 5, 0))]), Ok(()));
        let newer = host.runs(&[mac_arm64(Version(15, 0, 0))]).unwrap_err();
        assert_eq!(
            newer.to_string(),
            "macOS 14.5 on arm64 cannot run it: it is built for macOS 15.0 or later on arm64"
        );
    }

    #[test]
    fn a_rosetta_shell_is_still_apple_silicon_and_an_intel_mac_is_not() {
        let rosetta = Host::parse("os=Darwin\narch=x86_64\narm64=1\nmacos=13.6.1").unwrap();
        assert_eq!(rosetta.arch, Some(Arch::Arm64));
        assert_eq!(rosetta.macos, Some(Version(13, 6, 1)));
        // On an Intel Mac the sysctl does not exist: the probe prints nothing.
        let intel = Host::parse("os=Darwin\narch=x86_64\narm64=\nmacos=13.6.1").unwrap();
        let err = intel.runs(&[mac_arm64(Version(11, 0, 0))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "macOS 13.6.1 on x86_64 cannot run it: it is built for macOS 11.0 or later on arm64"
        );
    }

    #[test]
    fn linux_runs_only_a_linux_build_of_its_cpu() {
        let linux = Host::parse("os=Linux\narch=x86_64\narm64=\nmacos=\n").unwrap();
        let elf = Build {
            os: Os::Linux,
            arch: Arch::X86_64,
            min_macos: None,
        };
        assert_eq!(linux.runs(&[elf]), Ok(()));
        assert!(linux.runs(&[mac_arm64(Version(11, 0, 0))]).is_err());
        let arm = Host::parse("os=Linux\narch=aarch64\n").unwrap();
        assert!(arm.runs(&[elf]).is_err());
    }

    #[test]
    fn an_answer_without_uname_is_refused_with_what_was_said() {
        let err = Host::parse("zsh: command not found: uname").unwrap_err();
        assert!(matches!(err, PlatformError::UnknownHost(s) if s.contains("command not found")));
    }

    #[test]
    fn versions_read_as_sw_vers_prints_them() {
        assert_eq!(Version::parse("14.5"), Some(Version(14, 5, 0)));
        assert_eq!(Version::parse("15.0.1\n"), Some(Version(15, 0, 1)));
        assert_eq!(Version::parse("26"), Some(Version(26, 0, 0)));
        assert_eq!(Version::parse("14.x"), None);
        assert_eq!(Version::parse("1.2.3.4"), None);
        assert_eq!(Version::from_nibbles(0x000b_0000), Version(11, 0, 0));
        assert_eq!(Version::from_nibbles(0x000e_0501), Version(14, 5, 1));
    }

    /// A Mach-O written by the `object` crate's writer with the build
    /// version a macOS 11 arm64 link records, read back by the header check.
    #[test]
    fn a_mach_o_header_gives_its_cpu_and_oldest_macos() {
        let bytes = mach_o(Architecture::Aarch64, 0x000b_0000);
        assert_eq!(
            builds_of(&bytes).unwrap(),
            vec![mac_arm64(Version(11, 0, 0))]
        );
        let intel = mach_o(Architecture::X86_64, 0x000d_0000);
        assert_eq!(
            builds_of(&intel).unwrap(),
            vec![Build {
                os: Os::MacOs,
                arch: Arch::X86_64,
                min_macos: Some(Version(13, 0, 0))
            }]
        );
    }

    #[test]
    fn this_test_program_is_read_as_what_it_is() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let builds = builds_of(&me).unwrap();
        assert_eq!(builds.len(), 1);
        let expect_os = if cfg!(target_os = "macos") {
            Os::MacOs
        } else {
            Os::Linux
        };
        assert_eq!(builds[0].os, expect_os);
    }

    #[test]
    fn a_text_file_is_not_a_program() {
        let err = builds_of(b"#!/bin/sh\necho hello\n").unwrap_err();
        assert!(matches!(err, PlatformError::NotAProgram(_)), "{err}");
    }

    fn mach_o(arch: Architecture, minos: u32) -> Vec<u8> {
        use object::write::{MachOBuildVersion, Object};
        let mut obj = Object::new(object::BinaryFormat::MachO, arch, Endianness::Little);
        let mut version = MachOBuildVersion::default();
        version.platform = object::macho::PLATFORM_MACOS;
        version.minos = minos;
        version.sdk = minos;
        obj.set_macho_build_version(version);
        obj.write().unwrap()
    }
}
