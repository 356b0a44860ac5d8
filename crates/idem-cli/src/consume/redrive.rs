//! `idem redrive`: sends dead letters back to be processed again, once their handler is fixed.
//!
//! For each dead letter (oldest first, up to `--max`): find its key as `idem consume` does
//! (same `--namespace` and `--key`); clear the key's record if it is **failed** (attempts ran
//! out), so the consumer runs the handler again instead of dead-lettering the copy at once;
//! then republish the message to where it was consumed, with the same message id, and remove
//! the dead letter once the broker confirmed the publish.
//!
//! A dead letter whose key holds a record in any other state is left where it is and reported:
//! `completed` means the message was a payload mismatch (a different message under a known key:
//! a bug upstream, which a redrive would only dead-letter again), `in_progress` that a copy is
//! being processed right now. A message with no usable key is republished (the consumer's
//! `--key` may have been fixed). The record is cleared before the publish: a crash between the
//! two leaves the dead letter in place for the next redrive, never a lost message.

use std::process::ExitCode;

use anyhow::Context;
use idem::{AnyStore, Namespace, State, Store};
use idem_broker::{Admin, KeyExtractor, KeyFrom};

use super::broker::{BrokerOptions, Plan};
use super::{errors, parse_namespace};
use crate::store_url::{OpenOptions, StoreUrl};
use crate::url_arg::UrlParser;

/// `idem redrive`: arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The broker the consumer reads, as for `idem consume --from`.
    #[arg(long, env = "IDEM_FROM", hide_env_values = true, value_name = "URL", value_parser = UrlParser::<idem_broker::BrokerUrl>::new())]
    from: idem_broker::BrokerUrl,
    /// The consumer's store, as for `idem consume --store`.
    #[arg(
        long,
        env = "IDEM_STORE",
        hide_env_values = true,
        value_name = "URL",
        default_value = "sqlite:idem.db"
    )]
    store: StoreUrl,
    /// The consumer's namespace, as for `idem consume --namespace`.
    #[arg(long, env = "IDEM_NAMESPACE", hide_env_values = true, value_name = "NAME", value_parser = parse_namespace)]
    namespace: Namespace,
    /// Where keys come from, as for `idem consume --key`.
    #[arg(long, value_name = "SOURCE", default_value = "message-id")]
    key: KeyFrom,
    /// Most dead letters to redrive in this run.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max: usize,
    /// Say what would be redriven; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object (counts and each dead letter) instead of lines.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    broker: BrokerOptions,
}

/// What happened to one dead letter.
#[derive(serde::Serialize)]
struct Item {
    message_id: Option<String>,
    key: Option<String>,
    reason: Option<String>,
    /// `redriven`, `would_redrive`, `skipped` or `failed`.
    action: &'static str,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// Runs `idem redrive`.
///
/// # Errors
/// The broker or the store cannot be reached. A dead letter that cannot be republished is
/// reported and the run goes on; the exit status is then 1.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::observe::init_logging(crate::observe::LogFormat::Text, "warn,lapin=off");
    let plan = Plan::new(&args.from, &args.broker, &args.namespace)?;
    let opened = errors::open_store(&args.store, OpenOptions::default()).await?;
    let store = with_store!(opened, s => AnyStore::new(s));
    let admin = plan.admin().await?;
    let letters = admin.dead_letters(args.max).await.map_err(|e| {
        anyhow::anyhow!(
            "reading the dead letters of {}: {}",
            plan.describe(),
            e.message()
        )
    })?;
    let mut items = Vec::with_capacity(letters.len());
    let mut failures = 0;
    for letter in letters {
        let message = letter.message();
        let key = args.key.key(&args.namespace, message).ok();
        let mut item = Item {
            message_id: message.message_id().map(str::to_owned),
            key: key.as_ref().map(ToString::to_string),
            reason: letter.reason().map(str::to_owned),
            action: "redriven",
            note: None,
        };
        let record = match &key {
            Some(key) => store
                .get(key)
                .await
                .with_context(|| format!("reading the record of {key}"))?,
            None => None,
        };
        if let Some(rec) = &record
            && rec.state != State::Failed
        {
            item.action = "skipped";
            item.note = Some(match rec.state {
                State::Completed => "the key's record is completed: a payload mismatch (another \
                                     message under this key), which would be dead-lettered again"
                    .to_owned(),
                State::InProgress => "a copy of this key is being processed now".to_owned(),
                _ => "the key's record is released: a copy is waiting to be retried".to_owned(),
            });
            items.push(item);
            continue;
        }
        if args.dry_run {
            item.action = "would_redrive";
            items.push(item);
            continue;
        }
        if let (Some(key), Some(_)) = (&key, &record) {
            store
                .evict(key)
                .await
                .with_context(|| format!("clearing the failed record of {key}"))?;
        }
        if let Err(e) = admin.republish(letter).await {
            failures += 1;
            item.action = "failed";
            item.note = Some(e.message().to_owned());
        }
        items.push(item);
    }
    admin.close().await;
    let count = |action: &str| items.iter().filter(|i| i.action == action).count();
    if args.json {
        let out = serde_json::json!({
            "redriven": count("redriven"),
            "would_redrive": count("would_redrive"),
            "skipped": count("skipped"),
            "failed": count("failed"),
            "dead_letters": items,
        });
        println!("{out}");
    } else {
        for i in &items {
            let id = i
                .key
                .as_deref()
                .or(i.message_id.as_deref())
                .unwrap_or("(no id)");
            let mut line = format!("{} {id}", i.action);
            if let Some(reason) = &i.reason {
                line.push_str(&format!(" (dead-lettered: {reason})"));
            }
            if let Some(note) = &i.note {
                line.push_str(&format!(": {note}"));
            }
            println!("{line}");
        }
        println!(
            "idem redrive: {} redriven, {} would be, {} skipped, {} failed ({})",
            count("redriven"),
            count("would_redrive"),
            count("skipped"),
            count("failed"),
            plan.describe()
        );
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
