//! A LaunchAgent plist as a typed value, written and read with the `plist` crate.
//!
//! Our own serde types rather than the `launchd` crate (0.3.0), which we tried:
//! it keeps `EnvironmentVariables` in a `HashMap`, so the written XML changes
//! order from run to run (golden files and "is this agent unchanged?" would be
//! unstable); it rejects any key it does not know, so a plist touched by another
//! tool cannot be read back; and it always writes `Program` beside
//! `ProgramArguments`. Here fields serialize in declaration order, maps are
//! ordered, and keys this model does not name are ignored on reading.
//!
//! (No `#[serde(flatten)]` catch-all for unknown keys: through a flattened map
//! the plist serializer writes every `Option` as a `<dict><key>Some</key>…`,
//! which launchd would reject. The tests pin the exact XML shape.)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// launchd's scheduling class for a job. `Interactive` exempts the node from
/// App Nap and background throttling, which would stall inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessType {
    Background,
    Standard,
    Adaptive,
    Interactive,
}

/// `KeepAlive`: a plain yes/no, or launchd's conditions dictionary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeepAlive {
    Always(bool),
    Conditions(BTreeMap<String, plist::Value>),
}

/// The keys tensorlink writes, in the order they appear in the file. The same
/// keys make a LaunchDaemon, which adds `UserName`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LaunchAgent {
    pub label: String,
    /// A daemon's account: launchd starts it as this user (and that user's
    /// primary group) instead of root. Only the `system` domain honours it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// Absolute paths only: launchd does not search PATH for the program.
    pub program_arguments: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub run_at_load: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<KeepAlive>,
    /// Seconds launchd waits before restarting a job that exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_type: Option<ProcessType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standard_out_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standard_error_path: Option<String>,
    /// launchd starts jobs with a minimal environment, not the user's shell's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment_variables: BTreeMap<String, String>,
    /// Seconds between SIGTERM and SIGKILL when the job is stopped.
    #[serde(
        rename = "ExitTimeOut",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exit_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Error)]
pub enum PlistError {
    #[error("cannot write plist: {0}")]
    Write(plist::Error),
    #[error("not a LaunchAgent plist: {0}")]
    Read(plist::Error),
}

impl LaunchAgent {
    /// A job with just a label and its command; the rest left to launchd's defaults.
    pub fn new(label: impl Into<String>, program_arguments: Vec<String>) -> Self {
        LaunchAgent {
            label: label.into(),
            user_name: None,
            program_arguments,
            run_at_load: false,
            keep_alive: None,
            throttle_interval: None,
            process_type: None,
            standard_out_path: None,
            standard_error_path: None,
            environment_variables: BTreeMap::new(),
            exit_timeout: None,
            working_directory: None,
        }
    }

    /// The plist as XML, the form `plutil -lint` and people read.
    pub fn to_xml(&self) -> Result<Vec<u8>, PlistError> {
        let mut out = Vec::new();
        plist::to_writer_xml(&mut out, self).map_err(PlistError::Write)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Reads an XML or binary plist.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PlistError> {
        plist::from_bytes(bytes).map_err(PlistError::Read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LaunchAgent {
        let mut a = LaunchAgent::new(
            "dev.tensorlink.node",
            vec!["/a b/node".into(), "--x".into()],
        );
        a.run_at_load = true;
        a.keep_alive = Some(KeepAlive::Always(true));
        a.throttle_interval = Some(2);
        a.process_type = Some(ProcessType::Interactive);
        a.standard_error_path = Some("/tmp/e".into());
        a.environment_variables
            .insert("PATH".into(), "/usr/bin:/bin".into());
        a.environment_variables
            .insert("HOME".into(), "/Users/me".into());
        a
    }

    #[test]
    fn writes_ordered_xml_and_reads_it_back() {
        let a = sample();
        let xml = a.to_xml().unwrap();
        let text = String::from_utf8(xml.clone()).unwrap();
        assert!(text.find("<key>Label</key>") < text.find("<key>ProgramArguments</key>"));
        assert!(
            text.find("<key>HOME</key>") < text.find("<key>PATH</key>"),
            "maps are ordered"
        );
        assert!(!text.contains("StandardOutPath"), "unset keys are left out");
        assert!(
            !text.contains("<key>Some</key>"),
            "options are plain values:\n{text}"
        );
        for (key, value) in [
            ("ThrottleInterval", "<integer>2</integer>"),
            ("KeepAlive", "<true/>"),
            ("ProcessType", "<string>Interactive</string>"),
            ("StandardErrorPath", "<string>/tmp/e</string>"),
        ] {
            assert!(
                text.contains(&format!("<key>{key}</key>\n\t{value}")),
                "{key} → {value}:\n{text}"
            );
        }
        assert_eq!(LaunchAgent::from_bytes(&xml).unwrap(), a);
        assert_eq!(a.to_xml().unwrap(), xml, "deterministic");
    }

    #[test]
    fn unknown_keys_are_ignored_on_reading() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
<key>Label</key><string>x</string>
<key>ProgramArguments</key><array><string>/bin/true</string></array>
<key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
<key>AssociatedBundleIdentifiers</key><string>dev.tensorlink</string>
</dict></plist>"#;
        let a = LaunchAgent::from_bytes(xml).unwrap();
        assert!(matches!(a.keep_alive, Some(KeepAlive::Conditions(_))));
        assert_eq!(a.program_arguments, ["/bin/true"]);
        assert_eq!(LaunchAgent::from_bytes(&a.to_xml().unwrap()).unwrap(), a);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(LaunchAgent::from_bytes(b"<plist><dict><key>Label</key>").is_err());
        assert!(LaunchAgent::from_bytes(b"").is_err());
    }
}
