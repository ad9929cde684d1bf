//! `dqkd pki …`: thin wrappers over `dqkd-pki` and the store's key-encryption key.

use anyhow::Context as _;

use crate::args::{PkiCommand, RoleArg};

pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init {
            cluster,
            out,
            force,
        } => {
            let paths = dqkd_pki::init_ca(&cluster, &out, force)?;
            println!("cluster CA certificate: {}", paths.cert.display());
            println!("cluster CA key:         {}", paths.key.display());
        }
        PkiCommand::Issue {
            role,
            id,
            ca,
            out,
            dns_names,
            ip_addresses,
            password,
            force,
        } => {
            let authority = dqkd_pki::load_ca(&ca)
                .with_context(|| format!("loading the cluster CA from {}", ca.display()))?;
            let role = match role {
                RoleArg::Kme => dqkd_pki::Role::Kme,
                RoleArg::Sae => dqkd_pki::Role::Sae,
                RoleArg::Entropy => dqkd_pki::Role::Entropy,
                RoleArg::Server => {
                    let options = dqkd_pki::IssueOptions {
                        out_dir: out.unwrap_or_else(|| ca.join("server")),
                        dns_names,
                        ip_addresses,
                        force,
                        ..Default::default()
                    };
                    let issued = authority.issue_server(&id, &options)?;
                    println!("certificate: {}", issued.cert_chain.display());
                    println!("key:         {}", issued.key.display());
                    return Ok(());
                }
            };
            let options = dqkd_pki::IssueOptions {
                out_dir: out.unwrap_or_else(|| ca.join(role.as_str())),
                dns_names,
                ip_addresses,
                p12_password: password,
                force,
                ..Default::default()
            };
            let issued = authority.issue(role, &id, &options)?;
            println!("identity:    {}", issued.identity.uri());
            println!("certificate: {}", issued.cert_chain.display());
            println!("key:         {}", issued.key.display());
            println!("combined:    {}", issued.combined.display());
            println!("pkcs12:      {}", issued.p12.display());
        }
        PkiCommand::Revoke { cert, ca } => {
            let authority = dqkd_pki::load_ca(&ca)
                .with_context(|| format!("loading the cluster CA from {}", ca.display()))?;
            match authority.revoke(&cert)? {
                dqkd_pki::Revocation::Added { serial, listed } => {
                    println!("revoked:     {} (serial {serial})", cert.display());
                    println!(
                        "CRL:         {} ({listed} revoked)",
                        authority.crl_path().display()
                    );
                }
                dqkd_pki::Revocation::AlreadyRevoked { serial } => {
                    println!("already revoked: {} (serial {serial})", cert.display());
                }
            }
        }
        PkiCommand::Renew {
            cert,
            ca,
            password,
            days,
        } => {
            let authority = dqkd_pki::load_ca(&ca)
                .with_context(|| format!("loading the cluster CA from {}", ca.display()))?;
            let renewed = authority.renew(&cert, &password, days)?;
            let not_after = dqkd_pki::certificate_not_after(renewed.cert_chain())?;
            let days_left =
                dqkd_pki::seconds_left(not_after, std::time::SystemTime::now()) / 86_400;
            match &renewed {
                dqkd_pki::Renewed::Identity(paths) => {
                    println!("identity:    {}", paths.identity.uri());
                    println!("certificate: {}", paths.cert_chain.display());
                    println!("key:         {}", paths.key.display());
                    println!("combined:    {}", paths.combined.display());
                    println!("pkcs12:      {}", paths.p12.display());
                }
                dqkd_pki::Renewed::Server(paths) => {
                    println!("certificate: {}", paths.cert_chain.display());
                    println!("key:         {}", paths.key.display());
                }
            }
            println!("valid for:   {days_left} days; restart the process that uses it");
        }
        PkiCommand::Crl { ca } => {
            let authority = dqkd_pki::load_ca(&ca)
                .with_context(|| format!("loading the cluster CA from {}", ca.display()))?;
            println!("CRL: {}", authority.write_crl()?.display());
        }
        PkiCommand::Kek {
            out,
            force,
            pkcs11,
            module,
        } => match (out, pkcs11, module) {
            (_, Some(uri), Some(module)) => {
                let uri = dqkd_kek_pkcs11::KekUri::parse(&uri)
                    .map_err(|e| anyhow::anyhow!("--pkcs11 {uri}: {e}"))?;
                let pin = std::env::var("DQKD_PKCS11_PIN")
                    .ok()
                    .filter(|p| !p.is_empty())
                    .context("set DQKD_PKCS11_PIN to the token's user PIN")?;
                dqkd_kek_pkcs11::generate(&dqkd_kek_pkcs11::TokenKekConfig {
                    module,
                    uri: uri.clone(),
                    pin: dqkd_kek_pkcs11::Pin::new(pin),
                })?;
                println!("key-encryption key: {uri} (generated in the token, not extractable)");
            }
            (Some(out), None, _) => {
                dqkd_store::Kek::generate_file(&out, force)?;
                println!("key-encryption key: {}", out.display());
            }
            _ => anyhow::bail!("give --out FILE, or --pkcs11 URI with --module"),
        },
    }
    Ok(())
}
