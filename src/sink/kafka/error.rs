//! Errors at the Kafka boundary.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the Kafka producer: {0}")]
    Create(#[source] KafkaError),
    #[error("Kafka did not acknowledge the event for topic {topic}: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("not sent, because an earlier event of the batch failed")]
    NotAttempted,
    #[error("the Kafka producer hit a fatal error and cannot continue: {0}")]
    Fatal(String),
    #[error(
        "this relay's Kafka producer was fenced ({0}): another relay with the same \
         transactional id took over the outbox, or the transaction ran past \
         transaction.timeout.ms. This relay stops publishing; the other one goes on"
    )]
    Fenced(String),
    #[error("the Kafka transaction was aborted and the batch is sent again: {0}")]
    Aborted(String),
    #[error("the checkpoint topic {topic}: {reason}")]
    Checkpoint { topic: String, reason: String },
    #[error("the dead-letter topic {topic} did not take a poison event ({reason}): {source}")]
    DeadLetter {
        topic: String,
        reason: String,
        // Boxed: keeps every `Result<_, SinkError>` small.
        #[source]
        source: Box<KafkaError>,
    },
    #[error("an event's schema: {0}")]
    Contract(#[from] super::schema::ContractError),
    /// Many aggregates' events refused on one topic in a short time: the topic (its
    /// ACL, its existence) is the problem, so nothing more is parked or dead-lettered
    /// for it; its events wait and are sent again.
    #[error(
        "topic {topic} refuses events of many aggregates ({source}): publishing to it stops \
         until the cause is fixed (an ACL, a deleted topic?); its events are sent again"
    )]
    TopicRefuses {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

impl SinkError {
    /// Whether the producer is unusable: the relay must stop (never build another one
    /// on its own when it was fenced).
    pub fn is_fatal(&self) -> bool {
        matches!(self, SinkError::Fatal(_) | SinkError::Fenced(_))
    }

    /// A short, stable label for logs and the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SinkError::Create(_) => "producer",
            SinkError::Delivery { .. } => "delivery",
            SinkError::DeadLetter { .. } => "dead_letter",
            SinkError::NotAttempted => "not_attempted",
            SinkError::Fatal(_) => "producer",
            SinkError::Fenced(_) => "fenced",
            SinkError::Aborted(_) => "aborted",
            SinkError::Checkpoint { .. } => "checkpoint",
            SinkError::Contract(_) => "schema_registry",
            SinkError::TopicRefuses { .. } => "topic_refuses",
        }
    }
}

/// True when a transactional call failed because a newer producer with the same
/// transactional id exists (or this one's epoch was bumped past it).
pub fn is_fenced(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::TransactionCoordinatorFenced
        )
    )
}

/// True when the message was refused for its size (by librdkafka or the broker).
pub fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// True for answers that no retry can change: the event itself is the problem (too
/// large, a topic name or topic the broker refuses, not allowed to write there), so it
/// belongs on the dead-letter topic. Everything else is retried, never dropped.
///
/// A missing ACL on every topic therefore diverts the whole stream to the dead-letter
/// topic — nothing is lost, and the dead-letter alert fires.
pub fn is_poison(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidArgument
    )
}
