//! [`NatsAdmin`]: the backlog of a JetStream durable consumer, its dead letters in
//! `<stream>_DLQ`, and its clean-up. See [`Admin`].

use std::sync::Arc;

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, stream::Stream};
use parking_lot::Mutex;

use super::source::client;
use super::{NatsConfig, nats_error};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};

/// Operations on the stream and durable consumer of a [`NatsConfig`] and its dead-letter
/// stream.
///
/// Dead letters are read by sequence from the dead-letter stream (the subject
/// [`dead_letter_subject`](NatsConfig::dead_letter_subject)), oldest first; a republished one
/// goes to the subject its original was published on (recorded by the runtime in the
/// `idem-dead-letter-subject` header; for older dead letters, the configuration's subject when
/// it has no wildcard), with `Nats-Msg-Id` = the message id, and is then deleted from the
/// dead-letter stream. JetStream drops a republish within the stream's duplicate window of the
/// original publish (the same `Nats-Msg-Id`): that is reported as a
/// [`Rejected`](BrokerErrorKind::Rejected) error and the dead letter stays.
pub struct NatsAdmin {
    config: Arc<NatsConfig>,
    js: jetstream::Context,
    /// The next sequence of the dead-letter stream to read.
    cursor: Mutex<u64>,
    reader: u64,
}

impl std::fmt::Debug for NatsAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAdmin")
            .field("stream", &self.config.stream)
            .field("consumer", &self.config.consumer)
            .finish_non_exhaustive()
    }
}

impl NatsAdmin {
    /// Connects. Declares nothing.
    ///
    /// # Errors
    /// The server is unreachable.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self, BrokerError> {
        Ok(Self {
            js: jetstream::new(client(url).await?),
            config: Arc::new(config),
            cursor: Mutex::new(1),
            reader: next_reader(),
        })
    }

    async fn stream(&self, name: &str) -> Result<Stream, BrokerError> {
        self.js.get_stream(name).await.map_err(|e| {
            let what = format!("finding stream {name:?}");
            let mut err = nats_error(&what, e);
            if err.message().contains("not found") {
                err = BrokerError::new(BrokerErrorKind::Config, err.message().to_owned())
                    .with_source(err);
            }
            err
        })
    }

    fn dead_letter(&self, m: jetstream::message::StreamMessage) -> DeadLetter {
        let mut id = None;
        let mut reason = None;
        let mut origin = None;
        let mut subject = None;
        let mut headers = Vec::new();
        for (name, values) in m.headers.iter() {
            let name = name.to_string();
            let Some(first) = values.first().map(|v| v.as_str().to_owned()) else {
                continue;
            };
            if name.eq_ignore_ascii_case(header::DEAD_LETTER_REASON) {
                reason = Some(first);
            } else if name.eq_ignore_ascii_case(header::DEAD_LETTER_ORIGIN) {
                origin = Some(first);
            } else if name.eq_ignore_ascii_case(header::DEAD_LETTER_SUBJECT) {
                subject = Some(first);
            } else if name.eq_ignore_ascii_case(header::MESSAGE_ID) {
                // The runtime moved the original's Nats-Msg-Id here.
                id = Some(first);
            } else if !name.eq_ignore_ascii_case("Nats-Msg-Id") && !is_dead_letter_header(&name) {
                for v in values {
                    headers.push((name.clone(), v.as_str().to_owned()));
                }
            }
        }
        headers.sort();
        let origin = origin.unwrap_or_else(|| self.config.stream.clone());
        let mut message = Message::new(origin, m.payload);
        if let Some(id) = id {
            message = message.with_message_id(id);
        }
        for (name, value) in headers {
            message = message.with_header(name, value);
        }
        DeadLetter::new(message, reason, Locator::Sequence(m.sequence), self.reader)
            .with_target(subject)
    }

    /// Where a dead letter goes back to: the subject it was published on, or the stream's only
    /// subject when it names one.
    fn subject_of(&self, dead_letter: &DeadLetter) -> Result<String, BrokerError> {
        if let Some(subject) = &dead_letter.target {
            return Ok(subject.clone());
        }
        match &self.config.subjects[..] {
            [one] if !one.contains(['*', '>']) => Ok(one.clone()),
            _ => Err(BrokerError::new(
                BrokerErrorKind::Config,
                format!(
                    "the dead letter does not record the subject it was published on, and \
                     stream {:?} captures {:?}: republish it by hand",
                    self.config.stream, self.config.subjects
                ),
            )),
        }
    }
}

impl Admin for NatsAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        let stream = self.stream(&self.config.stream).await?;
        let info = stream
            .consumer_info(&self.config.consumer)
            .await
            .map_err(|e| nats_error(&format!("reading consumer {:?}", self.config.consumer), e))?;
        Ok(Some(info.num_pending + info.num_ack_pending as u64))
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let stream = self.stream(&self.config.dead_letter_stream).await?;
        let mut out = Vec::new();
        while out.len() < max {
            let from = *self.cursor.lock();
            let m = match stream
                .get_first_raw_message_by_subject(&self.config.dead_letter_subject, from)
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(nats_error(
                        &format!(
                            "reading dead-letter stream {:?}",
                            self.config.dead_letter_stream
                        ),
                        e,
                    ));
                }
            };
            *self.cursor.lock() = m.sequence + 1;
            out.push(self.dead_letter(m));
        }
        Ok(out)
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.reader)?;
        let Locator::Sequence(sequence) = dead_letter.locator else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a NATS dead letter",
            ));
        };
        let subject = self.subject_of(&dead_letter)?;
        let message = dead_letter.message();
        let mut publish = Publish::build().payload(message.payload().clone());
        for (name, value) in message.headers() {
            if let Ok(v) = std::str::from_utf8(value) {
                publish = publish.header(name, v);
            }
        }
        if let Some(id) = message.message_id() {
            publish = publish.message_id(id);
        }
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| nats_error("republishing a dead letter", e))?
            .await
            .map_err(|e| nats_error("waiting for the PubAck of a republished dead letter", e))?;
        if ack.duplicate {
            return Err(BrokerError::new(
                BrokerErrorKind::Rejected,
                format!(
                    "JetStream dropped the republished {:?} as a duplicate: the stream's \
                     duplicate window since the original publish has not passed yet; the dead \
                     letter stays, try again later",
                    message.message_id().unwrap_or("message")
                ),
            ));
        }
        let dead_letters = self.stream(&self.config.dead_letter_stream).await?;
        dead_letters
            .delete_message(sequence)
            .await
            .map_err(|e| nats_error("removing the republished dead letter", e))?;
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        for name in [&self.config.stream, &self.config.dead_letter_stream] {
            match self.js.delete_stream(name).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(nats_error(&format!("deleting stream {name:?}"), e)),
            }
        }
        Ok(())
    }

    async fn close(self) {
        let _ = self.js.client().flush().await;
    }
}
