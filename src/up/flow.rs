//! The mission's flow against a running local cluster, and the curl lines that repeat it.

use super::*;

pub(super) async fn demo(layout: &Layout, plan: &Plan) -> anyhow::Result<()> {
    let client = |i: usize| client_for(layout, plan, i);
    let (kme_a, alice) = &plan.sites[0];
    let (kme_b, bob) = &plan.sites[1];
    let a = client(0)?;
    let b = client(1)?;
    println!("The mission's flow: {alice} at {kme_a} shares a key with {bob} at {kme_b}.");
    let status = a.status(kme_b).await?;
    println!(
        "  1. {alice}: status for {kme_b}: target {}, {} keys of {} bits available",
        status.target_KME_ID, status.stored_key_count, status.key_size
    );
    let sent = a.enc_keys(kme_b, &KeyRequestBody::default()).await?;
    let key = sent.keys.first().context("enc_keys returned no key")?;
    println!(
        "  2. {alice}: enc_keys for {kme_b} → key_ID {} ({kme_a} made it from 3 entropy servers,",
        key.key_ID
    );
    println!("     {kme_b} regenerated it from the metadata and stored it before {alice} got it)");
    let got = b.dec_keys(kme_a, &[key.key_ID.as_str()]).await?;
    let same = got.keys.first().is_some_and(|k| k.key == key.key);
    println!(
        "  3. {bob}:   dec_keys from {kme_a} with that key_ID → {}",
        if same {
            "the same key"
        } else {
            "A DIFFERENT KEY (bug)"
        }
    );
    anyhow::ensure!(same, "Bob's key differs from Alice's");
    let again = a.dec_keys(alice, &[key.key_ID.as_str()]).await;
    println!(
        "  4. {alice}: dec_keys at her own site with the same key_ID → {}",
        match &again {
            Ok(k) if k.keys.first().is_some_and(|k| k.key == key.key) => "the same key",
            Ok(_) => "A DIFFERENT KEY (bug)",
            Err(_) => "refused",
        }
    );
    let mut groups = BTreeMap::<String, BTreeSet<String>>::new();
    for i in 0..plan.sites.len() {
        // A site's metrics are a convenience here; the flow above is what must work.
        let metrics = format!("127.0.0.1:{}", plan.metrics_port(i));
        if let Ok(text) = crate::status::http_get(&metrics, "/metrics").await {
            for (listener, group) in handshake_groups(&text) {
                groups.entry(listener).or_default().insert(group);
            }
        }
    }
    let show = |listener: &str| {
        groups
            .get(listener)
            .map_or("no handshake yet".to_owned(), |g| {
                g.iter().cloned().collect::<Vec<_>>().join(", ")
            })
    };
    println!(
        "  5. key exchange negotiated: peer links {}; ETSI API {} (curl on OpenSSL 3.0 gets X25519)",
        show("peer"),
        show("etsi")
    );
    println!();
    Ok(())
}

/// `(listener, group)` of every `dqkd_tls_handshakes_total` series in Prometheus text.
fn handshake_groups(text: &str) -> Vec<(String, String)> {
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_owned())
    };
    text.lines()
        .filter(|line| line.starts_with("dqkd_tls_handshakes_total{"))
        .filter_map(|line| Some((label(line, "listener")?, label(line, "group")?)))
        .collect()
}

pub(super) fn print_curl(layout: &Layout, plan: &Plan) {
    let rel = |p: PathBuf| {
        std::env::current_dir()
            .ok()
            .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
            .unwrap_or(p)
            .display()
            .to_string()
    };
    let ca = rel(layout.ca());
    let (kme_a, alice) = &plan.sites[0];
    let (kme_b, bob) = plan.sites.get(1).unwrap_or(&plan.sites[0]);
    let alice_p12 = rel(layout.cert(dqkd_pki::Role::Sae, alice, "p12"));
    let bob_p12 = rel(layout.cert(dqkd_pki::Role::Sae, bob, "p12"));
    let b_port = plan.api_port(usize::from(plan.sites.len() > 1));
    println!("Try it with curl. {alice} asks site {kme_a} for a key to share with {bob}'s site:");
    println!();
    println!("  curl --cert {alice_p12} --cert-type P12 --cacert {ca} \\");
    println!(
        "      \"https://127.0.0.1:{}/api/v1/keys/{kme_b}/enc_keys\"",
        plan.api_port(0)
    );
    println!();
    println!("{bob} fetches it at site {kme_b} with the key_ID {alice} got:");
    println!();
    println!("  curl --cert {bob_p12} --cert-type P12 --cacert {ca} \\");
    println!("      \"https://127.0.0.1:{b_port}/api/v1/keys/{kme_a}/dec_keys\" \\");
    println!("      -H \"Content-Type: application/json\" \\");
    println!("      -d '{{\"key_IDs\": [{{\"key_ID\": \"SOME_KEY_ID\"}}]}}'");
    println!();
}

#[cfg(test)]
mod tests {
    use super::handshake_groups;

    #[test]
    fn handshake_groups_are_read_from_prometheus_text() {
        let text = "# TYPE dqkd_tls_handshakes_total counter\n\
            dqkd_tls_handshakes_total{kme=\"KME_B\",listener=\"peer\",group=\"X25519MLKEM768\"} 4\n\
            dqkd_tls_handshakes_total{kme=\"KME_A\",listener=\"etsi\",group=\"X25519\"} 1\n\
            dqkd_requests_total{kme=\"KME_A\",listener=\"etsi\",group=\"x\"} 1\n";
        assert_eq!(
            handshake_groups(text),
            [
                ("peer".to_owned(), "X25519MLKEM768".to_owned()),
                ("etsi".to_owned(), "X25519".to_owned())
            ]
        );
    }
}
