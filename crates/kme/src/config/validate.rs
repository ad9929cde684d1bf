//! Checking a manifest and a site file together into a [`Config`]: one pass over the cluster
//! (sites, SAEs, limits, key generation, pools) that reports the first problem with its
//! file, so the server trusts the result without further checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::*;
use crate::clock::SystemClock;

impl Config {
    /// Checks a manifest and a site file together; paths in the site file are relative to
    /// `site_path`'s folder.
    pub fn from_parts(
        manifest: Manifest,
        manifest_path: &Path,
        site: SiteFile,
        site_path: &Path,
    ) -> Result<Self, ConfigError> {
        let base = site_path.parent().unwrap_or(Path::new("."));
        let invalid = |problem: String| ConfigError::Invalid {
            path: manifest_path.to_owned(),
            problem,
        };
        check_limits(&manifest.limits).map_err(invalid)?;
        if manifest.keys.ttl_secs == 0
            || manifest.keys.purge_interval_secs == 0
            || manifest.keys.master_refetch_secs == 0
        {
            return Err(invalid(
                "keys.ttl_secs, keys.purge_interval_secs and keys.master_refetch_secs must be at least 1"
                    .into(),
            ));
        }
        if manifest.sites.is_empty() {
            return Err(invalid("the manifest lists no [[sites]]".into()));
        }
        let mut sites = BTreeMap::new();
        let mut sae_site = BTreeMap::new();
        for entry in &manifest.sites {
            if sites.contains_key(&entry.kme_id) {
                return Err(invalid(format!("site {:?} is listed twice", entry.kme_id)));
            }
            let mut saes = BTreeSet::new();
            for sae in &entry.saes {
                if let Some(other) = sae_site.insert(sae.clone(), entry.kme_id.clone()) {
                    return Err(invalid(format!(
                        "SAE {sae:?} is listed under both site {other:?} and site {:?}",
                        entry.kme_id
                    )));
                }
                saes.insert(sae.clone());
            }
            sites.insert(
                entry.kme_id.clone(),
                Site {
                    kme_id: entry.kme_id.clone(),
                    api_addr: entry.api_addr.clone(),
                    peer_addr: entry.peer_addr.clone(),
                    saes,
                },
            );
        }
        // A path segment may name an SAE or a KME: the two namespaces must not overlap.
        if let Some(clash) = sites.keys().find(|id| sae_site.contains_key(*id)) {
            return Err(invalid(format!(
                "{clash:?} is both a KME ID and an SAE ID; IDs must be unique in the cluster"
            )));
        }
        if !sites.contains_key(&site.kme_id) {
            return Err(invalid(format!(
                "this site's kme_id {:?} is not one of the manifest's sites ({})",
                site.kme_id,
                sites.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if sites.len() > 1 {
            if let Some(site) = sites.values().find(|s| s.peer_addr.is_none()) {
                return Err(invalid(format!(
                    "site {:?} has no peer_addr; every site of a multi-site cluster needs one",
                    site.kme_id
                )));
            }
            if site.peer_listen.is_none() {
                return Err(ConfigError::Invalid {
                    path: site_path.to_owned(),
                    problem: format!(
                        "site {:?} is part of a {}-site cluster and needs peer_listen",
                        site.kme_id,
                        sites.len()
                    ),
                });
            }
        }
        let mut entropy_ids = BTreeSet::new();
        for server in &manifest.entropy {
            if !entropy_ids.insert(server.id.as_str()) {
                return Err(invalid(format!(
                    "entropy server ID {:?} is listed twice",
                    server.id
                )));
            }
        }
        check_keygen(&manifest.keygen).map_err(invalid)?;
        let n = manifest.keygen.n;
        if sites.len() > 1 {
            check_cross_site_sizes(&manifest.limits).map_err(invalid)?;
        }
        if !manifest.entropy.is_empty() && manifest.entropy.len() < usize::from(n) {
            return Err(invalid(format!(
                "keygen.n = {n} but the manifest lists only {} entropy servers",
                manifest.entropy.len()
            )));
        }
        if manifest.peers.timeout_ms == 0 {
            return Err(invalid("peers.timeout_ms must be at least 1".into()));
        }
        if manifest.peers.max_in_flight_keys == 0 {
            return Err(invalid(
                "peers.max_in_flight_keys must be at least 1".into(),
            ));
        }
        check_pools(&manifest.pools, manifest.entropy.is_empty()).map_err(invalid)?;
        site.connections
            .check()
            .map_err(|problem| ConfigError::Invalid {
                path: site_path.to_owned(),
                problem,
            })?;
        Ok(Self {
            cluster: manifest.cluster,
            kme_id: site.kme_id,
            api_listen: site.api_listen,
            peer_listen: site.peer_listen,
            metrics_listen: site.metrics_listen,
            keygen: manifest.keygen,
            entropy: manifest.entropy,
            peer_timeout: Duration::from_millis(manifest.peers.timeout_ms),
            peer_window_keys: manifest.peers.max_in_flight_keys as usize,
            pools: manifest.pools,
            master_refetch: manifest.keys.master_refetch,
            master_refetch_window: Duration::from_secs(
                manifest
                    .keys
                    .master_refetch_secs
                    .min(manifest.keys.ttl_secs),
            ),
            limits: manifest.limits,
            key_ttl: Duration::from_secs(manifest.keys.ttl_secs),
            purge_interval: Duration::from_secs(manifest.keys.purge_interval_secs),
            sites,
            sae_site,
            tls: site.tls.relative_to(base),
            store: StoreConfig {
                location: store::store_location(&site.store, base, site_path)?,
                kek: store::kek_location(&site.store, base, site_path)?,
            },
            connections: site.connections,
            replica: None,
            clock: Arc::new(SystemClock),
        })
    }
}

/// Pools need entropy servers (only they make keys another site can regenerate), a low-water
/// mark under the target, and a batch the peer message can carry.
fn check_pools(pools: &PoolSettings, no_entropy: bool) -> Result<(), String> {
    if pools.target == 0 {
        return Ok(());
    }
    if no_entropy {
        return Err(
            "pools.target is set but the manifest lists no [[entropy]] servers; ready keys for \
             other sites need them"
                .into(),
        );
    }
    if pools.low_water >= pools.target {
        return Err(format!(
            "pools.low_water ({}) must be below pools.target ({})",
            pools.low_water, pools.target
        ));
    }
    if pools.batch == 0 || pools.batch > MAX_POOL_BATCH {
        return Err(format!(
            "pools.batch must be 1 to {MAX_POOL_BATCH}; got {}",
            pools.batch
        ));
    }
    if pools.ttl_secs < 60 {
        return Err(format!(
            "pools.ttl_secs must be at least 60; got {}",
            pools.ttl_secs
        ));
    }
    Ok(())
}

/// `n ≥ 2` always; `1 ≤ c` unless `insecure_allow_c0`; and a Cauchy matrix that fits
/// GF(2^8) (`c < n`, `2n − c ≤ 256`).
fn check_keygen(k: &KeygenParams) -> Result<(), String> {
    let KeygenParams {
        n,
        c,
        insecure_allow_c0,
    } = *k;
    if n < 2 {
        return Err(format!(
            "[keygen] n = {n}: at least 2 entropy servers per key are needed (with one, the \
             key is that server's block)"
        ));
    }
    if c >= n || 2 * usize::from(n) - usize::from(c) > 256 {
        return Err(format!(
            "[keygen] needs c < n and 2n - c <= 256; got n = {n}, c = {c}"
        ));
    }
    if c == 0 && !insecure_allow_c0 {
        return Err(
            "[keygen] c = 0: every entropy server would learn linear information about every \
             key; use c >= 1 (or, never in production, [keygen] insecure_allow_c0 = true)"
                .into(),
        );
    }
    Ok(())
}

/// Keys shared between sites are at least [`MIN_CROSS_SITE_KEY_BITS`] bits unless the
/// manifest says `[limits] allow_short_keys = true`.
fn check_cross_site_sizes(l: &ManifestLimits) -> Result<(), String> {
    if l.min_key_size < MIN_CROSS_SITE_KEY_BITS && !l.allow_short_keys {
        return Err(format!(
            "[limits] min_key_size = {} bits: keys shared between sites must be at least \
             {MIN_CROSS_SITE_KEY_BITS} bits (with c + 1 entropy servers leaked a shorter key is \
             within reach of a search); raise it, or set [limits] allow_short_keys = true",
            l.min_key_size
        ));
    }
    Ok(())
}

fn check_limits(l: &ManifestLimits) -> Result<(), String> {
    if l.min_key_size == 0 || !l.min_key_size.is_multiple_of(8) || !l.max_key_size.is_multiple_of(8)
    {
        return Err(
            "limits.min_key_size and limits.max_key_size must be positive multiples of 8".into(),
        );
    }
    if l.min_key_size > l.max_key_size {
        return Err("limits.min_key_size is larger than limits.max_key_size".into());
    }
    if !l.default_key_size.is_multiple_of(8)
        || l.default_key_size < l.min_key_size
        || l.default_key_size > l.max_key_size
    {
        return Err(
            "limits.default_key_size must be a multiple of 8 within [min_key_size, max_key_size]"
                .into(),
        );
    }
    if l.max_key_per_request == 0 || l.max_key_count == 0 {
        return Err(
            "limits.max_key_per_request and limits.max_key_count must be at least 1".into(),
        );
    }
    if u64::from(l.max_key_per_request) > l.max_key_count {
        return Err("limits.max_key_per_request cannot exceed limits.max_key_count".into());
    }
    // 1 MiB keys at most: a response must stay far below the body limits of clients.
    if l.max_key_size > 8 * 1024 * 1024 {
        return Err("limits.max_key_size may be at most 8388608 bits (1 MiB)".into());
    }
    Ok(())
}
