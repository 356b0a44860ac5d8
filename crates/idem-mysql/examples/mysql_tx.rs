//! Transactional mode on MySQL / MariaDB: an order state machine where only a `pending` order
//! can become `paid`. The payment message is delivered twice (as an at-least-once broker may);
//! the order is paid once, and the second delivery replays the first one's outcome. The
//! transition is guarded (`WHERE state = 'pending'`) and [`idem::conditional::guard`] turns "no
//! row matched" into an outcome (already paid, or stale because the order moved on), which is
//! recorded and acked instead of retried.
//!
//! ```sh
//! cargo run -p idem-mysql --example mysql_tx
//! ```
//! Uses `IDEM_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`) and creates two tables
//! there if missing: `idem_example_records` (idem's) and `idem_example_orders`.

use idem::conditional::guard;
use idem::{Config, Fingerprint, Namespace, Transactional};
use idem_mysql::MysqlStore;
use mysql_async::prelude::Queryable;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("IDEM_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let store = MysqlStore::builder(url)
        .table("idem_example_records")
        .build()?;
    store.migrate().await?;

    // A fresh pending order (a new id each run, so that the run starts from scratch).
    let order = format!("order-{:08x}", fastrand::u32(..));
    let mut conn = store.pool().get_conn().await?;
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS idem_example_orders (id VARCHAR(32) PRIMARY KEY, \
         state VARCHAR(16) NOT NULL, payments INT NOT NULL DEFAULT 0) ENGINE = InnoDB",
    )
    .await?;
    conn.exec_drop(
        "INSERT INTO idem_example_orders (id, state) VALUES (?, 'pending')",
        (&order,),
    )
    .await?;
    drop(conn);

    // The message "order paid": its key is the order, its payload the message body.
    let key = Namespace::new("payments")?.key(&order)?;
    let message = format!("{order} paid 42.00");
    for delivery in 1..=2 {
        let id = order.clone();
        let outcome = store
            .run_transactional(
                &key,
                Fingerprint::of(message.as_bytes()),
                &Config::default(),
                move |tx| {
                    Box::pin(async move {
                        // The transition, in the record's transaction: pending -> paid only.
                        tx.exec_drop(
                            "UPDATE idem_example_orders \
                             SET state = 'paid', payments = payments + 1 \
                             WHERE id = ? AND state = 'pending'",
                            (&id,),
                        )
                        .await?;
                        let matched = tx.affected_rows();
                        let now: Option<String> = if matched == 0 {
                            tx.exec_first(
                                "SELECT state FROM idem_example_orders WHERE id = ?",
                                (&id,),
                            )
                            .await?
                        } else {
                            None
                        };
                        Ok::<_, mysql_async::Error>(guard(matched, now, |s| s == "paid"))
                    })
                },
            )
            .await?;
        // Executed the first time, replayed the second: "applied" either way.
        let kind = outcome.kind();
        println!("delivery {delivery}: {kind} {:?}", outcome.into_value());
    }

    let (state, payments): (String, u32) = store
        .pool()
        .get_conn()
        .await?
        .exec_first(
            "SELECT state, payments FROM idem_example_orders WHERE id = ?",
            (&order,),
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("{order} vanished"))?;
    println!("{order}: state {state}, payments applied {payments}");
    anyhow::ensure!(payments == 1, "the payment was applied {payments} times");
    store.disconnect().await?;
    Ok(())
}
