//! Shared fixtures: a CA plus one certificate per role in a temp dir.
#![allow(dead_code)]

use std::path::PathBuf;

use dqkd_pki::{init_ca, load_ca, Ca, IssueOptions, IssuedPaths, Role};
use tempfile::TempDir;

pub struct Cluster {
    pub dir: TempDir,
    pub ca: Ca,
    pub kme: IssuedPaths,
    pub sae: IssuedPaths,
    pub entropy: IssuedPaths,
}

impl Cluster {
    pub fn ca_pem(&self) -> PathBuf {
        self.ca.paths().cert.clone()
    }
}

pub fn cluster(name: &str) -> Cluster {
    cluster_with_password(name, "")
}

pub fn cluster_with_password(name: &str, password: &str) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    init_ca(name, &dir.path().join("ca"), false).expect("init_ca");
    let ca = load_ca(&dir.path().join("ca")).expect("load_ca");
    let opts = IssueOptions {
        out_dir: dir.path().join("certs"),
        p12_password: password.to_owned(),
        ..IssueOptions::default()
    };
    let kme = ca.issue(Role::Kme, "kme-a", &opts).expect("issue kme");
    let sae = ca.issue(Role::Sae, "sae-1", &opts).expect("issue sae");
    let entropy = ca
        .issue(Role::Entropy, "ent.0", &opts)
        .expect("issue entropy");
    Cluster {
        dir,
        ca,
        kme,
        sae,
        entropy,
    }
}
