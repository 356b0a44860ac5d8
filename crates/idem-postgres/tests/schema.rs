//! Schema handling against the shared server: connecting never creates or changes tables; a
//! missing, old or newer schema is a `Schema` error that says what to do; migrating is safe to
//! repeat; bad configuration is a `Config` error that never prints the password.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem::StoreErrorKind;
use idem_conformance::server;
use idem_postgres::PostgresStore;

fn schema(prefix: &str) -> String {
    format!(
        "{prefix}_{:x}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

async fn drop_schema(url: &str, schema: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test]
async fn connecting_to_a_missing_schema_says_how_to_create_it_and_creates_nothing() {
    let Some(url) = server::url(server::POSTGRES) else {
        return;
    };
    let name = schema("idem_missing");
    let err = PostgresStore::builder(url.clone())
        .schema(name.clone())
        .connect()
        .await
        .expect_err("no schema");
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("migrate"), "{err}");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "connecting must not create the schema");
}

#[tokio::test]
async fn migrating_twice_is_fine_and_a_newer_schema_is_refused() {
    let Some(url) = server::url(server::POSTGRES) else {
        return;
    };
    let name = schema("idem_versions");
    let builder = PostgresStore::builder(url.clone()).schema(name.clone());
    builder.migrate().await.expect("first migration");
    builder
        .migrate()
        .await
        .expect("a second migration changes nothing");
    builder
        .clone()
        .connect()
        .await
        .expect("connect after migrating");

    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "UPDATE \"{name}\".idem_schema_version SET version = 99"
        ))
        .await
        .unwrap();
    let err = builder.clone().connect().await.expect_err("newer schema");
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("newer idem"), "{err}");
    let err = builder.migrate().await.expect_err("no downgrade");
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    drop_schema(&url, &name).await;
}

#[tokio::test]
async fn bad_configuration_is_a_config_error_without_the_password() {
    let err = PostgresStore::builder("postgres://app:hunter2@127.0.0.1:5432/db?sslmode=bogus")
        .connect()
        .await
        .expect_err("bad URL");
    assert_eq!(err.kind(), StoreErrorKind::Config, "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    let err = PostgresStore::builder("postgres://127.0.0.1/db")
        .table("Robert'); DROP TABLE students;--")
        .connect()
        .await
        .expect_err("bad table name");
    assert_eq!(err.kind(), StoreErrorKind::Config, "{err}");
    // A server that refuses connections: transient, and the message names no password.
    let err = PostgresStore::builder("postgres://app:hunter2@127.0.0.1:1/db")
        .connect()
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(
        !format!("{:?}", PostgresStore::builder("postgres://a:hunter2@h/d")).contains("hunter2")
    );
}
