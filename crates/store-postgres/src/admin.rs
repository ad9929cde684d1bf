//! Administrative calls for local tools that give each site its own database (`dqkd up
//! --postgres`, `dqkd bench --postgres`). Plaintext: production databases are made by their
//! operators.

use dqkd_store::StoreError;

use crate::error::db;

/// Creates database `name` on the server of `admin_url` unless it exists. For tools that
/// give each local site its own database (`dqkd up --postgres`, `dqkd bench --postgres`);
/// production databases are made by their operators.
pub async fn create_database_if_missing(admin_url: &str, name: &str) -> Result<(), StoreError> {
    let client = admin_client(admin_url, name).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(db("looking up the database"))?
        .is_some();
    if !exists {
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            // Another process may have created it meanwhile.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(db("creating the database")(e));
            }
        }
    }
    Ok(())
}

/// Drops database `name` on the server of `admin_url`, closing its connections.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), StoreError> {
    let client = admin_client(admin_url, name).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(db("dropping the database"))
}

/// An administrative connection, after checking that `name` is a plain identifier (it is
/// spliced into DDL, which takes no parameters).
async fn admin_client(admin_url: &str, name: &str) -> Result<tokio_postgres::Client, StoreError> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !plain {
        return Err(StoreError::Database {
            context: format!("database name {name:?} must be 1-63 of a-z 0-9 _"),
            cause: Box::new(std::io::Error::other("invalid database name")),
        });
    }
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(db("connecting to the PostgreSQL server"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "administrative connection ended");
        }
    });
    Ok(client)
}
