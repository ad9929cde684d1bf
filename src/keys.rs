//! `dqkd keys …`: call the ETSI API as an SAE and print exactly what the KME answered.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use dqkd_client::{Client, KeyRequestBody};
use http::Method;

use crate::args::{KeysArgs, KeysCall};

pub async fn run(args: KeysArgs) -> anyhow::Result<ExitCode> {
    let tls = match (&args.identity, &args.cert, &args.key) {
        (Some(combined), _, _) => dqkd_pki::client_config_from_combined(&args.ca, combined)?,
        (None, Some(cert), Some(key)) => dqkd_pki::client_config(&args.ca, cert, key)?,
        _ => anyhow::bail!("give the SAE's certificate with --identity, or with --cert and --key"),
    };
    let client = Client::new(&args.kme, tls)?;
    let (method, path, body) = request_for(&args.call)?;
    let response = client.raw(method, &path, body).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(&response.body).context("writing to stdout")?;
    writeln!(out).context("writing to stdout")?;
    if response.status.is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("dqkd: the KME answered {}", response.status);
        Ok(ExitCode::from(1))
    }
}

fn request_for(call: &KeysCall) -> anyhow::Result<(Method, String, Option<Vec<u8>>)> {
    let path = |sae: &str, method: &str| {
        format!("/api/v1/keys/{}/{method}", dqkd_client::encode_segment(sae))
    };
    Ok(match call {
        KeysCall::Status { slave } => (Method::GET, path(slave, "status"), None),
        KeysCall::Enc {
            slave,
            number,
            size,
            additional,
            get,
        } => {
            if *get {
                let mut query = Vec::new();
                if let Some(n) = number {
                    query.push(format!("number={n}"));
                }
                if let Some(s) = size {
                    query.push(format!("size={s}"));
                }
                let mut url = path(slave, "enc_keys");
                if !query.is_empty() {
                    url = format!("{url}?{}", query.join("&"));
                }
                (Method::GET, url, None)
            } else {
                let body = KeyRequestBody {
                    number: *number,
                    size: *size,
                    additional_slave_SAE_IDs: additional.clone(),
                };
                (
                    Method::POST,
                    path(slave, "enc_keys"),
                    Some(serde_json::to_vec(&body)?),
                )
            }
        }
        KeysCall::Dec {
            master,
            key_ids,
            get,
        } => {
            if *get {
                let [id] = key_ids.as_slice() else {
                    anyhow::bail!("--get fetches exactly one key ID");
                };
                let url = format!(
                    "{}?key_ID={}",
                    path(master, "dec_keys"),
                    dqkd_client::encode_segment(id)
                );
                (Method::GET, url, None)
            } else {
                let ids: Vec<_> = key_ids
                    .iter()
                    .map(|id| serde_json::json!({ "key_ID": id }))
                    .collect();
                let body = serde_json::json!({ "key_IDs": ids });
                (
                    Method::POST,
                    path(master, "dec_keys"),
                    Some(serde_json::to_vec(&body)?),
                )
            }
        }
    })
}
