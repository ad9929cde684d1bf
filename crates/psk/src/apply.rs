//! Putting a key in use: WireGuard through `wg`, or any command that reads the key on
//! its standard input (strongSwan PPK, MACsec, a script).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt as _;

use crate::key::{Psk, Slot};
use crate::ports::Apply;
use crate::PskError;

/// `wg set IFACE peer PUBKEY preshared-key FILE`, with the key in a private file (mode
/// 0600, in a folder of this process's own) that is removed right after.
#[derive(Debug, Clone)]
pub struct WireGuard {
    /// The `wg` program (default `wg` on the PATH).
    pub wg: PathBuf,
    /// The WireGuard interface.
    pub interface: String,
    /// The peer's public key (Base64), as `wg show IFACE peers` prints it.
    pub peer: String,
}

#[async_trait]
impl Apply for WireGuard {
    async fn apply(&self, _slot: &Slot, key: &Psk) -> Result<(), PskError> {
        let line = key.to_base64_line();
        // tempfile creates the file with mode 0600 and removes it when dropped.
        let mut file = tempfile::Builder::new()
            .prefix("dqkd-psk-")
            .tempfile()
            .map_err(|e| PskError::Apply(format!("cannot make the key file: {e}")))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| PskError::Apply(format!("cannot write the key file: {e}")))?;
        let output = tokio::process::Command::new(&self.wg)
            .arg("set")
            .arg(&self.interface)
            .arg("peer")
            .arg(&self.peer)
            .arg("preshared-key")
            .arg(file.path())
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| PskError::Apply(format!("cannot run {}: {e}", self.wg.display())))?;
        drop(file);
        if !output.status.success() {
            return Err(PskError::Apply(format!(
                "wg set {} failed ({}): {}",
                self.interface,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// Runs `sh -c COMMAND` with the key (Base64 and a newline) on its standard input, and
/// `DQKD_PSK_KEY_ID` and `DQKD_PSK_EPOCH` in its environment.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The shell command.
    pub command: String,
}

#[async_trait]
impl Apply for Exec {
    async fn apply(&self, slot: &Slot, key: &Psk) -> Result<(), PskError> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .env("DQKD_PSK_KEY_ID", &slot.key_ID)
            .env("DQKD_PSK_EPOCH", slot.epoch.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| PskError::Apply(format!("cannot run {:?}: {e}", self.command)))?;
        if let Some(mut stdin) = child.stdin.take() {
            let line = key.to_base64_line();
            // A command that does not read its input is its own business; its status decides.
            let _ = stdin.write_all(line.as_bytes()).await;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| PskError::Apply(format!("{:?}: {e}", self.command)))?;
        if !output.status.success() {
            return Err(PskError::Apply(format!(
                "{:?} failed ({}): {}",
                self.command,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Epoch;

    fn slot() -> Slot {
        Slot {
            epoch: Epoch(42),
            key_ID: "k-1".into(),
        }
    }

    #[tokio::test]
    async fn exec_gets_the_key_on_stdin_and_the_id_in_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let exec = Exec {
            command: format!(
                "cat > {0}; echo \"$DQKD_PSK_KEY_ID $DQKD_PSK_EPOCH\" >> {0}",
                out.display()
            ),
        };
        exec.apply(&slot(), &Psk::new([1; 32])).await.unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            got,
            format!("{}k-1 42\n", Psk::new([1; 32]).to_base64_line().as_str())
        );
    }

    #[tokio::test]
    async fn a_failing_command_is_an_error() {
        let exec = Exec {
            command: "cat >/dev/null; echo nope >&2; exit 3".into(),
        };
        let e = exec.apply(&slot(), &Psk::new([1; 32])).await.unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[tokio::test]
    async fn wg_gets_a_private_file_that_is_gone_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("record");
        // A stand-in for `wg` that records its arguments, the file's mode and contents.
        let fake = dir.path().join("wg");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" > {0}\nstat -c %a \"$6\" >> {0}\ncat \"$6\" >> {0}\necho \"$6\" >> {0}\n",
                record.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let wg = WireGuard {
            wg: fake,
            interface: "wg0".into(),
            peer: "PEERKEY=".into(),
        };
        wg.apply(&slot(), &Psk::new([2; 32])).await.unwrap();
        let text = std::fs::read_to_string(&record).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("set wg0 peer PEERKEY= preshared-key "),
            "{text}"
        );
        assert_eq!(lines[1], "600");
        assert_eq!(lines[2], Psk::new([2; 32]).to_base64_line().trim_end());
        assert!(
            !std::path::Path::new(lines[3]).exists(),
            "the key file is removed"
        );
    }
}
