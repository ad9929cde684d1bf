//! Where the sites of a local cluster keep their key-encryption keys: files, or keys in a
//! PKCS#11 token.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::{Layout, Plan};

/// Where the sites of a local cluster keep their key-encryption keys.
#[derive(Debug, Clone, Default)]
pub enum LocalKek {
    /// A file per site in the state folder.
    #[default]
    File,
    /// A key per site (`object=dqkd-<KME ID>`) in one PKCS#11 token, generated when missing;
    /// the user PIN comes from `DQKD_PKCS11_PIN`.
    Pkcs11 {
        /// The token's label.
        token: String,
        /// The token's module.
        module: PathBuf,
    },
}

impl LocalKek {
    /// From `--kek-pkcs11 TOKEN` and its module; a file without them.
    pub fn from_args(token: Option<&str>, module: Option<&Path>) -> Self {
        match (token, module) {
            (Some(token), Some(module)) => LocalKek::Pkcs11 {
                token: token.to_owned(),
                module: module.to_owned(),
            },
            _ => LocalKek::File,
        }
    }

    /// The `[store] kek` value of site `kme`, and its module.
    pub(super) fn for_site(&self, layout: &Layout, kme: &str) -> (PathBuf, Option<PathBuf>) {
        match self {
            LocalKek::File => (layout.rel(&layout.data().join(format!("{kme}.kek"))), None),
            LocalKek::Pkcs11 { token, module } => {
                (self.uri(token, kme).into(), Some(module.clone()))
            }
        }
    }

    fn uri(&self, token: &str, kme: &str) -> String {
        format!("pkcs11:token={token};object=dqkd-{kme}")
    }

    /// Generates each site's key in the token unless it is there already.
    pub(super) fn ensure(&self, plan: &Plan) -> anyhow::Result<()> {
        let LocalKek::Pkcs11 { token, module } = self else {
            return Ok(());
        };
        let pin = std::env::var("DQKD_PKCS11_PIN")
            .context("a KEK in a PKCS#11 token needs DQKD_PKCS11_PIN")?;
        for (kme, _) in &plan.sites {
            let uri = dqkd_kek_pkcs11::KekUri::parse(&self.uri(token, kme))
                .map_err(|e| anyhow::anyhow!("token {token:?}: {e}"))?;
            match dqkd_kek_pkcs11::generate(&dqkd_kek_pkcs11::TokenKekConfig {
                module: module.clone(),
                uri,
                pin: dqkd_kek_pkcs11::Pin::new(pin.clone()),
            }) {
                Ok(()) | Err(dqkd_kek_pkcs11::Pkcs11Error::ObjectExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
