//! Topic routing: templates such as `outbox.{aggregate_type}` and Kafka's naming rules.

/// Kafka refuses longer topic names.
const MAX_TOPIC_LEN: usize = 249;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

/// A parsed topic template. Placeholders: `{aggregate_type}` and `{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

impl TopicTemplate {
    pub fn parse(raw: &str) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let Some(end) = after.find('}') else {
                    return Err(format!(
                        "{raw:?} has an unclosed '{{': placeholders are {{aggregate_type}} and {{event_type}}"
                    ));
                };
                parts.push(match &after[..end] {
                    "aggregate_type" => Part::AggregateType,
                    "event_type" => Part::EventType,
                    other => {
                        return Err(format!(
                            "{raw:?} uses unknown placeholder {{{other}}}: use {{aggregate_type}} or {{event_type}}"
                        ))
                    }
                });
                rest = &after[end + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let literal = &rest[..end];
                if let Some(bad) = literal.chars().find(|c| !is_topic_char(*c)) {
                    return Err(format!(
                        "{raw:?} contains {bad:?}: topic names allow only a-z, A-Z, 0-9, '.', '_' and '-'"
                    ));
                }
                parts.push(Part::Literal(literal.to_owned()));
                rest = &rest[end..];
            }
        }
        if parts.is_empty() {
            return Err("must not be empty (the default is \"outbox.{aggregate_type}\")".into());
        }
        Ok(TopicTemplate { parts })
    }

    /// Fills in the placeholders; the result still has to pass [`validate_topic_name`],
    /// since the values come from rows.
    /// Whether the topic depends on the event type.
    pub fn uses_event_type(&self) -> bool {
        self.parts.contains(&Part::EventType)
    }

    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::AggregateType => out.push_str(aggregate_type),
                Part::EventType => out.push_str(event_type),
            }
        }
        out
    }
}

pub(super) fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks a finished topic name against Kafka's rules.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid Kafka topic name"));
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "topic name is {} characters long, Kafka allows {MAX_TOPIC_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name.chars().find(|c| !is_topic_char(*c)) {
        return Err(format!(
            "topic {name:?} contains {bad:?}: Kafka allows only a-z, A-Z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_placeholders() {
        let t = TopicTemplate::parse("app.{aggregate_type}.{event_type}").unwrap();
        assert_eq!(t.render("Order", "Created"), "app.Order.Created");
    }

    #[test]
    fn refuses_unknown_placeholder_and_bad_characters() {
        assert!(TopicTemplate::parse("x.{aggregate}")
            .unwrap_err()
            .contains("{aggregate}"));
        assert!(TopicTemplate::parse("x/{aggregate_type}")
            .unwrap_err()
            .contains("'/'"));
        assert!(TopicTemplate::parse("x.{aggregate_type")
            .unwrap_err()
            .contains("unclosed"));
        assert!(TopicTemplate::parse("").is_err());
    }

    #[test]
    fn checks_rendered_names() {
        assert!(validate_topic_name("outbox.Order").is_ok());
        assert!(validate_topic_name("outbox.Or der").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
        assert!(validate_topic_name("..").is_err());
    }
}
