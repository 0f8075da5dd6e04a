//! `source.logical.shards`: names, limits and the refusals that keep a sharded outbox
//! whole.

use super::{load_str, problem_keys, problem_text, VALID};

#[test]
fn shards_are_checked_with_everything_they_cannot_hold() {
    let logical = VALID
        .replace("mode = \"polling\"", "mode = \"logical\"")
        .replace(
            "[source.polling]",
            "[source.logical]\nSHARDING\n\n[source.polling]",
        );
    let with = |lines: &str| logical.replace("SHARDING", lines);

    let c = load_str(&with(""), &[]).unwrap();
    assert_eq!(c.source.logical.shards, 1, "one slot by default");
    assert_eq!(c.source.logical.shards().len(), 1);
    assert_eq!(c.source.logical.shards()[0].slot, "outbox_relay");

    let c = load_str(&with("shards = 3\nmessage_prefix = \"\""), &[]).unwrap();
    let names: Vec<(String, String)> = c
        .source
        .logical
        .shards()
        .into_iter()
        .map(|s| (s.slot, s.publication))
        .collect();
    assert_eq!(
        names,
        [0, 1, 2].map(|i| (
            format!("outbox_relay_{i}_of_3"),
            format!("outbox_relay_{i}_of_3")
        ))
    );
    assert_eq!(
        c.source.logical.all_slots().len(),
        3,
        "from the configured one too"
    );
    // The shards share `source.max_batch_bytes` (8 MiB by default): each streams and
    // batches a third of it, so together they hold what one slot would.
    let shares: Vec<usize> = crate::source::logical::shard_configs(&c.source)
        .iter()
        .map(|s| s.max_batch_bytes)
        .collect();
    assert_eq!(shares, [8 * 1024 * 1024 / 3; 3]);
    let third = &c.source.logical.shards()[2];
    assert_eq!(third.base_slot(), "outbox_relay");
    assert_eq!(third.all_slots().len(), 3);

    // Messages would reach every shard's slot: refused, with the way out.
    let text = problem_text(load_str(&with("shards = 2"), &[]));
    assert!(text.contains("source.logical.message_prefix"), "{text}");
    assert!(text.contains("message_prefix = \"\""), "{text}");
    for bad in ["shards = 0", "shards = 17"] {
        let text = problem_text(load_str(
            &with(&format!("{bad}\nmessage_prefix = \"\"")),
            &[],
        ));
        assert!(text.contains("source.logical.shards"), "{bad}: {text}");
        assert!(text.contains("between 1 and 16"), "{bad}: {text}");
    }
    // The suffix must fit PostgreSQL's 63 characters.
    let long = "s".repeat(60);
    let text = problem_text(load_str(
        &with(&format!(
            "shards = 2\nmessage_prefix = \"\"\nslot = \"{long}\""
        )),
        &[],
    ));
    assert!(text.contains("too long for 2 shards"), "{text}");
    assert!(load_str(&with(&format!("slot = \"{long}\"")), &[]).is_ok());
    // Table-less outboxes are messages only.
    let tableless = with("shards = 2\nmessage_prefix = \"\"")
        .replace("table = \"public.outbox\"", "table = \"\"");
    assert_eq!(
        problem_keys(load_str(&tableless, &[])),
        ["source.logical.shards"]
    );
    let nothing =
        with("message_prefix = \"\"").replace("table = \"public.outbox\"", "table = \"\"");
    assert!(problem_text(load_str(&nothing, &[])).contains("nothing to publish"));
    // Exactly-once keeps one log position per outbox.
    let eos = with("shards = 2\nmessage_prefix = \"\"").replace(
        "dead_letter_topic = \"app.dlq\"",
        "dead_letter_topic = \"app.dlq\"\ndelivery = \"exactly_once\"",
    );
    let text = problem_text(load_str(&eos, &[]));
    assert!(
        text.contains("source.logical.shards") && text.contains("exactly"),
        "{text}"
    );
}
