//! [`StompProducer`]: persistent SENDs with receipts, the message id set once and reused on
//! every retry.

use std::time::Duration;

use iridium_stomp::Frame;
use tokio::sync::Mutex;

use super::client::Client;
use super::{Endpoint, MESSAGE_ID_HEADER, context, destination_of, is_frame_header};
use crate::error::BrokerError;
use crate::producer::{Outgoing, RetryPolicy};

/// Publishes [`Outgoing`] messages to STOMP destinations: `persistent:true`, the message id in
/// the `idem-message-id` header, and a receipt awaited for each (the broker's confirmation that
/// it has the message). STOMP brokers have no publish dedup: a retry after a lost receipt is a
/// duplicate, which the consumer's store recognises by the id.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_broker::BrokerError> {
/// use idem_broker::Outgoing;
/// use idem_broker::stomp::StompProducer;
/// let producer = StompProducer::connect("stomp://127.0.0.1:61613").await?;
/// producer.publish("orders", &Outgoing::new(&b"{\"amount\": 10}"[..])).await?;
/// producer.close().await;
/// # Ok(()) }
/// ```
pub struct StompProducer {
    endpoint: Endpoint,
    /// The connection, made again when it is lost.
    client: Mutex<Client>,
    retry: RetryPolicy,
    receipt_timeout: Duration,
}

impl std::fmt::Debug for StompProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompProducer")
            .field("url", &self.endpoint.shown())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl StompProducer {
    /// Connects (within 10 s). A lost connection is made again by the next publish.
    ///
    /// # Errors
    /// The URL is wrong, the broker is unreachable or refuses the credentials.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let endpoint = Endpoint::parse(url)?;
        let client = endpoint.connect(HEARTBEAT, CONNECT_TIMEOUT).await?;
        Ok(Self {
            endpoint,
            client: Mutex::new(client),
            retry: RetryPolicy::default(),
            receipt_timeout: Duration::from_secs(10),
        })
    }

    /// Sets how [`publish`](Self::publish) retries (default: 5 attempts).
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how long a publish waits for its receipt (default 10 s).
    #[must_use]
    pub fn receipt_timeout(mut self, timeout: Duration) -> Self {
        self.receipt_timeout = timeout;
        self
    }

    /// Publishes `message` to `destination` (a queue name, `orders` being `/queue/orders`, or
    /// a destination starting with `/`), retrying with the same message id until the broker
    /// sends its receipt.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn publish(&self, destination: &str, message: &Outgoing) -> Result<(), BrokerError> {
        self.retry
            .run(|| self.publish_once(destination, message))
            .await
    }

    /// One persistent SEND of `message` with a receipt, no retry.
    ///
    /// # Errors
    /// The receipt did not come in time ([`Timeout`](crate::BrokerErrorKind::Timeout): the
    /// broker may have the message anyway), the broker answered with an ERROR
    /// ([`Rejected`](crate::BrokerErrorKind::Rejected)), or the connection is down.
    pub async fn publish_once(
        &self,
        destination: &str,
        message: &Outgoing,
    ) -> Result<(), BrokerError> {
        let client = {
            let mut guard = self.client.lock().await;
            if !guard.is_alive() {
                *guard = self.endpoint.connect(HEARTBEAT, CONNECT_TIMEOUT).await?;
            }
            guard.clone()
        };
        let frame = send_frame(&destination_of(destination), message);
        client
            .send_confirmed(frame, self.receipt_timeout)
            .await
            .map_err(|e| context("publishing", e))
    }

    /// Disconnects (after the broker has processed what was sent).
    pub async fn close(self) {
        self.client.lock().await.close().await;
    }
}

const HEARTBEAT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The SEND frame of `message` to `destination`: persistent, with its id and its headers
/// (those naming frame headers left out).
pub(super) fn send_frame(destination: &str, message: &Outgoing) -> Frame {
    let mut frame = Frame::new("SEND")
        .header("destination", destination)
        .header("persistent", "true")
        .header(MESSAGE_ID_HEADER, message.id());
    for (name, value) in message.headers() {
        if !is_frame_header(name) {
            frame = frame.header(name.as_str(), value.as_str());
        }
    }
    frame.set_body(message.payload().to_vec())
}
